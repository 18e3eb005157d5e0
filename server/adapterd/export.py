"""An adapter merged into its base model: a standalone full-precision model directory.

    W' = W + scaling * B @ A        on every linear layer a LoRA adapter targets, in float32
                                    (DoRA and IA3 as PEFT merges them: weight_updates)

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
_MAGNITUDE_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_magnitude_vector(?:\.[A-Za-z0-9_-]+)?(?:\.weight)?$")
_IA3_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.ia3_l(?:\.[A-Za-z0-9_-]+)?$")


def parse_dtype(name: str) -> torch.dtype:
    name = name or "float32"
    if name not in DTYPES:
        raise errors.InvalidArgument(f"dtype {rules.quote(name)} is not one of {', '.join(DTYPES)}")
    return DTYPES[name]


def weight_updates(config_bytes: bytes, weights_bytes: bytes) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    """{base tensor name: its merged value from the float32 base value}, as PEFT merges:

        lora   W' = W + scaling * B @ A
        dora   W' = m / ||W + scaling * B @ A|| * (W + scaling * B @ A)   (per output row)
        ia3    W' = W * l per input column (feedforward), else W and its bias * l per output row
    Prompt and prefix tuning change the model's input, not its weights: nothing to merge."""
    settings = rules.parse_config(config_bytes)
    if settings.kind in rules.PROMPT_KINDS:
        raise errors.FailedPrecondition(
            f"a {settings.kind} adapter cannot be merged into the base model: its virtual tokens are an input, "
            "not a change to the weights; serve it as it is"
        )
    if settings.raw.get("fan_in_fan_out"):  # GPT-2's Conv1D stores W as (in, out)
        raise errors.FailedPrecondition("fan_in_fan_out adapters (GPT-2 Conv1D layers) cannot be merged here")
    tensors = load(weights_bytes)
    if settings.kind == "ia3":
        return _ia3_updates(settings, tensors)
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _LORA_KEY.match(key) or _MAGNITUDE_KEY.match(key)
        if m is None:
            raise errors.InvalidAdapter(f"adapter tensor {rules.quote(key)} is not a LoRA A/B weight or DoRA magnitude")
        parts.setdefault(m["module"], {})[m.groupdict().get("ab") or "m"] = tensor.float()
    updates = {}
    for module, ab in parts.items():
        if not {"A", "B"} <= set(ab):
            raise errors.InvalidAdapter(f"adapter module {rules.quote(module)} lacks lora_A or lora_B")
        delta = settings.scaling * (ab["B"] @ ab["A"])  # (out, r) @ (r, in) -> (out, in)
        updates[f"{module}.weight"] = _dora(delta, ab["m"]) if "m" in ab else (lambda w, d=delta: w + d)
    return updates


def _dora(delta: torch.Tensor, magnitude: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    def merged(w: torch.Tensor) -> torch.Tensor:
        full = w + delta
        return (magnitude / torch.linalg.norm(full, dim=1))[:, None] * full
    return merged


def _ia3_updates(settings, tensors: dict[str, torch.Tensor]) -> dict[str, Callable[[torch.Tensor], torch.Tensor]]:
    ff = settings.feedforward_modules
    updates = {}
    for key, tensor in tensors.items():
        m = _IA3_KEY.match(key)
        if m is None:
            raise errors.InvalidAdapter(f"adapter tensor {rules.quote(key)} is not an IA3 vector")
        module, vector = m["module"], tensor.float().flatten()
        feedforward = any(module == f or module.endswith("." + f) for f in ff) if isinstance(ff, list) else tensor.shape[0] == 1
        if feedforward:
            updates[f"{module}.weight"] = lambda w, v=vector: w * v[None, :]
        else:
            updates[f"{module}.weight"] = lambda w, v=vector: w * v[:, None]
            updates[f"{module}.bias?"] = lambda b, v=vector: b * v  # only where the base has a bias
    return updates


def merge(base_dir: Path, config_bytes: bytes, weights_bytes: bytes, out_dir: Path, *,
          dtype: torch.dtype = torch.float32, on_progress: Callable[[str], None] = lambda message: None) -> None:
    """Write the merged model into `out_dir` (which must not exist yet)."""
    updates = weight_updates(config_bytes, weights_bytes)
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
            update = updates.pop(name, None) or updates.pop(f"{name}?", None)
            if update is not None:
                try:
                    tensor = update(tensor.float())
                except RuntimeError as e:  # shapes that do not broadcast: another base model
                    raise errors.AdapterMismatch(f"{name}: the adapter does not fit the base weight "
                                                 f"{tuple(tensor.shape)}: {e}") from e
            state[name] = tensor.to(dtype).contiguous() if tensor.is_floating_point() else tensor
        save_file(state, out_dir / shard, metadata={"format": "pt"})
    missing = sorted(n for n in updates if not n.endswith("?"))
    if missing:  # e.g. a tied lm_head the base stores only as its embeddings
        raise errors.AdapterMismatch(
            f"the base model has no stored weight for {', '.join(missing[:3])}: the adapter cannot be merged"
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
