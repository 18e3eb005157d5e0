"""Loading a checked adapter's weights for the engine.

Every rule that needs no tensor values (names, adapter_config.json, the safetensors header,
shapes against the base) is in adapterd_rules, which the client applies too before an
upload; this module runs those, then loads the tensors and checks them once more for values
whose outputs would not be finite. Nothing is partially loaded: any failure raises before an
AdapterWeights exists.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import adapterd_rules as rules
import torch

from adapterd import errors
from adapterd.resolve import AdapterWeights, ModelSpec

__all__ = ["AdapterWeights", "check_finite_outputs", "check_finite_vector", "load_adapter_files", "read_adapter", "validate_adapter_files"]


def validate_adapter_files(
    config_bytes: bytes,
    weights: bytes | memoryview | Path,
    spec: ModelSpec | None,
    max_rank: int | None,
    *,
    max_bytes: int | None = None,
    max_virtual_tokens: int | None = None,
) -> rules.CheckedAdapter:
    """Every check short of loading tensor values. `spec=None` skips the base-model fit
    (shapes, modules, prompt sizes)."""
    return rules.check_adapter(
        config_bytes,
        weights,
        linear_shapes=spec.linear_shapes if spec is not None else None,
        prompt_shape=spec.prompt_shape if spec is not None else None,
        max_rank=max_rank,
        max_bytes=max_bytes,
        max_virtual_tokens=max_virtual_tokens,
    )


def load_adapter_files(
    config_bytes: bytes,
    weights: bytes | memoryview | Path,
    spec: ModelSpec,
    max_rank: int | None,
    *,
    name: str = "",
    sha256: str | None = None,
    max_bytes: int | None = None,
    max_virtual_tokens: int | None = None,
) -> AdapterWeights:
    """Check, then load the tensors as float32 CPU tensors keyed by module path."""
    checked = validate_adapter_files(config_bytes, weights, spec, max_rank, max_bytes=max_bytes,
                                     max_virtual_tokens=max_virtual_tokens)
    raw = _load_tensors(weights)
    s = checked.settings
    tensors, magnitudes, ia3, virtual = {}, {}, {}, None
    for path, mod in checked.modules.items():
        if isinstance(mod, rules.Ia3Module):
            vector = _float32(raw[mod.key]).flatten()  # (features,)
            check_finite_vector(mod.key, vector, "IA3 vector")
            ia3[path] = (vector, mod.feedforward)
            continue
        a, b = _float32(raw[mod.a_key]), _float32(raw[mod.b_key])  # (r, in), (out, r)
        check_finite_outputs(path, mod, a, b, s.scaling, s.rank)
        tensors[path] = (a, b)
        if mod.magnitude_key is not None:
            magnitudes[path] = _float32(raw[mod.magnitude_key])  # (out,)
            check_finite_vector(mod.magnitude_key, magnitudes[path], "DoRA magnitude vector")
    if checked.kind in rules.PROMPT_KINDS:
        virtual = _float32(raw[rules.PROMPT_KEY])  # (virtual tokens, width)
        check_finite_vector(rules.PROMPT_KEY, virtual, "prompt embedding")
    if sha256 is None:
        sha256 = _digest(config_bytes, weights)
    return AdapterWeights(
        name=name,
        sha256=sha256,
        rank=s.rank,
        alpha=s.alpha,
        scaling=s.scaling,
        target_modules=checked.target_modules,
        tensors=tensors,
        nbytes=checked.nbytes,
        config=s.raw,
        kind=checked.kind,
        magnitudes=magnitudes,
        ia3=ia3,
        virtual=virtual,
    )


def _float32(t: torch.Tensor) -> torch.Tensor:
    # copy=True: never keep a view of a memory-mapped file that storage could change.
    return t.to(torch.float32, copy=True).contiguous()


def check_finite_vector(key: str, t: torch.Tensor, what: str) -> None:
    """Refuse NaN, inf, or values above MAX_ABS_WEIGHT in an IA3 vector, a DoRA magnitude
    or a prompt embedding: the outputs they scale or feed would not be finite."""
    if not torch.isfinite(t).all():
        raise errors.InvalidAdapter(
            f"tensor {rules.quote(key)} holds NaN or infinite values (as float32): the adapter's outputs "
            "would not be finite numbers"
        )
    peak = float(t.abs().max()) if t.numel() else 0.0
    if peak > rules.MAX_ABS_WEIGHT:
        raise errors.InvalidAdapter(
            f"tensor {rules.quote(key)} ({what}) holds values up to {peak:g}, above the limit of "
            f"{rules.MAX_ABS_WEIGHT:g}: the adapter's outputs would not be finite numbers"
        )


def check_finite_outputs(path: str, mod: rules.LoraModule, a: torch.Tensor, b: torch.Tensor,
                         scaling: float, rank: int) -> None:
    """Refuse weights that cannot give finite outputs: NaN or inf, |A| or |scaling * B| above
    MAX_ABS_WEIGHT, or a delta scaling * B @ A that can pass MAX_DELTA per weight (bounded,
    without the matmul, by scaling * r * max|A| * max|B|). Each message says which."""
    for key, t in ((mod.a_key, a), (mod.b_key, b)):
        if not torch.isfinite(t).all():
            raise errors.InvalidAdapter(
                f"tensor {rules.quote(key)} holds NaN or infinite values (as float32): the adapter's outputs "
                "would not be finite numbers"
            )
    max_a, max_b = float(a.abs().max()), float(b.abs().max())
    limit = rules.MAX_ABS_WEIGHT
    if max_a > limit:
        raise errors.InvalidAdapter(
            f"tensor {rules.quote(mod.a_key)} holds values up to {max_a:g}, above the limit of {limit:g}: "
            "the adapter's outputs would not be finite numbers"
        )
    if abs(scaling) * max_b > limit:
        raise errors.InvalidAdapter(
            f"tensor {rules.quote(mod.b_key)} times the LoRA scaling {scaling:g} holds values up to "
            f"{abs(scaling) * max_b:g}, above the limit of {limit:g}: the adapter's outputs would not be "
            "finite numbers; lower lora_alpha or the weights"
        )
    bound = abs(scaling) * rank * max_a * max_b
    if bound > rules.MAX_DELTA:
        raise errors.InvalidAdapter(
            f"module {path}: scaling * lora_B @ lora_A can reach {bound:g} per weight (scaling {scaling:g} x "
            f"r {rank} x max|A| {max_a:g} x max|B| {max_b:g}), above the limit of {rules.MAX_DELTA:g}: the "
            "adapter's outputs would not be finite numbers"
        )


def read_adapter(
    path: Path,
    spec: ModelSpec,
    max_rank: int | None,
    *,
    name: str = "",
    sha256: str | None = None,
    max_bytes: int | None = None,
) -> AdapterWeights:
    """Load a PEFT adapter directory (adapter_config.json + adapter_model.safetensors).
    `sha256`, when the caller already verified the files against it, is taken as is."""
    config_bytes, weights = rules.read_adapter_dir(Path(path))
    return load_adapter_files(
        config_bytes, weights, spec, max_rank, name=name or Path(path).name, sha256=sha256, max_bytes=max_bytes
    )


def _load_tensors(weights: bytes | memoryview | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load, load_file

    try:
        if isinstance(weights, (str, Path)):
            return load_file(str(weights), device="cpu")
        return load(bytes(weights))
    except (SafetensorError, ValueError, RuntimeError) as e:  # the header check should catch all
        raise errors.CorruptSafetensors(f"{rules.WEIGHTS_FILE} could not be read: {e}") from e


def _digest(config_bytes: bytes, weights: bytes | memoryview | Path) -> str:
    w = rules.sha256_file(weights) if isinstance(weights, (str, Path)) else hashlib.sha256(weights).hexdigest()
    return rules.adapter_digest({rules.CONFIG_FILE: hashlib.sha256(config_bytes).hexdigest(), rules.WEIGHTS_FILE: w})
