"""An adapter merged into its base model: a standalone full-precision model directory.

    W' = W + scaling * B @ A        on every linear layer the adapter targets, in float32

The server keeps the base model's full-precision weights on disk (it quantizes them to NF4
only in memory), so it can do the merge where the weights are: shard by shard, each base
tensor read once, the adapted ones merged, all written as safetensors in the asked dtype,
beside the base model's config (its dtype set to match), generation config, tokenizer and
chat template. transformers loads the result with no adapter and no adapterd.

PEFT's own `merge_and_unload` on the full-precision base is the oracle the merge is tested
against (tests/grpc/test_export.py).
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import adapterd_rules as rules
import torch
from safetensors.torch import load, load_file, save_file

from adapterd import errors

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# The base model's files that are not its weights, copied as they are (config.json is rewritten).
_WEIGHTS = re.compile(r".*\.(safetensors|bin|pt|pth|gguf)$|.*\.safetensors\.index\.json$")
_SKIPPED = {"gguf-source.json"}  # how adapterd converted the base: not part of the model
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_-]+)?\.weight$")


def parse_dtype(name: str) -> torch.dtype:
    name = name or "float32"
    if name not in DTYPES:
        raise errors.InvalidArgument(f"dtype {rules.quote(name)} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def lora_deltas(config_bytes: bytes, weights_bytes: bytes) -> dict[str, torch.Tensor]:
    """{base weight name: scaling * B @ A} in float32, one per adapted linear layer."""
    settings = rules.parse_config(config_bytes)
    tensors = load(weights_bytes)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key)
        if m is None:
            raise errors.InvalidAdapter(f"adapter tensor {rules.quote(key)} is not a LoRA A or B weight")
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    transposed = bool(settings.raw.get("fan_in_fan_out"))  # GPT-2's Conv1D stores W as (in, out)
    deltas = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise errors.InvalidAdapter(f"adapter module {rules.quote(module)} has lora_{''.join(ab)} only")
        delta = settings.scaling * (ab["B"].float() @ ab["A"].float())  # (out, r) @ (r, in) -> (out, in)
        deltas[f"{module}.weight"] = delta.T if transposed else delta
    return deltas


def merge(base_dir: Path, config_bytes: bytes, weights_bytes: bytes, out_dir: Path, *,
          dtype: torch.dtype = torch.float32, on_progress: Callable[[str], None] = lambda message: None) -> None:
    """Write the merged model into `out_dir` (which must not exist yet)."""
    deltas = lora_deltas(config_bytes, weights_bytes)
    index = base_dir / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    if not all((base_dir / s).is_file() for s in shards):
        raise errors.FailedPrecondition(
            f"the base model in {base_dir} has no safetensors weights to merge into; convert it to safetensors"
        )
    out_dir.mkdir(parents=True)
    for i, shard in enumerate(shards, 1):
        on_progress(f"merging shard {i}/{len(shards)}")
        state = load_file(base_dir / shard)
        for name, tensor in state.items():
            delta = deltas.pop(name, None)
            if delta is not None:
                if delta.shape != tensor.shape:
                    raise errors.AdapterMismatch(
                        f"{name}: the adapter's update is {tuple(delta.shape)}, the base weight {tuple(tensor.shape)}"
                    )
                tensor = tensor.float() + delta
            state[name] = tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor
        save_file(state, out_dir / shard, metadata={"format": "pt"})
    if deltas:  # e.g. a tied lm_head the base stores only as its embeddings
        raise errors.AdapterMismatch(
            f"the base model has no stored weight for {', '.join(sorted(deltas)[:3])}: the adapter cannot be merged"
        )
    for path in sorted(base_dir.iterdir()):
        if path.is_file() and path.name not in _SKIPPED and not _WEIGHTS.match(path.name) and path.name != "config.json":
            shutil.copy2(path, out_dir / path.name)
    if index.exists():
        shutil.copy2(index, out_dir / index.name)
    config = json.loads((base_dir / "config.json").read_text())
    dtype_name = str(dtype).removeprefix("torch.")
    config["torch_dtype" if "torch_dtype" in config else "dtype"] = dtype_name
    config.pop("quantization_config", None)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
