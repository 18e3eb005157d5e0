"""`adapterctl train | jobs`: training jobs, and their client library.

    train DATA.jsonl --name N [--validation FILE | --val-split F] [--retention-file FILE]
          [--replay-ratio R] [--replay-loss kl|ce] [--task-subspace M] [--shrink-to-gain G] [--min-retention X] [--method lora|ia3|prompt-tuning|prefix-tuning]
          [--use-dora] [--virtual-tokens N]
          [--epochs] [--lr] [--rank] [--alpha] [--dropout] [--target-modules ...]
          [--batch-size] [--grad-accum] [--max-seq-len] [--seed] [--no-early-stopping] [--wait]
    jobs list [--state S] [--json]      your jobs, newest first
    jobs show ID [--json]               one job in full, with its evaluation table
    jobs cancel ID                      stop it within one training step
    jobs watch ID                       a live progress bar, then the evaluation table

Unset hyperparameters take the server's defaults (those of the hosted fine-tuning APIs:
3 epochs, lr 2e-4, rank 16, alpha 32, dropout 0.05, all linear layers). Library use:

    with Client(addr) as c:
        job = TrainingClient(c).create(Path("data.jsonl"), name="sql-bot", epochs=5)
        for event in TrainingClient(c).watch(job.id): ...
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from adapterd_api.v1 import training_pb2 as pb
from adapterd_api.v1 import training_pb2_grpc as pb_grpc
from google.protobuf.json_format import MessageToDict

from adapterctl.client import Client
from adapterctl.progress import Progress
from adapterctl.terminal import json_line, safe

CHUNK_BYTES = 1 << 20
EXIT_JOB_FAILED = 1  # the job failed or was cancelled: the reason is on stderr
STATE_NAMES = {v: k.lower() for k, v in pb.JobState.items()}
FINAL = {pb.SUCCEEDED, pb.FAILED, pb.CANCELLED}
ROUGE = (("rouge1", "ROUGE-1"), ("rouge2", "ROUGE-2"), ("rouge_l", "ROUGE-L"))


class TrainingClient:
    """The Training RPCs over a Client's channel, with its metadata (and its timeout, for
    every call but WatchJob, which lasts as long as the job)."""

    def __init__(self, client: Client):
        self.client = client
        self.stub = pb_grpc.TrainingStub(client.channel)

    def _kw(self, timeout: bool = True) -> dict:
        return {"metadata": self.client.metadata, "timeout": self.client.timeout if timeout else None}

    def create(self, training: Path, *, name: str, description: str = "", validation: Path | None = None,
               retention: Path | None = None, **hyperparameters) -> pb.Job:
        """Upload the files and queue the job. `hyperparameters`: Hyperparameters fields;
        None leaves one to the server's default."""
        spec = pb.JobSpec(name=name, description=description, hyperparameters=_hyperparameters(**hyperparameters))
        files = [(pb.TRAINING, training), (pb.VALIDATION, validation), (pb.RETENTION, retention)]
        return self.stub.CreateJob(create_requests(spec, [(k, p) for k, p in files if p is not None]), **self._kw())

    def get(self, job_id: str) -> pb.Job:
        return self.stub.GetJob(pb.GetJobRequest(job_id=job_id), **self._kw())

    def list(self, states: Iterable[int] = ()) -> Iterator[pb.Job]:
        token = ""
        while True:
            page = self.stub.ListJobs(pb.ListJobsRequest(page_token=token, states=list(states)), **self._kw())
            yield from page.jobs
            token = page.next_page_token
            if not token:
                return

    def cancel(self, job_id: str) -> pb.Job:
        return self.stub.CancelJob(pb.CancelJobRequest(job_id=job_id), **self._kw())

    def watch(self, job_id: str, after_seq: int = 0) -> Iterator[pb.JobEvent]:
        return self.stub.WatchJob(pb.WatchJobRequest(job_id=job_id, after_seq=after_seq), **self._kw(timeout=False))


def _hyperparameters(**values) -> pb.Hyperparameters:
    h = pb.Hyperparameters()
    for k, v in values.items():
        if v is None:
            continue
        if k == "target_modules":
            h.target_modules.extend(v)
        else:
            setattr(h, k, v)
    return h


def create_requests(spec: pb.JobSpec, files: list[tuple[int, Path]]) -> Iterator[pb.CreateJobRequest]:
    yield pb.CreateJobRequest(spec=spec)
    for kind, path in files:
        with open(path, "rb") as f:
            chunk = f.read(CHUNK_BYTES)
            yield pb.CreateJobRequest(chunk=pb.DatasetChunk(file=kind, data=chunk))  # even an empty file
            while chunk := f.read(CHUNK_BYTES):
                yield pb.CreateJobRequest(chunk=pb.DatasetChunk(file=kind, data=chunk))


# ---- the command line ----------------------------------------------------------------------


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train an adapter on a JSONL dataset (QLoRA on the served base model)",
        description="Upload DATA.jsonl and queue a training job; on success the adapter is the next "
        "version of --name and is served at once. Unset hyperparameters take the server's defaults.",
    )
    p.add_argument("data", type=Path, metavar="DATA.jsonl",
                   help='one example a line: {"text"}, {"prompt","completion"} or {"messages":[...]}')
    p.add_argument("--name", required=True, help="the adapter's name; the job publishes its next version")
    p.add_argument("--description", default="", help="stored with the adapter")
    held_out = p.add_mutually_exclusive_group()
    held_out.add_argument("--validation", type=Path, default=None, metavar="FILE", help="validation examples (JSONL)")
    held_out.add_argument("--val-split", type=float, default=None, metavar="F",
                          help="fraction of DATA held out for validation without --validation (default: 0.1)")
    p.add_argument("--retention-file", type=Path, default=None, metavar="FILE",
                   help="general prompts with references, scored for adapter and base so forgetting shows "
                   "(default: the server's built-in general set, with the base model's answers as references)")
    p.add_argument("--replay-ratio", type=float, default=None, metavar="R",
                   help="mix in R general examples per task example, the base model's own answers to general "
                   "prompts (self-distillation), so the adapter forgets less (default: 0)")
    p.add_argument("--replay-loss", default=None, metavar="kl|ce",
                   help="how replay is learned: kl, the base model's whole next-token distribution on each replay "
                   "example (self-distillation, the default), or ce, cross-entropy on its greedy answer tokens")
    p.add_argument("--task-subspace", type=int, default=None, metavar="M",
                   help="LoRA only: each layer's LoRA A reads its input only along the M directions where the task's "
                   "inputs stand out most from general text's, so the adapter changes less on general prompts "
                   "(default: 0, unrestricted)")
    p.add_argument("--shrink-to-gain", type=float, default=None, metavar="G",
                   help="LoRA only: after training, shrink the adapter toward the base to the smallest strength "
                   "(1, 0.9, ..., 0.1) that keeps G (0..1) of its ROUGE-L gain on the validation split, so it "
                   "changes less on general prompts (default: 0, as trained)")
    p.add_argument("--min-retention", type=float, default=None, metavar="X",
                   help="fail the job, publishing nothing, when the adapter keeps less than X (0..1) of the base "
                   "model's ROUGE-L on the retention set (default: 0, no check)")
    p.add_argument("--method", default=None, metavar="METHOD",
                   help="the adapter kind to train: lora (default), ia3, prompt-tuning or prefix-tuning; "
                   "the published adapter is of that kind and served at once")
    p.add_argument("--use-dora", action="store_true",
                   help="with --method lora: train DoRA (weight-decomposed LoRA)")
    p.add_argument("--virtual-tokens", type=int, default=None, metavar="N",
                   help="prompt and prefix tuning: the virtual tokens trained (default: 20)")
    p.add_argument("--epochs", type=float, default=None, help="(default: 3)")
    p.add_argument("--lr", type=float, default=None, dest="learning_rate", metavar="LR", help="peak learning rate, cosine schedule with warmup (default: 2e-4)")
    p.add_argument("--rank", type=int, default=None, help="LoRA rank (default: 16)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: 32)")
    p.add_argument("--dropout", type=float, default=None, help="LoRA dropout (default: 0.05)")
    p.add_argument("--target-modules", type=_modules, default=None, metavar="all-linear|a,b,c",
                   help="layers to adapt (default: all-linear)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per step (default: 4)")
    p.add_argument("--grad-accum", type=int, default=None, help="steps per optimizer update (default: 1)")
    p.add_argument("--max-seq-len", type=int, default=None, help="longest example in tokens; longer is an error (default: 1024)")
    p.add_argument("--seed", type=int, default=None, help="(default: 0)")
    p.add_argument("--warmup-ratio", type=float, default=None, help="fraction of steps warming up (default: 0.03)")
    p.add_argument("--max-eval-examples", type=int, default=None, help="examples scored per split (default: 100)")
    p.add_argument("--eval-max-new-tokens", type=int, default=None, help="tokens generated per scored example (default: 128)")
    p.add_argument("--no-early-stopping", action="store_true", help="train every epoch even if the validation loss stops improving")
    p.add_argument("--wait", action="store_true", help="follow the job: a progress bar, then the evaluation table")
    p.set_defaults(run=run_train)

    jobs = subparsers.add_parser("jobs", help="list, show, cancel or watch training jobs")
    sub = jobs.add_subparsers(dest="jobs_command", required=True, metavar="ACTION")
    ls = sub.add_parser("list", help="your jobs, newest first")
    ls.add_argument("--state", action="append", default=[], choices=[s for s in STATE_NAMES.values() if s != "job_state_unspecified"],
                    help="only jobs in this state (repeatable)")
    ls.add_argument("--json", action="store_true", help="one JSON object per job")
    ls.set_defaults(run=run_list)
    show = sub.add_parser("show", help="one job in full, with its evaluation")
    show.add_argument("job_id", metavar="ID")
    show.add_argument("--json", action="store_true")
    show.set_defaults(run=run_show)
    cancel = sub.add_parser("cancel", help="stop a job within one training step")
    cancel.add_argument("job_id", metavar="ID")
    cancel.set_defaults(run=run_cancel)
    watch = sub.add_parser("watch", help="follow a job: a progress bar, then the evaluation table")
    watch.add_argument("job_id", metavar="ID")
    watch.set_defaults(run=run_watch)


def _modules(value: str) -> list[str]:
    names = [m.strip() for m in value.split(",") if m.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give all-linear or module names separated by commas")
    return names


def run_train(args: argparse.Namespace) -> int:
    for flag, path in (("DATA", args.data), ("--validation", args.validation), ("--retention-file", args.retention_file)):
        if path is not None and not path.is_file():
            print(f"adapterctl: {flag} {path}: no such file", file=sys.stderr)
            return 2
    hyperparameters = {
        k: getattr(args, k) for k in (
            "epochs", "learning_rate", "rank", "alpha", "dropout", "target_modules", "batch_size", "grad_accum",
            "max_seq_len", "seed", "val_split", "warmup_ratio", "max_eval_examples", "eval_max_new_tokens",
            "replay_ratio", "replay_loss", "min_retention", "method", "virtual_tokens", "task_subspace",
            "shrink_to_gain",
        )
    }
    with Client.from_args(args) as client:
        training = TrainingClient(client)
        job = training.create(args.data, name=args.name, description=args.description, validation=args.validation,
                              retention=args.retention_file, no_early_stopping=args.no_early_stopping or None,
                              use_dora=args.use_dora or None, **hyperparameters)
        print(f"job {safe(job.id)}: {_state(job.state)} ({job.train_examples} training, "
              f"{job.validation_examples} validation examples)")
        if not args.wait:
            print(f"follow it with: adapterctl jobs watch {safe(job.id)}")
            return 0
        return follow(training, job.id)


def run_list(args: argparse.Namespace) -> int:
    states = [pb.JobState.Value(s.upper()) for s in args.state]
    with Client.from_args(args) as client:
        jobs = list(TrainingClient(client).list(states))
    if args.json:
        for job in jobs:
            print(_json(job))
        return 0
    rows = [("ID", "NAME", "STATE", "PROGRESS", "LOSS", "ADAPTER", "CREATED")]
    for j in jobs:
        progress = f"{j.step}/{j.total_steps}" if j.total_steps else "-"
        rows.append((j.id, j.name, _state(j.state), progress, f"{j.loss:.4f}" if j.HasField("loss") else "-",
                     j.adapter or "-", _when(j.created_at)))
    print(_table(rows, numbers=False))
    return 0


def run_show(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        job = TrainingClient(client).get(args.job_id)
    if args.json:
        print(_json(job))
        return 0
    print(describe(job))
    return 0


def run_cancel(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        job = TrainingClient(client).cancel(args.job_id)
    print(f"job {safe(job.id)}: {_state(job.state)}" + (" (stops within one step)" if job.state == pb.RUNNING else ""))
    return 0


def run_watch(args: argparse.Namespace) -> int:
    with Client.from_args(args) as client:
        return follow(TrainingClient(client), args.job_id)


def follow(training: TrainingClient, job_id: str, out=None) -> int:
    """Print the job's events as they come (a progress bar for the steps), then its
    evaluation table. The exit status: 0 once it succeeded, EXIT_JOB_FAILED otherwise."""
    out = out or sys.stdout
    bar = ProgressBar(out)
    for event in training.watch(job_id):
        if event.type == pb.STEP:
            bar.update(event)
        elif event.type == pb.EVAL:
            bar.note(f"step {event.step}/{event.total_steps}: validation loss {event.eval_loss:.4f}")
        elif event.type == pb.MESSAGE:
            bar.note(safe(event.message))
        elif event.type == pb.STATE:
            bar.note(_state(event.state) + (f": {safe(event.message)}" if event.message else ""))
    bar.close()
    job = training.get(job_id)
    if job.state != pb.SUCCEEDED:
        if job.evaluation:  # evaluated, then refused (--min-retention, the registry): the figures help
            print(evaluation_table(job), file=out)
        print(f"adapterctl: job {safe(job.id)} {_state(job.state)}: {safe(job.error)}", file=sys.stderr)
        return EXIT_JOB_FAILED
    print(evaluation_table(job), file=out)
    if job.HasField("retention"):
        print(retention_line(job), file=out)
    adapter = safe(job.adapter)
    print(f"\nadapter {adapter} is served now: adapterctl generate --adapter {adapter} PROMPT", file=out)
    return 0


class ProgressBar(Progress):
    """step 40/240 [#####.........] 17% loss 2.237 lr 2.9e-03 1165 tok/s eta 0:17"""

    def update(self, e: pb.JobEvent) -> None:
        total = max(e.total_steps, 1)
        eta = e.elapsed_s / max(e.step, 1) * (total - e.step)
        self.show(e.step / total, f"step {e.step}/{total}",
                  f"loss {e.loss:.4f} lr {e.learning_rate:.1e} {e.tokens_per_second:.0f} tok/s eta {_duration(eta)}")


def retention_line(job: pb.Job) -> str:
    r = next((s for s in job.evaluation if s.split == "retention"), None)
    of = "the base model's own answers" if r is not None and r.references == "base" else "the retention file"
    return (f"retention {job.retention:.3f}: the adapter kept that share of the base model's ROUGE-L F1 on the "
            f"general prompts (references: {of})")


def evaluation_table(job: pb.Job) -> str:
    """Adapter and base model side by side, per evaluated split."""
    blocks = []
    for split in job.evaluation:
        title = f"{safe(split.split)} ({split.examples} examples"
        title += ", references: the base model's answers)" if split.references == "base" else ")"
        rows = [(title, "adapter", "base", "change")]
        rows.append(_row("loss", split.adapter.loss, split.base.loss))
        rows.append(_row("perplexity", split.adapter.perplexity, split.base.perplexity))
        for field, label in ROUGE:
            a, b = getattr(split.adapter, field), getattr(split.base, field)
            for part in ("precision", "recall", "f1"):
                rows.append(_row(f"{label} {part}", getattr(a, part), getattr(b, part)))
        blocks.append(_table(rows))
        for sample in split.adapter.samples[:1]:
            blocks.append(f"  e.g. prompt:    {_clip(sample.prompt)}\n"
                          f"       reference: {_clip(sample.reference)}\n"
                          f"       adapter:   {_clip(sample.generation)}")
    return "\n\n".join(blocks) if blocks else "(no evaluation)"


def describe(job: pb.Job) -> str:
    h = job.hyperparameters
    lines = [
        f"job          {safe(job.id)}",
        f"name         {safe(job.name)}" + (f" ({safe(job.description)})" if job.description else ""),
        f"state        {_state(job.state)}" + (f": {safe(job.error)}" if job.error else ""),
        f"adapter      {safe(job.adapter or '-')}",
        f"created      {_when(job.created_at)}"
        + (f", started {_when(job.started_at)}" if job.started_at else "")
        + (f", finished {_when(job.finished_at)}" if job.finished_at else ""),
        f"examples     {job.train_examples} training, {job.validation_examples} validation, "
        f"{job.retention_examples} retention",
        f"progress     step {job.step}/{job.total_steps}" + (f", loss {job.loss:.4f}" if job.HasField("loss") else ""),
        f"settings     epochs {h.epochs:g}, lr {h.learning_rate:g}, rank {h.rank}, alpha {h.alpha:g}, "
        f"dropout {h.dropout:g}, targets {safe(','.join(h.target_modules))}, batch {h.batch_size} x {h.grad_accum}, "
        f"max-seq-len {h.max_seq_len}, seed {h.seed}, early stopping {'off' if h.no_early_stopping else 'on'}, "
        f"method {safe(h.method or 'lora')}, replay ratio {h.replay_ratio:g}"
        + (f" ({safe(h.replay_loss or 'kl')})" if h.replay_ratio else "")
        + (f", task subspace {h.task_subspace}" if h.task_subspace else "")
        + (f", shrink to gain {h.shrink_to_gain:g}" if h.shrink_to_gain else "") + f", min retention {h.min_retention:g}",
    ]
    if job.HasField("training"):
        t = job.training
        lines.append(
            f"training     {t.steps} steps{' (stopped early)' if t.stopped_early else ''} in {_duration(t.runtime_s)}, "
            f"train loss {t.train_loss:.4f}"
            + (f", best validation loss {t.best_eval_loss:.4f}" if t.HasField("best_eval_loss") else "")
            + f", {t.tokens_per_second:.0f} tokens/s, peak memory {t.peak_memory_bytes / 2**20:.0f} MiB"
            + (f", {t.replay_examples} replay examples" if t.replay_examples else "")
            + (f", shrunk to strength {t.adapter_scale:g}" if 0 < t.adapter_scale < 1 else "")
        )
    if job.HasField("retention"):
        lines.append(f"retention    {job.retention:.3f} of the base model's ROUGE-L F1 on the general prompts")
    if job.evaluation:
        lines += ["", evaluation_table(job)]
    return "\n".join(lines)


def _row(label: str, adapter: float, base: float) -> tuple[str, ...]:
    return (label, f"{adapter:.4f}", f"{base:.4f}", f"{adapter - base:+.4f}")


def _table(rows: list[tuple[str, ...]], numbers: bool = True) -> str:
    """Aligned columns; with `numbers`, every column but the first is right-aligned."""
    rows = [tuple(safe(c) for c in r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.rjust(w) if numbers and i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
        for r in rows
    )


def _clip(text: str, n: int = 70) -> str:
    text = safe(" ".join(text.split()))
    return text if len(text) <= n else text[: n - 1] + "…"


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


def _when(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "-"


def _state(state: int) -> str:
    """"running"; the number for a state this client does not know (a newer server)."""
    return STATE_NAMES.get(state, str(state))


def _json(message) -> str:
    return json_line(MessageToDict(message, preserving_proto_field_name=True))
