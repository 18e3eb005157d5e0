"""What each adapter kind costs a decode step, measured in one run on one engine.

Prints one JSON object. Every case is the same decode batch (--rows rows, --prompt-tokens
each) through the paged engine, timed around each step() (prefill excluded); a case's
figure is the median step time over every step of --repeats runs. Adapters are PEFT-made
with random weights on the base (rank --rank on all linear layers for LoRA and DoRA; IA3 on
PEFT's default modules for the model; --virtual-tokens for prompt tuning).

    lora_ms          every row on a LoRA adapter (--adapters of them)
    mixed_kinds_ms   the same rows, a quarter of them IA3 and a quarter prompt tuning (the
                     rest LoRA): the issue's "IA3 and prompt-tuning rows cost no more"
    dora_ms          every row on a DoRA adapter (as many, same rank)
    base_ms          no adapter
    mixed_kinds_over_lora, dora_over_lora: the ratios, from the same run

    python bench/kinds.py [--rows 16] [--adapters 4] [--base-model DIR|FILE.gguf|demo]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

import torch
from engine import decode_step_times, make_adapters  # bench/engine.py


def make_kind(base_dir: Path, out: Path, kind: str, i: int, rank: int, virtual_tokens: int) -> Path:
    from peft import IA3Config, LoraConfig, PromptTuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(200 + i)
    if kind == "dora":
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear", init_lora_weights=False, use_dora=True)
    elif kind == "ia3":
        cfg = IA3Config(task_type="CAUSAL_LM", init_ia3_weights=False)
    else:
        cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=virtual_tokens)
    path = out / f"{kind}{i}"
    get_peft_model(model, cfg).save_pretrained(path)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default=None, metavar="DIR|FILE.gguf|demo",
                    help="a Hugging Face directory, a .gguf file, or demo; default: SmolLM2-135M-Instruct")
    ap.add_argument("--rows", type=int, default=16, help="rows in the decode batch")
    ap.add_argument("--adapters", type=int, default=4, help="adapters of each kind over the rows")
    ap.add_argument("--rank", type=int, default=16, help="LoRA and DoRA rank")
    ap.add_argument("--virtual-tokens", type=int, default=20, help="prompt tuning's virtual tokens")
    ap.add_argument("--new-tokens", type=int, default=32, help="decode steps measured per run")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of every row")
    ap.add_argument("--repeats", type=int, default=3, help="runs per case; the median step over all is reported")
    args = ap.parse_args(argv)

    from adapterd.engine.lora import inject_lora
    from adapterd.engine.model import base_model_dir, load_base_model
    from adapterd.registry.validate import read_adapter

    base_dir = base_model_dir(args.base_model)
    torch.manual_seed(0)
    prompts = torch.randint(32, 127, (args.rows, args.prompt_tokens)).tolist()
    n = args.adapters
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        dirs = {"lora": make_adapters(base_dir, tmp, n, args.rank)}
        for kind in ("dora", "ia3", "prompt_tuning"):
            dirs[kind] = [make_kind(base_dir, tmp, kind, i, args.rank, args.virtual_tokens) for i in range(n)]
        model, tokenizer, spec = load_base_model(base_dir)
        slots = inject_lora(model, num_slots=4 * n + 1, max_rank=64)
        first = {}
        for k, kind in enumerate(dirs):
            first[kind] = 1 + k * n
            for i, path in enumerate(dirs[kind]):
                slots.load(first[kind] + i, read_adapter(path, spec, 64))
        def run(slot_of_row: list[int], steps: int) -> list[float]:
            return decode_step_times(model, tokenizer, slots, prompts, slot_of_row, steps)

        def rows_of(kinds: list[str]) -> list[int]:
            return [first[kind] + (i % n) for i, kind in enumerate(kinds)]

        q = args.rows // 4
        cases = {
            "lora_ms": rows_of(["lora"] * args.rows),
            "mixed_kinds_ms": rows_of(["lora"] * (args.rows - 2 * q) + ["ia3"] * q + ["prompt_tuning"] * q),
            "dora_ms": rows_of(["dora"] * args.rows),
            "base_ms": [0] * args.rows,
        }
        run(cases["lora_ms"], 4)  # warm-up
        times: dict[str, list[float]] = {k: [] for k in cases}
        for _ in range(args.repeats):  # interleaved, so a drift of the machine touches every case alike
            for name, slot_of_row in cases.items():
                times[name] += run(slot_of_row, args.new_tokens)
    out = {k: round(1000 * statistics.median(v), 2) for k, v in times.items()}
    out["mixed_kinds_over_lora"] = round(out["mixed_kinds_ms"] / out["lora_ms"], 3)
    out["dora_over_lora"] = round(out["dora_ms"] / out["lora_ms"], 3)
    out["lora_over_base"] = round(out["lora_ms"] / out["base_ms"], 3)
    out["config"] = {"rows": args.rows, "adapters_per_kind": n, "rank": args.rank, "virtual_tokens": args.virtual_tokens,
                     "new_tokens": args.new_tokens, "prompt_tokens": args.prompt_tokens, "repeats": args.repeats,
                     "threads": torch.get_num_threads(), "base_model": str(base_dir),
                     "device": "cuda" if torch.cuda.is_available() else "cpu"}
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
