"""Where an adapter's greedy answers leave the base model's, on general prompts: the
retention set (held out from training) and the replay prompts a replay job trained on.
Prints one JSON object per set. With --quantization Q instead of an adapter: where the base
model stored as Q (none: float32) answers otherwise than the NF4 base the server serves, a
change of the same model that users take as no change, to set the adapter's figures by.
With --batch-size B the compared model answers in batches of B where the base answers in
batches of 16 (a job's): `--quantization nf4 --batch-size 1` is the served base against
itself, its answers changed by padding and kernel shapes alone.

For each set, the first N prompts (the replay prompts in the order a job with the same
--seed takes them), both answered greedily to --max-new-tokens as a job's evaluation does:

    rougeL_f1                           the adapter's ROUGE-L F1 against the base's answers
                                        (the job's retention, on these prompts)
    identical / diverged                answers equal token for token, or not
    first_divergence_token_median       where the diverged ones first differ
    base_margin_at_divergence_q25_50_75 the base's top-1 minus top-2 log-probability there,
                                        quartiles (nats): how near a tie the flipped token was
    adapter_took_base_second            diverged answers whose first differing token is the
                                        base's second choice
    adapter_stopped_there               diverged answers that end there (end of turn or EOS)
    top1_agreement                      teacher-forced on the base's answers: the share of
                                        answer positions where the adapter's top token is
                                        the base's (1 would give the base's answers exactly)
    kl_per_answer_token                 KL(base || adapter) there, mean (nats)

Train-set figures as low as held-out ones mean replay's fit, not its reach to new prompts,
is what limits retention.

    python bench/divergence.py REGISTRY NAME[@V] [--prompts 48] [--seed 0]
        [--max-new-tokens 32] [--base-model ...]
    python bench/divergence.py --quantization none|int8|fp4 [--prompts 48] ...
    python bench/divergence.py --quantization nf4 --batch-size 1 [--prompts 100] ...
        [--kernel job|served]

--kernel job (the default) runs bitsandbytes' plain 4-bit path, as a job's evaluation does;
served, the server's, which on CPUs with AVX512-BF16 repacks the weights for a kernel that
rounds its outputs to bf16.

REGISTRY is a registry directory (`bench/replay.py --keep DIR` writes DIR/registry).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from contextlib import contextmanager, nullcontext
from functools import partial
from pathlib import Path

import torch


def adapter_dir(registry: Path, ref: str, into: Path) -> Path:
    """The PEFT directory of REF (NAME or NAME@V, the default tenant's), read through the
    registry (its files checked against their recorded sha256)."""
    from adapterd.registry.storage import open_storage
    from adapterd.registry.store import Registry

    store = Registry(open_storage(registry))
    for file_name, data in store.read_files(store.resolve("default", ref)).items():
        (into / file_name).write_bytes(data)
    return into


def divergence(base_model, other_model, tokenizer, examples, *, max_new_tokens: int, other_batch_size: int = 0) -> dict:
    """`base_model()`, `other_model()`: context managers that give the model to run as the
    base and as the one compared with it (a PeftModel with its adapter disabled, and on).
    The base answers in batches of evaluate.GENERATE_BATCH, as a job's evaluation does; the
    other model too, or in batches of `other_batch_size`."""
    from adapterd.engine.chat import eos_token_ids
    from adapterd.training import evaluate

    def answers(model_of, batch_size=evaluate.GENERATE_BATCH):
        with model_of() as model, torch.no_grad():
            return evaluate.generate_ids(model, tokenizer, examples, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens)

    def log_probs(model_of, ids: torch.Tensor) -> torch.Tensor:
        with model_of() as model, torch.no_grad():
            return model(input_ids=ids).logits[0].float().log_softmax(-1)  # (T, V)

    with base_model() as model:
        stops = eos_token_ids(model, tokenizer)
    base, adapted = answers(base_model), answers(other_model, other_batch_size or evaluate.GENERATE_BATCH)
    text = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in adapted]
    references = [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in base]
    identical, margins, positions, second, stopped = 0, [], [], 0, 0
    for example, b, a in zip(examples, base, adapted, strict=True):
        k = next((i for i, (x, y) in enumerate(zip(b, a, strict=False)) if x != y), min(len(a), len(b)))  # a prefix: where the shorter ends
        if a == b:
            identical += 1
            continue
        positions.append(k)
        prefix = torch.tensor([evaluate._prompt_ids(example, tokenizer) + b[:k]])  # (1, T)
        top = log_probs(base_model, prefix)[-1].topk(2)
        margins.append(float(top.values[0] - top.values[1]))
        if k < len(a):
            second += a[k] == int(top.indices[1])
            stopped += a[k] in stops
    margins.sort()
    positions.sort()
    agree, kl, count = 0, 0.0, 0
    for example, b in zip(examples, base, strict=True):
        prompt = evaluate._prompt_ids(example, tokenizer)
        ids = torch.tensor([prompt + b])  # (1, T)
        answer = slice(len(prompt) - 1, ids.shape[1] - 1)  # the positions that predict b
        student, teacher = log_probs(other_model, ids)[answer], log_probs(base_model, ids)[answer]  # (A, V) each
        agree += int((student.argmax(-1) == teacher.argmax(-1)).sum())
        kl += float((teacher.exp() * (teacher - student)).sum())
        count += student.shape[0]

    def quantile(q: float):
        return round(margins[int(q * (len(margins) - 1))], 3) if margins else None

    return {
        "prompts": len(examples),
        "rougeL_f1": round(evaluate.rouge(text, references)["rougeL"]["f1"], 3),
        "identical": identical,
        "diverged": len(margins),
        "first_divergence_token_median": positions[len(positions) // 2] if positions else None,
        "base_margin_at_divergence_q25_50_75": [quantile(0.25), quantile(0.5), quantile(0.75)],
        "adapter_took_base_second": second,
        "adapter_stopped_there": stopped,
        "top1_agreement": round(agree / max(1, count), 4),
        "kl_per_answer_token": round(kl / max(1, count), 5),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("registry", type=Path, nargs="?", help="a registry directory")
    parser.add_argument("ref", metavar="NAME[@V]", nargs="?",
                        help="the adapter (the default tenant's; default: its latest version)")
    parser.add_argument("--quantization", choices=("none", "int8", "fp4", "nf4"), default=None,
                        help="no adapter: compare the base stored this way (none: float32) with the NF4 base "
                        "(nf4: the NF4 base with itself, with --batch-size)")
    parser.add_argument("--batch-size", type=int, default=0, metavar="B",
                        help="the compared model answers in batches of B (default: 16, as the base and a job's "
                        "evaluation do): other padding, other kernel shapes")
    parser.add_argument("--prompts", type=int, default=48, help="prompts per set")
    parser.add_argument("--seed", type=int, default=0, help="the job's seed: the replay prompts' order")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="the job's --eval-max-new-tokens")
    parser.add_argument("--kernel", choices=("job", "served"), default="job",
                        help="job: bitsandbytes' plain 4-bit path, as a training job's evaluation (its "
                        "retention) runs; served: the server's, which on CPUs with AVX512-BF16 repacks the "
                        "weights for a kernel that rounds outputs to bf16 (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--base-model", default=None, metavar="DIR|FILE.gguf|demo",
                        help="default: SmolLM2-135M-Instruct, the server's default")
    args = parser.parse_args()
    if (args.quantization is None) == (args.ref is None):
        parser.error("give REGISTRY NAME[@V] (an adapter) or --quantization (another storage of the base), one of them")

    from adapterd import errors
    from adapterd.engine.model import base_model_dir, load_base_model, parse_dtype, unpacked
    from adapterd.training import general
    from adapterd.training.data import instruction
    from peft import PeftModel

    torch.set_num_threads(args.threads)
    device = torch.device("cpu")

    def load(quantization: str):
        model, tokenizer, _ = load_base_model(base_model_dir(args.base_model), device=device,
                                              compute_dtype=parse_dtype(None, device), quantization=quantization)
        return (unpacked(model) if args.kernel == "job" else model), tokenizer  # job: as worker.prepare_model

    model, tokenizer = load("nf4")
    model.eval()
    if args.quantization:
        other = model if args.quantization == "nf4" else load(args.quantization)[0].eval()
        base_model, other_model = partial(nullcontext, model), partial(nullcontext, other)
    else:
        with tempfile.TemporaryDirectory(prefix="adapterd-divergence-") as tmp:
            try:
                files = adapter_dir(args.registry, args.ref, Path(tmp))
            except errors.AdapterdError as e:
                raise SystemExit(f"divergence.py: {e}") from e
            model = PeftModel.from_pretrained(model, files).eval()

        @contextmanager
        def base_model():
            with model.disable_adapter():
                yield model

        other_model = partial(nullcontext, model)
    order = list(general.REPLAY)
    random.Random(args.seed).shuffle(order)  # as worker.replay_examples takes them
    sets = {"retention": general.RETENTION[: args.prompts], "replay (trained on)": order[: args.prompts]}
    for label, prompts in sets.items():
        examples = [instruction(p, tokenizer, i + 1) for i, p in enumerate(prompts)]
        figures = divergence(base_model, other_model, tokenizer, examples, max_new_tokens=args.max_new_tokens,
                             other_batch_size=args.batch_size)
        print(json.dumps({"set": label, **figures}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
