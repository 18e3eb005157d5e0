"""The whole adapter: its config and its safetensors header together, and against the
served base model's linear layers.

    key:  base_model.model.<module path>.lora_{A,B}.weight
    A: (r, in)  B: (out, r)  for each module's (in, out)
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from adapterd_rules.errors import (
    AdapterdError,
    AdapterMismatch,
    AdapterTooLarge,
    InvalidAdapter,
    UnknownTargetModule,
    UnsupportedAdapter,
)
from adapterd_rules.files import CONFIG_FILE, WEIGHTS_FILE
from adapterd_rules.lora_config import LoraSettings, parse_config
from adapterd_rules.safetensors_header import (
    MAX_HEADER_BYTES,
    SERVABLE_DTYPES,
    SafetensorsIndex,
    read_safetensors_header,
)
from adapterd_rules.text import quote

PEFT_PREFIX = "base_model.model."

# What a tensor key of a PEFT adapter is made of (module paths are Python attribute names
# and layer numbers); anything else cannot name a module, and is never echoed as it is.
_TENSOR_KEY = re.compile(r"[A-Za-z0-9_.-]{1,512}")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$")


@dataclass(frozen=True)
class LoraModule:
    path: str  # the base model's module path, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class CheckedAdapter:
    settings: LoraSettings
    index: SafetensorsIndex
    modules: dict[str, LoraModule]  # by module path, sorted
    nbytes: int  # config + weights

    @property
    def target_modules(self) -> list[str]:
        """The leaf names the adapter touches, e.g. ["q_proj", "v_proj"]."""
        return sorted({p.rsplit(".", 1)[-1] for p in self.modules})


def check_adapter(
    config_bytes: bytes,
    weights: bytes | memoryview | Path,
    *,
    linear_shapes: Mapping[str, tuple[int, int]] | None = None,
    max_rank: int | None = None,
    max_bytes: int | None = None,
    max_header: int = MAX_HEADER_BYTES,
) -> CheckedAdapter:
    """Every check that needs no tensor values. With `linear_shapes` (module path -> (in, out)
    of the served base model) also that each module exists in the base and its shapes fit."""
    size = os.path.getsize(weights) if isinstance(weights, (str, Path)) else len(weights)
    nbytes = size + len(config_bytes)
    if max_bytes is not None and nbytes > max_bytes:
        raise AdapterTooLarge(f"adapter is {nbytes} bytes, above this server's limit of {max_bytes} (--max-adapter-bytes)")
    settings = parse_config(config_bytes, max_rank=max_rank)
    index = read_safetensors_header(weights, max_header=max_header)
    pairs = _pair_tensors(index)
    if not pairs:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA weights: the adapter would touch no module")
    modules = {}
    for path, (a_key, b_key) in sorted(pairs.items()):
        a, b = index.tensors[a_key], index.tensors[b_key]
        for key, info in ((a_key, a), (b_key, b)):
            if info.dtype not in SERVABLE_DTYPES:
                raise UnsupportedAdapter(
                    f"tensor {quote(key)} has dtype {info.dtype}; LoRA weights must be one of {', '.join(SERVABLE_DTYPES)}"
                )
            if len(info.shape) != 2:
                raise InvalidAdapter(f"tensor {quote(key)} has shape {list(info.shape)}; a LoRA matrix is 2-D")
        if a.shape[0] != settings.rank or b.shape[1] != settings.rank:
            raise InvalidAdapter(
                f"module {path}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have the rank "
                f"r={settings.rank} of {CONFIG_FILE}"
            )
        modules[path] = LoraModule(path, a_key, b_key, a.shape[1], b.shape[0])
    if linear_shapes is not None:
        _check_fits_base(modules, linear_shapes)
    _check_targets_agree(settings.target_modules, modules)
    return CheckedAdapter(settings, index, modules, nbytes)


def _check_targets_agree(targets: list[str] | str | None, modules: Mapping[str, LoraModule]) -> None:
    """Every module with weights is one that adapter_config.json's target_modules names, as
    PEFT matches them (a module is targeted when its path is a name in the list or ends with
    "." + one). PEFT loading this adapter would leave out the weights of any other module, so
    serving them would give other outputs than PEFT. A string (a regular expression, or
    "all-linear") is not checked: running a tenant's regular expression is not safe."""
    if not isinstance(targets, list):
        return
    for path in modules:
        if not any(path == t or path.endswith("." + t) for t in targets):
            raise InvalidAdapter(
                f"{WEIGHTS_FILE} holds weights for module {path}, which target_modules "
                f"{quote(targets)} in {CONFIG_FILE} does not name: PEFT would not load them; "
                "fix target_modules or save the adapter again with PEFT"
            )


def _pair_tensors(index: SafetensorsIndex) -> dict[str, tuple[str, str]]:
    """Map PEFT keys to module paths: {path: (lora_A key, lora_B key)}."""
    found: dict[str, dict[str, str]] = {}
    adapter_names = set()
    for key in index.tensors:
        if not _TENSOR_KEY.fullmatch(key):
            raise InvalidAdapter(
                f"{WEIGHTS_FILE}: tensor key {quote(key)} is not a module path "
                "(1-512 characters of letters, digits, '_', '.', '-')"
            )
        path = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
        m = _LORA_KEY.match(path)
        if m is None:
            raise _unexpected_tensor(key)
        adapter_names.add(m["adapter"])
        slot = found.setdefault(m["module"], {})
        if m["ab"] in slot:
            raise InvalidAdapter(f"{WEIGHTS_FILE} holds two lora_{m['ab']} tensors for {m['module']}")
        slot[m["ab"]] = key
    if len(adapter_names) > 1:
        names = sorted(n or "(none)" for n in adapter_names)
        raise InvalidAdapter(f"{WEIGHTS_FILE} mixes several adapters ({', '.join(names)}); push one at a time")
    pairs = {}
    for path, slot in found.items():
        if "A" not in slot or "B" not in slot:
            have, missing = ("A", "B") if "A" in slot else ("B", "A")
            raise InvalidAdapter(f"module {path} has lora_{have} but no lora_{missing}")
        pairs[path] = (slot["A"], slot["B"])
    return pairs


def _unexpected_tensor(key: str) -> AdapterdError:
    if "lora_embedding_" in key:
        return UnknownTargetModule(f"tensor {quote(key)}: LoRA on embeddings is not supported, only on linear layers")
    if "lora_magnitude_vector" in key:
        return UnsupportedAdapter(f"tensor {quote(key)}: DoRA magnitude vectors are not supported")
    if ".lora_B" in key and key.endswith(".bias"):
        return UnsupportedAdapter(f"tensor {quote(key)}: a lora_B bias (lora_bias) is not supported")
    if "modules_to_save" in key or "trainable_tokens" in key:
        return UnsupportedAdapter(f"tensor {quote(key)}: only LoRA A/B weights can be served, not full module copies")
    return UnsupportedAdapter(
        f"tensor {quote(key)} is not a LoRA A/B weight (expected '<module>.lora_A.weight' and '.lora_B.weight'); "
        "bias and other trained parameters are not supported"
    )


def _check_fits_base(modules: dict[str, LoraModule], linear_shapes: Mapping[str, tuple[int, int]]) -> None:
    absent = [p for p in modules if p not in linear_shapes]
    if absent and len(absent) == len(modules):
        raise AdapterMismatch(
            f"adapter was trained for another base model: none of its {len(modules)} modules exist in the "
            f"served base model (first: {absent[0]}); known leaf names: {_leaf_names(linear_shapes)}"
        )
    if absent:
        why = "LoRA on lm_head is not supported" if absent[0].endswith("lm_head") else "the base model has no such linear layer"
        raise UnknownTargetModule(
            f"target module {absent[0]} ({len(absent)} absent in all): {why}; "
            f"the base model's linear layers end in: {_leaf_names(linear_shapes)}"
        )
    for path, mod in modules.items():
        base_in, base_out = linear_shapes[path]
        if (mod.in_features, mod.out_features) != (base_in, base_out):
            raise AdapterMismatch(
                f"adapter was trained for another base model: module {path} takes {mod.in_features} -> "
                f"{mod.out_features} features in the adapter, {base_in} -> {base_out} in the served base model"
            )


def _leaf_names(linear_shapes: Mapping[str, tuple[int, int]]) -> str:
    return ", ".join(sorted({p.rsplit(".", 1)[-1] for p in linear_shapes}))

