"""The server end to end against a sequential PEFT loop, measured in one run.

Prints one JSON object. The same requests (default: 128, 32 new tokens, greedy, 8 for each
of 16 rank-16 all-linear adapters on the base model, SmolLM2-135M-Instruct by default, in a
seeded random order) go

  - to `adapterd serve` in a subprocess, from 16 client threads over gRPC streams, with a
    slot for every adapter, then again with --gpu-slots 2 (adapters cycle through evictions);
  - through PEFT, one request at a time: set_adapter + generate, on its own NF4 copy of the
    base (what serving many adapters looks like without a batching server).

Each server first gets one request per adapter, so both sides are measured warm (adapters
loaded, kernels initialised); the PEFT loop gets the same warm-up.

The machine this runs on is shared and its speed drifts by tens of percent over a minute, so
a ratio of two timings taken a minute apart drifts with it. Two things keep that out of the
figures: each server runs the requests --passes times (default 3) and reports its median
pass; the PEFT loop runs the first half of the requests before the servers and the second
half after them, so a steady drift weighs on both sides alike (its wall time is the sum).

    speedup            PEFT loop wall time / server wall time (all slots)
    speedup_2_slots    the same with --gpu-slots 2
    ttft_p50_ms, ...   time to first token and latency per request, from the client
    peft_agreement     fraction of requests whose server tokens equal PEFT's, and
    outputs_equal_2_slots  the same between the two servers: sanity checks. Float noise from a
                       different batch shape can flip a near-tie (the demo model's random
                       logits are flat; a real model has a few too), so these need not be 1;
                       the tests check exact equality on a peaky tiny model.

    speedup_2_slots_pinned  the 2-slot run again with request i going to adapter i % 16, so
                       each of the 16 clients keeps to one adapter and no two requests in
                       flight share an adapter: a batch holds at most 2 rows (the worst case).
                       Against the same PEFT loop: the same prompts and lengths, paired with
                       other adapters, so early EOS can make token counts differ slightly.

In random order, a client's next request names any adapter, as with many users behind a few
client processes; requests in flight then share adapters now and then, and with 2 slots the
server batches those.

    python bench/serve.py [--requests 128] [--clients 16] [--adapters 16] [--new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import grpc
import torch
from engine import make_adapters  # bench/engine.py

PROMPTS = [
    "Summarise the meeting notes:",
    "Translate to French: good morning",
    "def fibonacci(n):",
    "Write a haiku about the sea",
    "Q: What is the capital of Peru?\nA:",
    "The three laws of robotics are",
    "SELECT name FROM users WHERE",
    "Dear customer, thank you for",
]


def build_requests(n: int, adapters: int, *, shuffle: bool = True) -> list[tuple[str, str]]:
    """Request i: adapter i % adapters, prompt i; adapters in a seeded random order unless
    `shuffle` is False."""
    names = [f"a{i % adapters}" for i in range(n)]
    if shuffle:
        random.Random(0).shuffle(names)
    return [(name, f"{PROMPTS[i % len(PROMPTS)]} #{i}") for i, name in enumerate(names)]


def push_all(adapter_dirs: list[Path], store: Path, max_rank: int) -> None:
    from adapterd.registry.store import Registry, open_storage

    registry = Registry(open_storage(store), max_rank=max_rank)
    for i, path in enumerate(adapter_dirs):
        registry.push("default", f"a{i}", path)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


class Server:
    def __init__(self, base: Path, store: Path, workdir: Path, *, gpu_slots: int, max_rank: int, max_batch: int,
                 torch_threads: int = 0, metrics: bool = False, extra: list[str] = ()):
        """`metrics`: serve them on a free loopback port (self.metrics_port); `extra`: more flags."""
        port_file = workdir / f"port-{gpu_slots}"
        port_file.unlink(missing_ok=True)
        self.metrics_port = _free_port() if metrics else -1
        self.log = open(workdir / f"server-{gpu_slots}.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "adapterd", "serve", "--port", "0", "--port-file", str(port_file),
             "--base-model", str(base), "--registry", str(store), "--gpu-slots", str(gpu_slots),
             "--max-rank", str(max_rank), "--max-batch-size", str(max_batch), "--metrics-port", str(self.metrics_port),
             "--jobs-dir", str(workdir / "jobs"), "--torch-threads", str(torch_threads), *extra],
            stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 300
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"adapterd did not start; see {self.log.name}")
            time.sleep(0.1)
        self.addr = f"127.0.0.1:{port_file.read_text().strip()}"
        from adapterctl.client import Client

        with Client(self.addr, timeout=5) as client:
            while True:
                try:
                    if client.health() == "SERVING":
                        break
                except grpc.RpcError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("adapterd did not become SERVING")
                time.sleep(0.2)

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)
        self.log.close()


def run_clients(addr: str, requests: list[tuple[str, str]], clients: int, new_tokens: int) -> dict:
    """`clients` threads, each sending the next request as soon as its last one ended."""
    from adapterctl.client import Client

    results: list[dict | None] = [None] * len(requests)
    next_index = iter(range(len(requests)))
    lock = threading.Lock()
    errors: list[BaseException] = []

    def worker(client: Client) -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None:
                return
            adapter, prompt = requests[i]
            start = time.perf_counter()
            first = None
            tokens: list[int] = []
            try:
                for msg in client.generate_stream(prompt, adapter=adapter, max_new_tokens=new_tokens):
                    if first is None:
                        first = time.perf_counter()
                    tokens.extend(msg.token_ids)
            except grpc.RpcError as e:
                errors.append(e)
                return
            results[i] = {"ttft": first - start, "latency": time.perf_counter() - start, "tokens": tokens}

    with Client(addr) as client:
        threads = [threading.Thread(target=worker, args=(client,)) for _ in range(clients)]
        start = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed, first: {errors[0]}")
    ttft = [r["ttft"] * 1000 for r in results]
    latency = [r["latency"] * 1000 for r in results]
    tokens = sum(len(r["tokens"]) for r in results)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tok_s": tokens / wall,
        "req_s": len(requests) / wall,
        "ttft_p50_ms": statistics.median(ttft),
        "ttft_p95_ms": percentile(ttft, 0.95),
        "latency_p50_ms": statistics.median(latency),
        "latency_p95_ms": percentile(latency, 0.95),
        "outputs": [r["tokens"] for r in results],
    }


def serve_and_measure(base, store, workdir, requests, args, gpu_slots: int) -> dict:
    """Start a server, warm it up, run the requests `args.passes` times: the median pass
    (by wall time), with every pass's wall time."""
    server = Server(base, store, workdir, gpu_slots=gpu_slots, max_rank=args.rank, max_batch=args.max_batch_size,
                    torch_threads=args.torch_threads)
    try:
        warm = [(f"a{i}", "warm up") for i in range(args.adapters)]
        run_clients(server.addr, warm, args.clients, 2)
        passes = sorted((run_clients(server.addr, requests, args.clients, args.new_tokens)
                         for _ in range(args.passes)), key=lambda r: r["wall_s"])
    finally:
        server.stop()
    median = dict(passes[(len(passes) - 1) // 2])
    median["pass_walls_s"] = [round(r["wall_s"], 2) for r in passes]
    return median


class PeftLoop:
    """One request at a time: set_adapter, then generate (greedy) on the NF4 base."""

    def __init__(self, base: Path, adapter_dirs: list[Path]):
        from adapterd.engine.model import load_base_model
        from peft import PeftModel

        model, self.tokenizer, _ = load_base_model(base)
        self.model = PeftModel.from_pretrained(model, adapter_dirs[0], adapter_name="a0")
        for i, path in enumerate(adapter_dirs[1:], start=1):
            self.model.load_adapter(path, adapter_name=f"a{i}")
        self.model.eval()
        for i in range(len(adapter_dirs)):
            self.generate(f"a{i}", "warm up", 2)

    def generate(self, adapter: str, prompt: str, n: int) -> list[int]:
        self.model.set_adapter(adapter)
        ids = torch.tensor([self.tokenizer(prompt)["input_ids"]])
        with torch.inference_mode():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=n, do_sample=False)
        return out[0, ids.shape[1]:].tolist()

    def run(self, requests: list[tuple[str, str]], new_tokens: int) -> tuple[float, list[list[int]]]:
        """(wall seconds, the outputs) for `requests`, in order."""
        start = time.perf_counter()
        outputs = [self.generate(adapter, prompt, new_tokens) for adapter, prompt in requests]
        return time.perf_counter() - start, outputs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=32)
    p.add_argument("--base-model", default=None, metavar="DIR|FILE.gguf|demo",
                   help="a Hugging Face directory, a .gguf file, or demo (the random demo model); "
                   "default: SmolLM2-135M-Instruct, the server's default")
    p.add_argument("--torch-threads", type=int, default=0, help="the server's --torch-threads (0: its default)")
    p.add_argument("--passes", type=int, default=3, help="passes over the requests per server; the median is reported")
    args = p.parse_args()

    from adapterd.engine.model import base_model_dir

    base = base_model_dir(args.base_model)
    requests = build_requests(args.requests, args.adapters)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        workdir = Path(tmp)
        adapter_dirs = make_adapters(base, workdir / "peft", args.adapters, args.rank)
        store = workdir / "registry"
        push_all(adapter_dirs, store, args.rank)
        loop = PeftLoop(base, adapter_dirs)
        half = len(requests) // 2
        first_wall, first = loop.run(requests[:half], args.new_tokens)  # half before the servers ...
        all_slots = serve_and_measure(base, store, workdir, requests, args, gpu_slots=args.adapters)
        two_slots = serve_and_measure(base, store, workdir, requests, args, gpu_slots=2)
        pinned = build_requests(args.requests, args.adapters, shuffle=False)
        two_slots_pinned = serve_and_measure(base, store, workdir, pinned, args, gpu_slots=2)
        second_wall, second = loop.run(requests[half:], args.new_tokens)  # ... and half after
        tokens = sum(len(o) for o in first + second)
        wall = first_wall + second_wall
        peft = {"wall_s": wall, "tokens": tokens, "tok_s": tokens / wall, "outputs": first + second,
                "halves_wall_s": [first_wall, second_wall]}

    served, served_2, looped = all_slots.pop("outputs"), two_slots.pop("outputs"), peft.pop("outputs")
    two_slots_pinned.pop("outputs")
    agree = sum(a == b for a, b in zip(served, looped, strict=True))
    result = {
        "requests": args.requests,
        "clients": args.clients,
        "adapters": args.adapters,
        "new_tokens": args.new_tokens,
        "rank": args.rank,
        "torch_threads": torch.get_num_threads(),
        "server": _rounded(all_slots),
        "server_2_slots": _rounded(two_slots),
        "server_2_slots_pinned": _rounded(two_slots_pinned),
        "peft_loop": _rounded(peft),
        "speedup": round(peft["wall_s"] / all_slots["wall_s"], 2),
        "speedup_2_slots": round(peft["wall_s"] / two_slots["wall_s"], 2),
        "speedup_2_slots_pinned": round(peft["wall_s"] / two_slots_pinned["wall_s"], 2),
        "ttft_p50_ms": round(all_slots["ttft_p50_ms"], 1),
        "ttft_p50_ms_2_slots": round(two_slots["ttft_p50_ms"], 1),
        "peft_agreement": round(agree / args.requests, 3),
        "outputs_equal_2_slots": round(sum(a == b for a, b in zip(served, served_2, strict=True)) / args.requests, 3),
    }
    print(json.dumps(result))


def _rounded(d: dict) -> dict:
    return {k: [round(x, 2) for x in v] if isinstance(v, list) else round(v, 2) for k, v in d.items()}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
