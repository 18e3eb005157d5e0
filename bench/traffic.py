"""Real traffic against `adapterd serve` on the real model, measured in one run.

Prints one JSON object of ratios, each from medians of per-request times taken in this run
(never a difference of medians). The server runs in a subprocess on SmolLM2-135M-Instruct
(NF4) by default, with rank-16 all-linear adapters pushed to its registry; clients stream
over gRPC.

    mixed_over_base     decode rate of 16 rows over 8 adapters vs the same rows on the base:
                        median time per output token (TPOT) base / mixed (16 clients, short
                        prompts, --decode-tokens new tokens, ignore_eos)
    mix_over_long       prompt + generated tokens per second: half 700-token and half 16-token
                        prompts vs all 700-token (32 requests, 16 clients, 32 new tokens)
    short_ttft_mix_over_alone  the short requests' TTFT p50 in that mix vs the same short
                        requests with no long ones (all 16-token prompts)
    prefix_ttft_cached_over_cold  TTFT of a request whose 700-token prefix another request
                        already prefilled (distinct 16-token tails), vs a cold prefix; one
                        request at a time, medians over --prefix-requests each
    kv_bytes_over_raw   KV memory the running rows hold (blocks x block size) per token they
                        store, vs the raw K/V bytes of those tokens, sampled from the metrics
                        while the mix runs
    serve_over_peft_loop  bench/serve.py's comparison: the server vs a sequential PEFT loop
                        (set_adapter + generate), --serve-requests requests over 8 adapters

Targets (issue "Engine for real traffic"): mixed_over_base >= 0.85, mix_over_long >= 0.8,
short_ttft_mix_over_alone <= 4, prefix_ttft_cached_over_cold <= 0.2, kv_bytes_over_raw <= 1.25,
serve_over_peft_loop >= 8.

    python bench/traffic.py [--base-model DIR|FILE.gguf|demo] [--quick]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from engine import make_adapters  # bench/engine.py
from serve import PeftLoop, Server, percentile, push_all  # bench/serve.py

WORDS = ["the", "model", "serves", "many", "adapters", "on", "one", "base", "and", "every", "request", "names", "its", "own", "adapter", "while", "the", "scheduler", "keeps", "decode", "rows", "running", "and", "cuts", "long", "prompts", "into", "chunks"]


def text_of(tokenizer, n: int, seed: int) -> str:
    """A prompt of exactly n tokens (words drawn with `seed`), cut at a token boundary."""
    rng = random.Random(seed)
    words = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < n + 8:
        words.extend(rng.choice(WORDS) for _ in range(16))
    ids = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"][:n]
    return tokenizer.decode(ids)


def stream_all(addr: str, requests: list[dict], clients: int) -> dict:
    """Each request: {"prompt", "adapter", "new"}; `clients` threads, one request at a time
    each. Returns wall time and per-request ttft, tpot, tokens."""
    from adapterctl.client import Client

    results: list[dict | None] = [None] * len(requests)
    order = iter(range(len(requests)))
    lock = threading.Lock()
    failures: list[BaseException] = []

    def worker(client) -> None:
        while True:
            with lock:
                i = next(order, None)
            if i is None:
                return
            r = requests[i]
            start = time.perf_counter()
            first = last = None
            tokens = prompt_tokens = 0
            try:
                for msg in client.generate_stream(r["prompt"], adapter=r.get("adapter", ""),
                                                  max_new_tokens=r["new"], ignore_eos=True):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    tokens += len(msg.token_ids)
                    prompt_tokens = prompt_tokens or msg.prompt_tokens
            except grpc.RpcError as e:
                failures.append(e)
                return
            results[i] = {"ttft": first - start, "tpot": (last - first) / max(1, tokens - 1),
                          "tokens": tokens, "prompt_tokens": prompt_tokens}

    with Client(addr, timeout=600) as client:
        threads = [threading.Thread(target=worker, args=(client,)) for _ in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, first: {failures[0]}")
    return {"wall_s": wall, "results": results,
            "tokens": sum(r["tokens"] + r["prompt_tokens"] for r in results)}


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r'^(adapterd_kv_[a-z_]+)(\{state="(\w+)"\})? ([0-9.e+-]+)$', line)
        if m:
            out[m.group(1) + (f":{m.group(3)}" if m.group(3) else "")] = float(m.group(4))
    return out


class KvSampler(threading.Thread):
    """Samples held blocks and stored tokens from the metrics while traffic runs."""

    def __init__(self, port: int, block_size: int):
        super().__init__(daemon=True)
        self.port, self.block_size = port, block_size
        self.samples: list[float] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.25):
            m = scrape(self.port)
            held, tokens = m.get("adapterd_kv_blocks:held", 0), m.get("adapterd_kv_tokens", 0)
            if tokens >= 64:
                self.samples.append(held * self.block_size / tokens)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-model", default=None, help="a directory, a .gguf file or demo (default: SmolLM2-135M-Instruct)")
    p.add_argument("--long-tokens", type=int, default=700)
    p.add_argument("--short-tokens", type=int, default=16)
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--decode-tokens", type=int, default=64)
    p.add_argument("--prefix-requests", type=int, default=5)
    p.add_argument("--serve-requests", type=int, default=64)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--torch-threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="fewer and shorter requests: a smoke run")
    args = p.parse_args()
    if args.quick:
        args.long_tokens, args.requests, args.new_tokens, args.decode_tokens = 200, 8, 8, 16
        args.prefix_requests, args.serve_requests, args.clients = 2, 8, 4

    from adapterd.engine.model import base_model_dir

    base = base_model_dir(args.base_model)
    tokenizer = _tokenizer(base)
    block_size = 16
    out: dict = {"base_model": str(base)}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        adapters = make_adapters(base, tmp / "adapters", 8, args.rank)
        push_all(adapters, tmp / "store", args.rank)
        server = Server(base, tmp / "store", tmp, gpu_slots=8, max_rank=args.rank, max_batch=32,
                        torch_threads=args.torch_threads, metrics=True,
                        extra=["--max-input-tokens", str(args.long_tokens + 64),
                               "--max-total-tokens", str(args.long_tokens + 64 + max(args.new_tokens, args.decode_tokens))])
        try:
            stream_all(server.addr, [{"prompt": "warm up", "adapter": f"a{i}", "new": 2} for i in range(8)], 8)

            # 1. decode: 16 rows on the base, then over 8 adapters
            short = [text_of(tokenizer, args.short_tokens, 1000 + i) for i in range(args.clients)]
            tpots: dict[str, list[float]] = {"base": [], "mixed": []}
            for kind in ("base", "mixed") * 2:  # interleaved twice: a drift in the machine hits both
                reqs = [{"prompt": short[i], "adapter": "" if kind == "base" else f"a{i % 8}", "new": args.decode_tokens}
                        for i in range(args.clients)]
                tpots[kind] += [r["tpot"] for r in stream_all(server.addr, reqs, args.clients)["results"]]
            dec = {k: statistics.median(v) for k, v in tpots.items()}
            out["decode_tpot_ms"] = {k: round(v * 1000, 2) for k, v in dec.items()}
            out["mixed_over_base"] = dec["base"] / dec["mixed"]

            # 2. prompt lengths: all long, the half-and-half mix, all short
            longs = [text_of(tokenizer, args.long_tokens, i) for i in range(args.requests)]
            shorts = [text_of(tokenizer, args.short_tokens, 500 + i) for i in range(args.requests)]
            runs = {}
            sampler = KvSampler(server.metrics_port, block_size)
            for kind in ("long", "mix", "short"):
                if kind == "long":
                    prompts = longs
                elif kind == "mix":
                    prompts = [longs[i] if i % 2 == 0 else shorts[i] for i in range(args.requests)]
                else:
                    prompts = [shorts[i] for i in range(1, args.requests, 2)]
                reqs = [{"prompt": pr, "adapter": f"a{i % 8}", "new": args.new_tokens} for i, pr in enumerate(prompts)]
                if kind == "mix":
                    sampler.start()
                runs[kind] = stream_all(server.addr, reqs, args.clients)
                if kind == "mix":
                    sampler.stop.set()
                    sampler.join()
            rate = {k: v["tokens"] / v["wall_s"] for k, v in runs.items()}
            out["tok_s"] = {k: round(v, 1) for k, v in rate.items()}
            out["mix_over_long"] = rate["mix"] / rate["long"]
            mix_short = [r["ttft"] for i, r in enumerate(runs["mix"]["results"]) if i % 2 == 1]
            alone_short = [r["ttft"] for r in runs["short"]["results"]]
            out["short_ttft_ms"] = {"mix_p50": round(statistics.median(mix_short) * 1000, 1),
                                    "alone_p50": round(statistics.median(alone_short) * 1000, 1),
                                    "mix_p95": round(percentile(mix_short, 0.95) * 1000, 1)}
            out["short_ttft_mix_over_alone"] = statistics.median(mix_short) / statistics.median(alone_short)
            out["kv_samples"] = len(sampler.samples)
            out["kv_bytes_over_raw"] = statistics.median(sampler.samples) if sampler.samples else None

            # 3. a shared prefix: cold (a new prefix each time) vs cached (one prefix, new tails)
            def one(prompt: str) -> float:
                return stream_all(server.addr, [{"prompt": prompt, "adapter": "a0", "new": 2}], 1)["results"][0]["ttft"]

            shared = text_of(tokenizer, args.long_tokens, 9999)
            cold = [one(text_of(tokenizer, args.long_tokens, 7000 + i) + text_of(tokenizer, 16, 8000 + i))
                    for i in range(args.prefix_requests)]
            one(shared + text_of(tokenizer, 16, 8999))  # the first one prefills the prefix
            cached = [one(shared + text_of(tokenizer, 16, 9000 + i)) for i in range(args.prefix_requests)]
            out["prefix_ttft_ms"] = {"cold_p50": round(statistics.median(cold) * 1000, 1),
                                     "cached_p50": round(statistics.median(cached) * 1000, 1)}
            out["prefix_ttft_cached_over_cold"] = statistics.median(cached) / statistics.median(cold)
            out["prefix_metrics"] = {k: v for k, v in scrape(server.metrics_port).items() if "blocks" in k}
        finally:
            server.stop()

        # 4. the server vs a sequential PEFT loop, as bench/serve.py
        names = [f"a{i % 8}" for i in range(args.serve_requests)]
        random.Random(0).shuffle(names)
        reqs = [(n, f"Question {i}: {WORDS[i % len(WORDS)]}?") for i, n in enumerate(names)]
        peft = PeftLoop(base, adapters)
        half = len(reqs) // 2
        peft.run(reqs[:2], args.new_tokens)  # warm
        peft_wall, _ = peft.run(reqs[:half], args.new_tokens)
        server = Server(base, tmp / "store", tmp, gpu_slots=8, max_rank=args.rank, max_batch=32,
                        torch_threads=args.torch_threads)
        try:
            stream_all(server.addr, [{"prompt": "warm up", "adapter": f"a{i}", "new": 2} for i in range(8)], 8)
            served = stream_all(server.addr, [{"prompt": pr, "adapter": n, "new": args.new_tokens} for n, pr in reqs],
                                args.clients)
        finally:
            server.stop()
        wall2, _ = peft.run(reqs[half:], args.new_tokens)
        peft_wall += wall2
        out["serve_wall_s"], out["peft_loop_wall_s"] = round(served["wall_s"], 2), round(peft_wall, 2)
        out["serve_over_peft_loop"] = peft_wall / served["wall_s"]
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in out.items()}, indent=1))


def _tokenizer(base: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(base)


if __name__ == "__main__":
    main()
