"""Decode throughput of the batched-LoRA engine against PEFT, measured in one run.

Prints one JSON object. Decode tokens/s = rows / the median time of one decode step, over
every step of --repeats runs: our paged engine timed around each step(), PEFT's generate()
by a streamer that timestamps each step. Prefill is excluded the same way on both sides.

    mixed_tok_s        our engine, 16 rows over 8 rank-16 all-linear adapters
    single_tok_s       our engine, the same rows all on one adapter
    base_tok_s         our engine, no adapter
    peft_single_tok_s  PeftModel with that one adapter set, generate() on the same rows
    peft_mixed_tok_s   PEFT's own generate(adapter_names=...) on the mixed batch

    python bench/engine.py [--rows 16] [--adapters 8] [--new-tokens 64] [--base-model DIR|FILE.gguf|demo]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch


def make_adapters(base_dir: Path, out: Path, n: int, rank: int) -> list[Path]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for i in range(n):
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        torch.manual_seed(100 + i)
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, cfg).save_pretrained(out / f"a{i}")
        dirs.append(out / f"a{i}")
    return dirs


def step_tok_s(run, rows: int, new_tokens: int, repeats: int) -> float:
    """rows / the median time of one decode step, over every step of `repeats` runs (the
    first run is a warm-up). `run(n)` returns the per-step times of one run of n tokens."""
    run(4)
    times = [t for _ in range(repeats) for t in run(new_tokens)]
    return rows / statistics.median(times)


def engine_runner(base_dir: Path, adapters: list[Path], prompts: list[list[int]], slots_per_row: list[int],
                  stack_dtype: torch.dtype | None = None):
    from adapterd.engine.lora import inject_lora
    from adapterd.engine.model import load_base_model
    from adapterd.registry.validate import read_adapter

    model, tokenizer, spec = load_base_model(base_dir)
    slots = inject_lora(model, num_slots=len(adapters) + 1, max_rank=64, stack_dtype=stack_dtype)
    for i, path in enumerate(adapters, start=1):
        slots.load(i, read_adapter(path, spec, 64))
    def run_with(slot_of_row: list[int]):
        return lambda n: decode_step_times(model, tokenizer, slots, prompts, slot_of_row, n)

    return run_with


_ATTACHED: set[int] = set()  # the slot tables whose layers have the direct kernel


def decode_step_times(model, tokenizer, slots, prompts: list[list[int]], slot_of_row: list[int], n: int) -> list[float]:
    """The time of each decode step of one batch (row i: prompts[i] on slot slot_of_row[i])
    through the paged engine, n tokens each; the prefill is not timed. The first call
    attaches the direct 4-bit kernel, as the server does after its warm-up."""
    from adapterd.engine import nf4cpu
    from adapterd.engine.generate import Request
    from adapterd.engine.paged import PagedGenerator
    from adapterd.engine.sampling import SamplingParams

    gen = PagedGenerator(model, tokenizer, slots, kv_cache_bytes=256 << 20, eos_token_ids=set())
    params = SamplingParams(max_new_tokens=n)
    gen.add([Request(str(i), p, params, s) for i, (p, s) in enumerate(zip(prompts, slot_of_row, strict=True))])
    gen.step()  # the prefill (and the first token): not a decode step
    if id(slots) not in _ATTACHED:
        nf4cpu.attach(slots.layers.values())
        _ATTACHED.add(id(slots))
    times = []
    while gen.num_running:
        t0 = time.perf_counter()
        gen.step()
        times.append(time.perf_counter() - t0)
    return times


class _StepClock:
    """A generate() streamer that timestamps every step (the first put() is the prompt)."""

    def __init__(self):
        self.stamps: list[float] = []

    def put(self, value) -> None:
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass


def peft_runner(base_dir: Path, adapters: list[Path], prompts: list[list[int]]):
    from adapterd.engine.model import load_base_model
    from peft import PeftModel

    model, _, _ = load_base_model(base_dir)
    model.generation_config.eos_token_id = None
    peft_model = PeftModel.from_pretrained(model, adapters[0], adapter_name="a0")
    for i, path in enumerate(adapters[1:], start=1):
        peft_model.load_adapter(path, adapter_name=f"a{i}")
    peft_model.eval()
    ids = torch.tensor(prompts)
    mask = torch.ones_like(ids)

    def run_with(names: list[str] | None):
        def run(n: int) -> list[float]:
            kw = {"adapter_names": names} if names else {}
            clock = _StepClock()
            with torch.no_grad():
                peft_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                                    do_sample=False, pad_token_id=0, streamer=clock, **kw)
            stamps = clock.stamps[1:]  # [0]: the prompt, before the prefill
            return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]  # decode steps only
        return run

    return peft_model, run_with


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default=None, metavar="DIR|FILE.gguf|demo",
                    help="a Hugging Face directory, a .gguf file, or demo (the random demo model); "
                    "default: SmolLM2-135M-Instruct, the server's default")
    ap.add_argument("--rows", type=int, default=16, help="rows in the decode batch")
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters over the rows (mixed case)")
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank of every adapter")
    ap.add_argument("--new-tokens", type=int, default=64, help="decode steps measured")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of every row")
    ap.add_argument("--repeats", type=int, default=3, help="timings per path; the median is reported")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from adapterd.engine.model import base_model_dir

    base_dir = base_model_dir(args.base_model)
    torch.manual_seed(0)
    prompts = torch.randint(32, 127, (args.rows, args.prompt_tokens)).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(base_dir, Path(tmp), args.adapters, args.rank)
        mixed_slots = sorted((i % args.adapters) + 1 for i in range(args.rows))
        ours = engine_runner(base_dir, adapters, prompts, mixed_slots)
        r = {}
        r["mixed_tok_s"] = step_tok_s(ours(mixed_slots), args.rows, args.new_tokens, args.repeats)
        r["single_tok_s"] = step_tok_s(ours([1] * args.rows), args.rows, args.new_tokens, args.repeats)
        r["base_tok_s"] = step_tok_s(ours([0] * args.rows), args.rows, args.new_tokens, args.repeats)
        _, peft = peft_runner(base_dir, adapters, prompts)
        r["peft_single_tok_s"] = step_tok_s(peft(None), args.rows, args.new_tokens, args.repeats)
        names = [f"a{s - 1}" for s in mixed_slots]
        r["peft_mixed_tok_s"] = step_tok_s(peft(names), args.rows, args.new_tokens, args.repeats)
    out = {k: round(v, 1) for k, v in r.items()}
    out["mixed_over_peft_single"] = round(r["mixed_tok_s"] / r["peft_single_tok_s"], 3)
    out["mixed_over_peft_mixed"] = round(r["mixed_tok_s"] / r["peft_mixed_tok_s"], 3)
    out["single_over_peft_single"] = round(r["single_tok_s"] / r["peft_single_tok_s"], 3)
    out["config"] = {"rows": args.rows, "adapters": args.adapters, "rank": args.rank, "new_tokens": args.new_tokens,
                     "prompt_tokens": args.prompt_tokens, "repeats": args.repeats, "threads": torch.get_num_threads(),
                     "device": "cuda" if torch.cuda.is_available() else "cpu", "base_model": str(base_dir)}
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
