"""`adapterctl train | jobs` without a server: the requests it sends, the progress bar on a
terminal and in a log, the evaluation table."""

from __future__ import annotations

import io

import pytest
from adapterctl.train import (
    ProgressBar,
    _hyperparameters,
    create_requests,
    describe,
    evaluation_table,
    retention_line,
)
from adapterd_api.v1 import training_pb2 as pb


def test_requests_are_the_spec_then_every_file_in_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr("adapterctl.train.CHUNK_BYTES", 4)
    (tmp_path / "t.jsonl").write_bytes(b"0123456789")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    spec = pb.JobSpec(name="n", hyperparameters=_hyperparameters(epochs=2.0, rank=None, target_modules=["q_proj"]))
    reqs = list(create_requests(spec, [(pb.TRAINING, tmp_path / "t.jsonl"), (pb.VALIDATION, tmp_path / "empty.jsonl")]))
    assert reqs[0].spec.hyperparameters.HasField("epochs") and not reqs[0].spec.hyperparameters.HasField("rank")
    assert [(r.chunk.file, r.chunk.data) for r in reqs[1:]] == [
        (pb.TRAINING, b"0123"), (pb.TRAINING, b"4567"), (pb.TRAINING, b"89"),
        (pb.VALIDATION, b""),  # an empty file still arrives, to be refused as empty
    ]


def _step(step: int, total: int = 100) -> pb.JobEvent:
    return pb.JobEvent(type=pb.STEP, step=step, total_steps=total, loss=2.5, learning_rate=2e-4,
                       tokens_per_second=1000, elapsed_s=step * 0.5)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_redraws_in_place_on_a_terminal():
    out = Terminal()
    bar = ProgressBar(out)
    bar.update(_step(10))
    bar.note("step 10/100: validation loss 2.4000")
    bar.update(_step(20))
    bar.close()
    text = out.getvalue()
    assert text.count("\r\x1b[K") == 3 and text.endswith("\n")
    assert "step 20/100 [####....................]  20% loss 2.5000 lr 2.0e-04 1000 tok/s eta 0:40" in text
    assert "validation loss 2.4000\n" in text


def test_progress_in_a_log_is_a_line_per_tenth():
    out = io.StringIO()
    bar = ProgressBar(out)
    for s in range(1, 101):
        bar.update(_step(s))
    lines = out.getvalue().splitlines()
    assert len(lines) == 11 and lines[-1].startswith("step 100/100") and "\r" not in out.getvalue()


def test_evaluation_table_puts_adapter_and_base_side_by_side():
    def scores(loss, f1):
        rouge = pb.Rouge(precision=f1, recall=f1, f1=f1)
        return pb.Scores(loss=loss, perplexity=2.0, rouge1=rouge, rouge2=rouge, rouge_l=rouge,
                         samples=[pb.Sample(prompt="Q: sort?\nA: ", reference="df.sort_values('a')", generation="df.sort")])

    job = pb.Job(evaluation=[pb.SplitEvaluation(split="validation", examples=26, adapter=scores(1.6, 0.52),
                                                base=scores(5.6, 0.02))])
    table = evaluation_table(job)
    assert table.splitlines()[0].split() == ["validation", "(26", "examples)", "adapter", "base", "change"]
    assert "ROUGE-L f1" in table and "0.5200" in table and "+0.5000" in table and "-4.0000" in table
    assert "adapter:   df.sort" in table


def test_retention_is_shown_with_where_its_references_came_from():
    rouge = lambda f1: pb.Rouge(precision=f1, recall=f1, f1=f1)  # noqa: E731
    scores = lambda f1: pb.Scores(loss=1.0, perplexity=2.7, rouge1=rouge(f1), rouge2=rouge(f1), rouge_l=rouge(f1))  # noqa: E731
    job = pb.Job(retention=0.42, training=pb.TrainingStats(steps=3, replay_examples=24), evaluation=[
        pb.SplitEvaluation(split="retention", examples=100, adapter=scores(0.42), base=scores(1.0), references="base")])
    assert evaluation_table(job).splitlines()[0].startswith("retention (100 examples, references: the base model's answers)")
    assert retention_line(job).startswith("retention 0.420: ") and "the base model's own answers" in retention_line(job)
    shown = describe(job)
    assert "24 replay examples" in shown and "retention    0.420" in shown


def test_new_training_flags_reach_the_spec():
    h = _hyperparameters(replay_ratio=0.5, replay_loss="ce", min_retention=0.9, method="lora", use_dora=None)
    assert (h.replay_ratio, h.replay_loss, h.min_retention, h.method, h.use_dora) == (0.5, "ce", 0.9, "lora", False)
    assert not _hyperparameters().HasField("replay_ratio")  # unset: the server's default
    assert not _hyperparameters().HasField("task_subspace")


def test_task_subspace_flag_reaches_the_hyperparameters(capsys):
    from adapterctl.cli import build_parser

    args = build_parser().parse_args(["train", "data.jsonl", "--name", "x", "--task-subspace", "32"])
    assert args.task_subspace == 32
    assert _hyperparameters(task_subspace=args.task_subspace).task_subspace == 32
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "--task-subspace M" in capsys.readouterr().out


def test_shrink_to_gain_flag_reaches_the_hyperparameters(capsys):
    from adapterctl.cli import build_parser

    args = build_parser().parse_args(["train", "data.jsonl", "--name", "x", "--shrink-to-gain", "0.95"])
    assert _hyperparameters(shrink_to_gain=args.shrink_to_gain).shrink_to_gain == 0.95
    assert not _hyperparameters().HasField("shrink_to_gain")  # unset: the server's default, as trained
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    assert "--shrink-to-gain G" in capsys.readouterr().out
