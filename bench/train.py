"""Training throughput: a job through the service against a plain PEFT + Trainer script with
the same settings, alternated in one run. Prints one JSON object; numbers are medians.

    service   `adapterd serve` in a subprocess (its own registry and jobs directory,
              --training-nice 0 like the plain script); each job goes in through gRPC
              (CreateJob, WatchJob) and runs in the service's worker process.
    plain     this file with --plain, in a subprocess: BitsAndBytesConfig NF4, PEFT LoRA,
              transformers' Trainer; what a user would write by hand.

    tokens_per_second      non-padding tokens trained / the Trainer's train_runtime
    peak_memory_bytes      of the training process: the resident set on the CPU, GPU
                           memory allocated on a GPU
    job_wall_s             service only: CreateJob to SUCCEEDED (model load, training,
                           evaluation of adapter and base, publishing)
    tokens_per_second_ratio  service / plain (target: >= 0.9: the service adds no overhead)

    python bench/train.py [--runs 3] [--examples 64] [--epochs 3] [--batch-size 8] [--base-model DIR|FILE.gguf|demo]

Training beside serving (--latency): for each worker setting (--training-share and
--training-nice of `adapterd serve`), streamed requests' p95 TTFT and time per output
token on the idle server, then again while a job trains, and their ratios (target: each
<= 1.5 on 2 cores), with the training steps the job made meanwhile.

    python bench/train.py --latency [--requests 16] [--clients 4] [--new-tokens 32] [--base-model ...]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DATASET = Path(__file__).resolve().parents[1] / "adapters" / "examples" / "pandas_numpy.jsonl"


def settings(args) -> dict:
    return dict(epochs=args.epochs, learning_rate=args.lr, rank=16, alpha=32.0, dropout=0.05,
                batch_size=args.batch_size, grad_accum=1, seed=0, warmup_ratio=0.03)


# ---- the plain script ------------------------------------------------------------------------


def plain(base_model: str, data: Path, s: dict) -> dict:
    """QLoRA with PEFT and the Trainer, written out by hand: the baseline."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        BitsAndBytesConfig,
        Trainer,
        TrainingArguments,
    )

    on_gpu = torch.cuda.is_available()
    dtype = torch.bfloat16 if on_gpu else torch.float32
    tok = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(
        base_model, dtype=dtype, device_map={"": "cuda" if on_gpu else "cpu"},
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                               bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype),
    )
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model = get_peft_model(model, LoraConfig(r=s["rank"], lora_alpha=s["alpha"], lora_dropout=s["dropout"],
                                             target_modules="all-linear", task_type="CAUSAL_LM"))
    features = []
    for line in data.read_text().splitlines():
        row = json.loads(line)
        p = tok(row["prompt"])["input_ids"]
        c = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        features.append({"input_ids": p + c, "labels": [-100] * len(p) + c})

    def collate(batch):
        width = max(len(f["input_ids"]) for f in batch)
        pad = [width - len(f["input_ids"]) for f in batch]
        return {
            "input_ids": torch.tensor([f["input_ids"] + [tok.pad_token_id] * n for f, n in zip(batch, pad, strict=True)]),
            "labels": torch.tensor([f["labels"] + [-100] * n for f, n in zip(batch, pad, strict=True)]),
            "attention_mask": torch.tensor([[1] * len(f["input_ids"]) + [0] * n for f, n in zip(batch, pad, strict=True)]),
        }

    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(model=model, data_collator=collate, train_dataset=features, args=TrainingArguments(
            output_dir=out, num_train_epochs=s["epochs"], learning_rate=s["learning_rate"],
            lr_scheduler_type="cosine", warmup_steps=s["warmup_ratio"], per_device_train_batch_size=s["batch_size"],
            gradient_accumulation_steps=s["grad_accum"], gradient_checkpointing=True,
            gradient_checkpointing_kwargs={"use_reentrant": False}, seed=s["seed"],
            optim="paged_adamw_8bit" if on_gpu else "adamw_torch", bf16=on_gpu, use_cpu=not on_gpu,
            save_strategy="no", report_to="none", disable_tqdm=True, remove_unused_columns=False,
            include_num_input_tokens_seen="non_padding",
        ))
        if on_gpu:
            torch.cuda.reset_peak_memory_stats()
        result = trainer.train()
    runtime = result.metrics["train_runtime"]
    peak = torch.cuda.max_memory_allocated() if on_gpu else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_second": trainer.state.num_input_tokens_seen / runtime, "peak_memory_bytes": peak,
            "train_runtime_s": runtime, "steps": trainer.state.global_step}


def run_plain(base_model: Path, data: Path, s: dict) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--plain", json.dumps({"base_model": str(base_model), "data": str(data), **s})],
        check=True, capture_output=True, text=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


# ---- the service -----------------------------------------------------------------------------


class Service:
    """`adapterd serve` on a loopback port, with its own registry and jobs directory."""

    def __init__(self, root: Path, base_model: Path, flags: tuple[str, ...] = ("--training-nice", "0")):
        port_file = root / "port"
        port_file.unlink(missing_ok=True)
        with open(root / "server.log", "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adapterd", "serve", "--port", "0", "--port-file", str(port_file),
                 "--base-model", str(base_model), "--registry", str(root / "registry"),
                 "--jobs-dir", str(root / "jobs"), "--metrics-port", "-1", *flags],  # another bench may hold 9400
                stdout=subprocess.DEVNULL, stderr=log,
            )
        deadline = time.monotonic() + 300
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = (root / "server.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"adapterd did not start; its log ends:\n{tail}")
            time.sleep(0.2)
        from adapterctl.client import Client

        self.client = Client(f"127.0.0.1:{port_file.read_text().strip()}")
        while self.client.health() != "SERVING":
            time.sleep(0.2)

    def train(self, data: Path, s: dict, name: str) -> dict:
        from adapterctl.train import TrainingClient
        from adapterd_api.v1 import training_pb2 as pb

        training = TrainingClient(self.client)
        started = time.perf_counter()
        job = training.create(data, name=name, val_split=0.0, max_eval_examples=8, eval_max_new_tokens=32,
                              **{k: v for k, v in s.items()})
        for _ in training.watch(job.id):
            pass
        wall = time.perf_counter() - started
        job = training.get(job.id)
        if job.state != pb.SUCCEEDED:
            raise RuntimeError(f"job {job.id} {pb.JobState.Name(job.state)}: {job.error}")
        t = job.training
        return {"tokens_per_second": t.tokens_per_second, "peak_memory_bytes": t.peak_memory_bytes,
                "train_runtime_s": t.runtime_s, "steps": t.steps, "job_wall_s": wall}

    def stop(self) -> None:
        self.client.close()
        self.proc.terminate()
        self.proc.wait(60)


# ---- training beside serving ------------------------------------------------------------------

WORKER_SETTINGS = {  # name -> adapterd serve flags for the training worker
    "paused while serving (the default)": (),
    "share 0.1 while serving": ("--training-share", "0.1"),
    "never paused, nice 19": ("--training-share", "1", "--training-nice", "19"),
}


def stream_latency(client, n: int, clients: int, new_tokens: int) -> dict:
    """p95 TTFT and time per output token (ms) of n streamed greedy requests, `clients` at once."""
    import threading

    ttft, tpot, lock = [], [], threading.Lock()
    todo = iter(range(n))

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            start = time.perf_counter()
            first = last = None
            tokens = 0
            for msg in client.generate_stream(f"Question {i}: name a colour and say why you like it.",
                                              max_new_tokens=new_tokens, ignore_eos=True):
                last = time.perf_counter()
                first = first or last
                tokens += len(msg.token_ids)
            with lock:
                ttft.append(first - start)
                tpot.append((last - first) / max(1, tokens - 1))

    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    p95 = lambda xs: statistics.quantiles(xs, n=20)[-1] * 1000  # noqa: E731
    return {"ttft_p95_ms": p95(ttft), "tpot_p95_ms": p95(tpot), "ttft_p50_ms": statistics.median(ttft) * 1000,
            "tpot_p50_ms": statistics.median(tpot) * 1000}


def latency(args, base_model: Path, data: Path, root: Path) -> dict:
    from adapterctl.train import TrainingClient
    from adapterd_api.v1 import training_pb2 as pb

    out = {}
    for name, flags in WORKER_SETTINGS.items():
        service = Service(root, base_model, flags)
        try:
            idle = stream_latency(service.client, args.requests, args.clients, args.new_tokens)
            training = TrainingClient(service.client)
            job = training.create(data, name="bench-latency", epochs=1000, batch_size=args.batch_size,
                                  learning_rate=args.lr, val_split=0.0)
            for event in training.watch(job.id):  # measure once the worker trains, not while it loads
                if event.type == pb.STEP:
                    break
            busy = stream_latency(service.client, args.requests, args.clients, args.new_tokens)
            still = training.get(job.id)
            training.cancel(job.id)
        finally:
            service.stop()
        out[name] = {"idle": idle, "training": busy, "training_steps_meanwhile": still.step,
                     "ttft_p95_ratio": busy["ttft_p95_ms"] / idle["ttft_p95_ms"],
                     "tpot_p95_ratio": busy["tpot_p95_ms"] / idle["tpot_p95_ms"]}
    return out


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--examples", type=int, default=64, help="from adapters/examples/pandas_numpy.jsonl")
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--base-model", default=None, metavar="DIR|FILE.gguf|demo",
                        help="a Hugging Face directory, a .gguf file, or demo (the random demo model); "
                        "default: SmolLM2-135M-Instruct, the server's default")
    parser.add_argument("--latency", action="store_true",
                        help="measure inference p95 TTFT and TPOT idle vs while a job trains, per worker setting")
    parser.add_argument("--requests", type=int, default=16, help="--latency: streamed requests per measurement")
    parser.add_argument("--clients", type=int, default=4, help="--latency: requests in flight at once")
    parser.add_argument("--new-tokens", type=int, default=32, help="--latency: tokens generated per request")
    parser.add_argument("--plain", default=None, help=argparse.SUPPRESS)  # internal: run the baseline
    args = parser.parse_args()
    if args.plain is not None:
        p = json.loads(args.plain)
        print(json.dumps(plain(p.pop("base_model"), Path(p.pop("data")), p)))
        return 0

    from adapterd.engine.model import base_model_dir

    base_model = base_model_dir(args.base_model)
    s = settings(args)
    with tempfile.TemporaryDirectory(prefix="adapterd-bench-train-") as tmp:
        root = Path(tmp)
        data = root / "train.jsonl"
        data.write_text("".join(DATASET.read_text().splitlines(keepends=True)[: args.examples]))
        if args.latency:
            print(json.dumps({"base_model": str(base_model), "requests": args.requests, "clients": args.clients,
                              "new_tokens": args.new_tokens, "settings": latency(args, base_model, data, root),
                              "target": "ttft_p95_ratio and tpot_p95_ratio <= 1.5"}, indent=1))
            return 0
        service = Service(root, base_model)
        try:
            served, plains = [], []
            for i in range(args.runs):  # alternated, so drift in machine load hits both alike
                served.append(service.train(data, s, name=f"bench-{i}"))
                plains.append(run_plain(base_model, data, s))
        finally:
            service.stop()
    sv, pl = medians(served), medians(plains)
    print(json.dumps({
        "base_model": str(base_model), "examples": args.examples, **s, "runs": args.runs,
        "device": "cuda" if _cuda() else f"cpu ({os.environ.get('OMP_NUM_THREADS', 'all')} threads)",
        "service": sv, "plain": pl,
        "tokens_per_second_ratio": sv["tokens_per_second"] / pl["tokens_per_second"],
        "peak_memory_ratio": sv["peak_memory_bytes"] / pl["peak_memory_bytes"],
        "target": "tokens_per_second_ratio >= 0.9",
    }, indent=1))
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
