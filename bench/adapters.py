"""Cold adapters: from push to first token, against a warm request's first token, in one run.

Prints one JSON object; times are medians over --adapters adapters (rank-16, all-linear,
random PEFT adapters on the base model, SmolLM2-135M-Instruct by default), each pushed over
gRPC and never loaded before.

    push_s                 PushAdapter: upload, check against the base, publish
    push_to_first_token_s  push + the first streamed token of the first request on it
    cold_first_token_s     first token of the first request on a just-pushed adapter:
                           resolve, read + verify sha256 + check + load, slot copy, prefill
    warm_first_token_s     first token on an adapter already in a slot
    storage_to_slot_s      the loading part alone, measured in-process: registry read and
                           verify, check and tensor load, copy into a slot
    cold_over_warm         cold_first_token_s / warm_first_token_s (target: < 3)

    python bench/adapters.py [--adapters 20] [--rank 16] [--registry DIR|s3://...] [--base-model DIR|FILE.gguf|demo]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

PROMPT = "Write a haiku about"


def make_adapters(base_dir: Path, out: Path, n: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    dirs = []
    for i in range(n):
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        peft_model = get_peft_model(model, cfg)
        peft_model.save_pretrained(out / f"a{i}")
        model = peft_model.unload()  # the bare base again, for the next adapter
        dirs.append(out / f"a{i}")
    return dirs


class Server:
    """adapterd in-process: engine loop + gRPC server on a loopback port, its own event loop."""

    def __init__(self, parts, registry, gpu_slots: int, max_rank: int):
        from adapterd.app import Lifecycle, create_server
        from adapterd.config import CacheConfig, Config, SchedulerConfig, ServerConfig
        from adapterd.engine.loop import EngineLoop
        from adapterd.registry.store import RegistryResolver

        cache = CacheConfig(gpu_slots=gpu_slots, max_rank=max_rank)
        scheduler = SchedulerConfig()
        self.engine = EngineLoop(parts, RegistryResolver(registry), scheduler, cache).start()
        self.engine.wait_ready(timeout=300)
        registry.spec = parts.spec
        config = Config(server=ServerConfig(port=0), scheduler=scheduler, cache=cache)
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()

        async def start():
            server, port = create_server(config, engine=self.engine, registry=registry,
                                         lifecycle=Lifecycle(self.engine))
            await server.start()
            return server, port

        self.server, self.port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(60)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.engine.stop(timeout=30)
        self.loop.call_soon_threadsafe(self.loop.stop)


def first_token_s(client, adapter: str) -> float:
    t0 = time.perf_counter()
    stream = client.generate_stream(PROMPT, adapter=adapter, max_new_tokens=8)
    next(stream)
    elapsed = time.perf_counter() - t0
    stream.cancel()
    return elapsed


def storage_to_slot(parts, registry, versions) -> list[float]:
    """Registry read + verify + check + load, then the copy into a slot, per adapter.
    Runs after the server stopped: the engine thread no longer owns the slots."""
    times = []
    for v in versions:
        t0 = time.perf_counter()
        weights = registry.load(v)
        parts.slots.load(1, weights)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    parts.slots.unload(1)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--adapters", type=int, default=20)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--gpu-slots", type=int, default=8)
    ap.add_argument("--warm-repeats", type=int, default=20)
    ap.add_argument("--registry", default=None, help="registry location (default: a temporary directory)")
    ap.add_argument("--s3-endpoint", default=None)
    ap.add_argument("--base-model", default=None, metavar="DIR|FILE.gguf|demo",
                    help="a Hugging Face directory, a .gguf file, or demo (the random demo model); "
                    "default: SmolLM2-135M-Instruct, the server's default")
    args = ap.parse_args()

    from adapterctl.adapters import AdaptersClient
    from adapterctl.client import Client
    from adapterd.config import CacheConfig, ModelConfig, RegistryConfig
    from adapterd.engine.model import base_model_dir
    from adapterd.engine.parts import load_engine_parts
    from adapterd.registry.store import open_registry

    base = base_model_dir(args.base_model)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = make_adapters(base, tmp / "peft", args.adapters, args.rank)
        adapter_bytes = sum((dirs[0] / n).stat().st_size for n in ("adapter_config.json", "adapter_model.safetensors"))
        parts = load_engine_parts(ModelConfig(base_model=base), CacheConfig(gpu_slots=args.gpu_slots, max_rank=args.rank))
        location = args.registry or str(tmp / "registry")
        registry = open_registry(RegistryConfig(location=location, s3_endpoint=args.s3_endpoint), max_rank=args.rank)
        server = Server(parts, registry, args.gpu_slots, args.rank)
        push, push_to_first, cold, warm, versions = [], [], [], [], []
        try:
            with Client(f"127.0.0.1:{server.port}") as client:
                ctl = AdaptersClient(client)
                # Warm-up: one adapter through the whole path, so no lazy initialisation is timed.
                ctl.push(dirs[0], "bench-warm")
                first_token_s(client, "bench-warm")
                first_token_s(client, "")
                for i, d in enumerate(dirs):
                    t0 = time.perf_counter()
                    adapter = ctl.push(d, f"bench-{i}", check_first=False)
                    pushed = time.perf_counter()
                    ttft = first_token_s(client, f"bench-{i}")
                    push.append(pushed - t0)
                    cold.append(ttft)
                    push_to_first.append(pushed - t0 + ttft)
                    versions.append(registry.resolve("default", adapter.ref))
                    warm.append(first_token_s(client, f"bench-{i}"))  # now resident
                for _ in range(args.warm_repeats):
                    warm.append(first_token_s(client, "bench-warm"))
                base_first = statistics.median(first_token_s(client, "") for _ in range(args.warm_repeats))
        finally:
            server.stop()
        to_slot = storage_to_slot(parts, registry, versions)

    med = statistics.median
    result = {
        "device": str(parts.slots.device) if hasattr(parts.slots, "device") else ("cuda" if torch.cuda.is_available() else "cpu"),
        "registry": "s3" if location.startswith("s3://") else "local",
        "adapters": args.adapters,
        "rank": args.rank,
        "adapter_bytes": adapter_bytes,
        "push_s": round(med(push), 4),
        "push_to_first_token_s": round(med(push_to_first), 4),
        "cold_first_token_s": round(med(cold), 4),
        "storage_to_slot_s": round(med(to_slot), 4),
        "warm_first_token_s": round(med(warm), 4),
        "base_first_token_s": round(base_first, 4),
        "cold_over_warm": round(med(cold) / med(warm), 2),
        "target_cold_over_warm": 3.0,
    }
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
