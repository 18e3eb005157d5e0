"""Forgetting and replay on the real model: the same job on the pandas example without and
with --replay-ratio, through the service (its training worker, its evaluation), one after
the other in one run. Prints one JSON object.

For each job (same data, split, seed and hyperparameters; only replay_ratio differs):

    task_rougeL_f1        held-out ROUGE-L F1 (the job's validation split) of adapter and base
    gain                  adapter - base on that
    retention             Job.retention: the adapter's ROUGE-L F1 on the built-in general
                          retention set (general.py; the base model's own greedy answers as
                          references, so the base scores 1) over the base's
    gain_kept             (replay jobs) this job's gain over the no-replay job's gain
    adapter_scale         the strength --shrink-to-gain chose (1: as trained), and shrink_trace,
                          the job's message for each strength tried

--test-examples N (26 by default) holds N lines of the dataset out of every job (the same N
whatever --seed) and scores each published adapter and the base on them afterwards, as a
job's evaluation does: data that neither trained the adapter nor chose its strength.

    test_rougeL_f1, test_gain        adapter and base on them, and the difference
    test_gain_kept_of_max            test_gain / (1 - the base's): of all there was to gain
    as_trained                       (shrunk adapters) the adapter at strength 1: its test
                                     score and gain, and its retention, so one job shows
                                     what shrinking cost and bought
    test_gain_kept_of_trained        test_gain over as_trained's

Goal (issue 17): with replay, retention >= 0.9 while the gain kept is >= 0.95 (held out:
test_gain_kept_of_max, with a test split; else gain_kept).

    python bench/replay.py [--replay-ratio 0 1] [--replay-loss kl|ce] [--epochs 2] [--lr 1e-3] [--batch-size 4]
        [--rank R] [--alpha A] [--target-modules NAME ...] [--task-subspace M] [--shrink-to-gain G] [--seed 0]
        [--test-examples 26] [--keep DIR] [--eval-max-new-tokens 32] [--max-eval-examples 100]
        [--training-threads 1] [--base-model ...]

--eval-max-new-tokens caps every greedy generation of a job: the task's evaluation (each
reference is one line of code), the base model's reference answers on the retention set,
and the replay examples' answers. 32 (the walk-through's setting, not the server's 128)
keeps a replay job under an hour on 2 CPU cores at 1 thread. --max-eval-examples takes the
first N prompts of the retention set. Progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from adapterd.training.spec import REPLAY_LOSSES
from train import DATASET, Service  # bench/train.py: the service on a loopback port


def run_job(service: Service, data: Path, name: str, hp: dict) -> dict:
    from adapterctl.train import TrainingClient
    from adapterd_api.v1 import training_pb2 as pb

    training = TrainingClient(service.client)
    started = time.time()
    job = training.create(data, name=name, **hp)
    phases: dict[str, float] = {}  # a worker message -> when it came, seconds after CreateJob
    for event in training.watch(job.id):
        at = event.time - started
        if event.type == pb.MESSAGE:
            phases[event.message] = round(at, 1)
            print(f"[{at:7.0f}s] {name}: {event.message}", file=sys.stderr, flush=True)
        elif event.type == pb.STARTED:
            phases["training started"] = round(at, 1)
            print(f"[{at:7.0f}s] {name}: training, {event.total_steps} steps", file=sys.stderr, flush=True)
        elif event.type == pb.STEP and (event.step % 10 == 0 or event.step <= 3):
            print(f"[{at:7.0f}s] {name}: step {event.step}/{event.total_steps} loss {event.loss:.4f} "
                  f"{event.tokens_per_second:.0f} tok/s", file=sys.stderr, flush=True)
        elif event.type == pb.EVAL:
            print(f"[{at:7.0f}s] {name}: step {event.step} validation loss {event.eval_loss:.4f}",
                  file=sys.stderr, flush=True)
        elif event.type == pb.STATE:
            print(f"[{at:7.0f}s] {name}: {pb.JobState.Name(event.state).lower()} {event.message}",
                  file=sys.stderr, flush=True)
    wall = time.time() - started
    job = training.get(job.id)
    if job.state != pb.SUCCEEDED:
        raise RuntimeError(f"job {job.id} {pb.JobState.Name(job.state)}: {job.error}")
    splits = {e.split: e for e in job.evaluation}
    task, retention = splits["validation"], splits["retention"]
    t = job.training
    return {
        "replay_ratio": hp["replay_ratio"],
        "replay_loss": hp["replay_loss"] if hp["replay_ratio"] else None,
        "replay_examples": t.replay_examples,
        "train_examples": job.train_examples,
        "validation_examples": task.examples,
        "retention_examples": retention.examples,
        "task_rougeL_f1": {"adapter": task.adapter.rouge_l.f1, "base": task.base.rouge_l.f1},
        "gain": task.adapter.rouge_l.f1 - task.base.rouge_l.f1,
        "task_loss": {"adapter": task.adapter.loss, "base": task.base.loss},
        "retention": job.retention,
        "retention_rougeL_f1": {"adapter": retention.adapter.rouge_l.f1, "base": retention.base.rouge_l.f1},
        "retention_samples": [{"prompt": s.prompt[-80:], "reference": s.reference, "adapter": s.generation}
                              for s in retention.adapter.samples],
        "steps": t.steps, "stopped_early": t.stopped_early, "train_loss": t.train_loss,
        "best_eval_loss": t.best_eval_loss, "train_runtime_s": t.runtime_s, "tokens": t.tokens,
        "tokens_per_second": t.tokens_per_second, "job_wall_s": wall, "phases_s": phases,
        "adapter": job.adapter, "adapter_scale": t.adapter_scale,
        "shrink_trace": [k for k in phases if k.startswith("shrinking the adapter: strength") and "keeps" in k],
    }


TEST_SEED = 1234  # which lines --test-examples holds out: fixed, so every seed's job is tested on the same ones


def split_test(lines: list[str], n: int) -> tuple[list[str], list[str]]:
    """(job's lines, test lines): n lines held out from every job, the same n whatever the
    job's --seed, both in file order."""
    held = set(random.Random(TEST_SEED).sample(range(len(lines)), n)) if n else set()
    return [x for i, x in enumerate(lines) if i not in held], [x for i, x in enumerate(lines) if i in held]


def score_held_out(base_model: Path, registry: Path, ref: str, test_lines: list[str], *, scale: float, threads: int,
                   max_new_tokens: int) -> dict:
    """The published adapter REF beside the base on the test lines no job saw, as a job's
    evaluation scores (the job's kernel, greedy, ROUGE-L F1); where the job shrank the
    adapter (scale < 1), the trained adapter's test score and retention too, so one job
    shows what shrinking cost and bought."""
    from adapterd.engine.model import load_base_model, parse_dtype, unpacked
    from adapterd.training import evaluate, general, shrink
    from adapterd.training.data import instruction, parse_jsonl
    from divergence import adapter_dir
    from peft import PeftModel

    torch.set_num_threads(threads)
    device = torch.device("cpu")
    model, tokenizer, _ = load_base_model(base_model, device=device, compute_dtype=parse_dtype(None, device))
    unpacked(model)  # the job's kernel: worker.prepare_model
    with tempfile.TemporaryDirectory(prefix="adapterd-bench-replay-") as tmp:
        model = PeftModel.from_pretrained(model.eval(), adapter_dir(registry, ref, Path(tmp))).eval()
    test = parse_jsonl("".join(test_lines).encode(), what="test lines", tokenizer=tokenizer, max_seq_len=1024)
    score = partial(shrink.rouge_l, model, tokenizer, batch_size=evaluate.GENERATE_BATCH, max_new_tokens=max_new_tokens)
    with model.disable_adapter():
        base = score(test)
    out = {"test_examples": len(test), "test_rougeL_f1": {"adapter": score(test), "base": base}}
    out["test_gain"] = out["test_rougeL_f1"]["adapter"] - base
    out["test_gain_kept_of_max"] = out["test_gain"] / (1 - base)  # of all there was to gain
    if scale < 1:
        shrink.Strength(model).set(1 / scale)  # the adapter as trained
        full = score(test)
        retention = [instruction(text, tokenizer, i) for i, text in enumerate(general.RETENTION, 1)]
        with model.disable_adapter():
            retention = evaluate.answer(model, tokenizer, retention, batch_size=evaluate.GENERATE_BATCH,
                                        max_new_tokens=max_new_tokens)
        references = [e.reference for e in retention]
        base_retention = evaluate.rouge(references, references)["rougeL"]["f1"]  # 1 but for empty answers
        out["as_trained"] = {"test_rougeL_f1": full, "test_gain": full - base,
                             "retention": score(retention) / base_retention}
        out["test_gain_kept_of_trained"] = out["test_gain"] / (full - base) if full > base else None
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--replay-ratio", type=float, nargs="+", default=[0.0, 1.0],
                        help="one job per ratio, in this order; 0 = the job without replay (needed for gain_kept)")
    parser.add_argument("--replay-loss", choices=REPLAY_LOSSES, default="kl",
                        help="how the replay jobs learn the base's answers: its whole distribution (kl, the "
                        "server's default) or its greedy tokens (ce)")
    parser.add_argument("--epochs", type=float, default=2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rank", type=int, default=None, help="LoRA rank (default: the server's, 16)")
    parser.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: the server's, 32)")
    parser.add_argument("--target-modules", nargs="+", default=None, metavar="NAME",
                        help="modules LoRA adapts (default: the server's, all-linear)")
    parser.add_argument("--task-subspace", type=int, default=None, metavar="M",
                        help="every job: LoRA A restricted to M input directions per layer (default: the server's, 0)")
    parser.add_argument("--shrink-to-gain", type=float, default=None, metavar="G",
                        help="every job: shrink the trained adapter to the smallest strength keeping G of its "
                        "validation gain (default: the server's, 0: as trained)")
    parser.add_argument("--test-examples", type=int, default=26, metavar="N",
                        help="lines of the dataset held out from every job (the same whatever --seed) and scored "
                        "after it: the task gain on data that neither trained nor chose anything (0: none)")
    parser.add_argument("--eval-max-new-tokens", type=int, default=32)
    parser.add_argument("--max-eval-examples", type=int, default=100)
    parser.add_argument("--examples", type=int, default=None,
                        help="the first N lines of adapters/examples/pandas_numpy.jsonl (default: all 261)")
    parser.add_argument("--training-threads", type=int, default=1, help="the worker's torch threads (0: every core)")
    parser.add_argument("--training-nice", type=int, default=19)
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR",
                        help="copy the run's registry (the jobs' adapters) to DIR/registry, for bench/divergence.py")
    parser.add_argument("--base-model", default=None, metavar="DIR|FILE.gguf|demo",
                        help="default: SmolLM2-135M-Instruct, the server's default")
    args = parser.parse_args()

    from adapterd.engine.model import base_model_dir

    base_model = base_model_dir(args.base_model)
    hp = dict(replay_loss=args.replay_loss, epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size, seed=args.seed,
              rank=args.rank, alpha=args.alpha, target_modules=args.target_modules, task_subspace=args.task_subspace,
              shrink_to_gain=args.shrink_to_gain, eval_max_new_tokens=args.eval_max_new_tokens, max_eval_examples=args.max_eval_examples)
    runs = []
    with tempfile.TemporaryDirectory(prefix="adapterd-bench-replay-") as tmp:
        root = Path(tmp)
        data = root / "pandas_numpy.jsonl"
        lines = DATASET.read_text().splitlines(keepends=True)[: args.examples]
        job_lines, test_lines = split_test(lines, args.test_examples)
        data.write_text("".join(job_lines))
        service = Service(root, base_model, ("--training-nice", str(args.training_nice),
                                             "--training-threads", str(args.training_threads)))
        try:
            for i, ratio in enumerate(args.replay_ratio):
                runs.append(run_job(service, data, f"replay-{i}", {**hp, "replay_ratio": ratio}))
                if test_lines:
                    print(f"scoring {runs[-1]['adapter']} on {len(test_lines)} held-out lines", file=sys.stderr, flush=True)
                    runs[-1].update(score_held_out(
                        base_model, root / "registry", runs[-1]["adapter"], test_lines, scale=runs[-1]["adapter_scale"],
                        threads=args.training_threads or os.cpu_count(), max_new_tokens=args.eval_max_new_tokens))
                print(json.dumps(runs[-1]), file=sys.stderr, flush=True)
        finally:
            service.stop()
            if args.keep is not None:
                shutil.copytree(root / "registry", args.keep / "registry", dirs_exist_ok=True)
    plain = next((r for r in runs if r["replay_ratio"] == 0), None)
    for r in runs:
        if plain is not None and r is not plain:
            r["gain_kept"] = r["gain"] / plain["gain"] if plain["gain"] else None
        if r is not plain and (plain is not None or test_lines):
            kept = r.get("test_gain_kept_of_max") if test_lines else r["gain_kept"]  # held out, when there is a test split
            r["goal_met"] = r["retention"] >= 0.9 and (kept or 0) >= 0.95
    print(json.dumps({
        "base_model": str(base_model), "dataset": str(DATASET), "examples": len(lines), "test_examples": len(test_lines),
        **hp,
        "training_threads": args.training_threads, "runs": runs,
        "goal": "with replay: retention >= 0.9 and gain kept >= 0.95 (test_gain_kept_of_max with a test split, "
                "else gain_kept)",
    }, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
