"""The whole adapter: its config and its safetensors header together, and against the
served base model (its linear layers, and for prompt kinds its hidden and KV sizes).

    LoRA   base_model.model.<module path>.lora_{A,B}.weight   A: (r, in)  B: (out, r)
    DoRA   the same, and <module path>.lora_magnitude_vector  m: (out,)
    IA3    base_model.model.<module path>.ia3_l               (1, in) feedforward, else (out, 1)
    prompt prompt_embeddings                                  (virtual tokens, width)
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
from adapterd_rules.kinds import Ia3Settings, PromptSettings, Settings, parse_config
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
_MAGNITUDE_KEY = re.compile(r"^(?P<module>.+)\.lora_magnitude_vector(?:\.(?P<adapter>[A-Za-z0-9_-]+))?(?:\.weight)?$")
_IA3_KEY = re.compile(r"^(?P<module>.+)\.ia3_l(?:\.(?P<adapter>[A-Za-z0-9_-]+))?$")
PROMPT_KEY = "prompt_embeddings"


@dataclass(frozen=True)
class LoraModule:
    path: str  # the base model's module path, e.g. "model.layers.0.self_attn.q_proj"
    a_key: str
    b_key: str
    in_features: int
    out_features: int
    magnitude_key: str | None = None  # DoRA


@dataclass(frozen=True)
class Ia3Module:
    path: str
    key: str
    features: int  # in_features if feedforward, else out_features
    feedforward: bool  # scales the module's input (else its output)


@dataclass(frozen=True)
class PromptShape:
    """What prompt and prefix tuning must fit in the served base model."""

    hidden_size: int
    num_layers: int
    kv_heads: int
    head_dim: int
    prefix_tuning: bool  # whether the engine serving it can take per-layer prefixes (paged attention)


@dataclass(frozen=True)
class CheckedAdapter:
    settings: Settings
    index: SafetensorsIndex
    modules: dict[str, LoraModule | Ia3Module]  # by module path, sorted; none for prompt kinds
    nbytes: int  # config + weights

    @property
    def kind(self) -> str:
        return self.settings.kind

    @property
    def target_modules(self) -> list[str]:
        """The leaf names the adapter touches, e.g. ["q_proj", "v_proj"]."""
        return sorted({p.rsplit(".", 1)[-1] for p in self.modules})

    @property
    def virtual_tokens(self) -> int:
        return self.settings.num_virtual_tokens if isinstance(self.settings, PromptSettings) else 0


def check_adapter(
    config_bytes: bytes,
    weights: bytes | memoryview | Path,
    *,
    linear_shapes: Mapping[str, tuple[int, int]] | None = None,
    max_rank: int | None = None,
    max_bytes: int | None = None,
    max_header: int = MAX_HEADER_BYTES,
    prompt_shape: PromptShape | None = None,
    max_virtual_tokens: int | None = None,
) -> CheckedAdapter:
    """Every check that needs no tensor values. With `linear_shapes` (module path -> (in, out)
    of the served base model) also that each module exists in the base and its shapes fit;
    with `prompt_shape`, that a prompt or prefix fits the base."""
    size = os.path.getsize(weights) if isinstance(weights, (str, Path)) else len(weights)
    nbytes = size + len(config_bytes)
    if max_bytes is not None and nbytes > max_bytes:
        raise AdapterTooLarge(f"adapter is {nbytes} bytes, above this server's limit of {max_bytes} (--max-adapter-bytes)")
    settings = parse_config(config_bytes, max_rank=max_rank, max_virtual_tokens=max_virtual_tokens)
    index = read_safetensors_header(weights, max_header=max_header)
    if isinstance(settings, PromptSettings):
        _check_prompt(settings, index, prompt_shape)
        return CheckedAdapter(settings, index, {}, nbytes)
    if isinstance(settings, Ia3Settings):
        modules = _ia3_modules(settings, index)
    else:
        modules = _lora_modules(settings, index)
    if linear_shapes is not None:
        _check_fits_base(modules, linear_shapes)
    _check_targets_agree(settings.target_modules, modules)
    return CheckedAdapter(settings, index, modules, nbytes)


def _check_dtype(key: str, info, what: str) -> None:
    if info.dtype not in SERVABLE_DTYPES:
        raise UnsupportedAdapter(f"tensor {quote(key)} has dtype {info.dtype}; {what} must be one of {', '.join(SERVABLE_DTYPES)}")


def _lora_modules(settings, index: SafetensorsIndex) -> dict[str, LoraModule]:
    found, magnitudes = _pair_tensors(index)
    if magnitudes and not settings.use_dora:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds DoRA magnitude vectors (first: {quote(next(iter(magnitudes.values())))}) "
                             f"but {CONFIG_FILE} does not set use_dora")
    pairs = {}
    for path, slot in found.items():
        if "A" not in slot or "B" not in slot:
            have, missing = ("A", "B") if "A" in slot else ("B", "A")
            raise InvalidAdapter(f"module {path} has lora_{have} but no lora_{missing}")
        pairs[path] = (slot["A"], slot["B"])
    if not pairs:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no LoRA weights: the adapter would touch no module")
    for path, key in magnitudes.items():
        if path not in pairs:
            raise InvalidAdapter(f"tensor {quote(key)}: a DoRA magnitude vector for module {path}, which has no lora_A/B")
    modules = {}
    for path, (a_key, b_key) in sorted(pairs.items()):
        a, b = index.tensors[a_key], index.tensors[b_key]
        for key, info in ((a_key, a), (b_key, b)):
            _check_dtype(key, info, "LoRA weights")
            if len(info.shape) != 2:
                raise InvalidAdapter(f"tensor {quote(key)} has shape {list(info.shape)}; a LoRA matrix is 2-D")
        if a.shape[0] != settings.rank or b.shape[1] != settings.rank:
            raise InvalidAdapter(
                f"module {path}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not have the rank "
                f"r={settings.rank} of {CONFIG_FILE}"
            )
        m_key = magnitudes.get(path)
        if settings.use_dora:
            if m_key is None:
                raise InvalidAdapter(f"module {path} has no DoRA magnitude vector (lora_magnitude_vector), "
                                     f"which use_dora in {CONFIG_FILE} requires")
            m = index.tensors[m_key]
            _check_dtype(m_key, m, "DoRA magnitudes")
            if tuple(m.shape) != (b.shape[0],):
                raise InvalidAdapter(f"tensor {quote(m_key)} has shape {list(m.shape)}; module {path}'s magnitude "
                                     f"vector must be [{b.shape[0]}] (its output features)")
        modules[path] = LoraModule(path, a_key, b_key, a.shape[1], b.shape[0], m_key)
    return modules


def _ia3_modules(settings: Ia3Settings, index: SafetensorsIndex) -> dict[str, Ia3Module]:
    modules = {}
    ff = settings.feedforward_modules
    for key, info in index.tensors.items():
        path = _module_key(key)
        m = _IA3_KEY.match(path)
        if m is None:
            raise UnsupportedAdapter(f"tensor {quote(key)} is not an IA3 vector (expected '<module>.ia3_l')")
        module = m["module"]
        if module in modules:
            raise InvalidAdapter(f"{WEIGHTS_FILE} holds two ia3_l tensors for {module}")
        _check_dtype(key, info, "IA3 vectors")
        shape = tuple(info.shape)
        if len(shape) != 2 or 1 not in shape:
            raise InvalidAdapter(f"tensor {quote(key)} has shape {list(shape)}; an IA3 vector is [1, in_features] "
                                 "(feedforward modules) or [out_features, 1]")
        feedforward = shape[0] == 1 and shape[1] != 1
        if isinstance(ff, list):  # PEFT: a module is feedforward when its path ends with a listed name
            listed = any(module == f or module.endswith("." + f) for f in ff)
            if shape != (1, 1) and listed != feedforward:
                want = "[1, in_features]" if listed else "[out_features, 1]"
                raise InvalidAdapter(f"tensor {quote(key)} has shape {list(shape)}; module {module} is "
                                     f"{'' if listed else 'not '}in feedforward_modules, so its vector must be {want}")
            feedforward = listed
        modules[module] = Ia3Module(module, key, shape[1] if feedforward else shape[0], feedforward)
    if not modules:
        raise InvalidAdapter(f"{WEIGHTS_FILE} holds no IA3 vectors: the adapter would touch no module")
    return dict(sorted(modules.items()))


def _check_prompt(settings: PromptSettings, index: SafetensorsIndex, shape: PromptShape | None) -> None:
    keys = list(index.tensors)
    if keys != [PROMPT_KEY]:
        extra = [k for k in keys if k != PROMPT_KEY]
        if extra:
            raise UnsupportedAdapter(f"tensor {quote(extra[0])}: a {settings.kind} adapter holds only "
                                     f"{quote(PROMPT_KEY)}")
        raise InvalidAdapter(f"{WEIGHTS_FILE} has no {quote(PROMPT_KEY)} tensor, which a {settings.kind} adapter needs")
    info = index.tensors[PROMPT_KEY]
    _check_dtype(PROMPT_KEY, info, "prompt embeddings")
    want = (settings.num_virtual_tokens, settings.embedding_width)
    if tuple(info.shape) != want:
        raise InvalidAdapter(f"tensor {quote(PROMPT_KEY)} has shape {list(info.shape)}; {CONFIG_FILE} "
                             f"(num_virtual_tokens, token_dim{', num_layers' if settings.kind == 'prefix_tuning' else ''}) "
                             f"says {list(want)}")
    if shape is None:
        return
    if settings.kind == "prompt_tuning":
        if settings.token_dim != shape.hidden_size:
            raise AdapterMismatch(f"adapter was trained for another base model: its virtual tokens have "
                                  f"{settings.token_dim} features, the served base model's hidden size is {shape.hidden_size}")
        return
    if not shape.prefix_tuning:
        raise UnsupportedAdapter("prefix tuning is served only on base models whose attention goes through the "
                                 "paged engine (transformers' attention interface: Llama, Mistral, Qwen2, Phi, ...); "
                                 "this base model is served by the padded engine")
    got = (settings.num_layers, settings.num_heads, settings.token_dim // settings.num_heads)
    base = (shape.num_layers, shape.kv_heads, shape.head_dim)
    if got != base:
        raise AdapterMismatch(f"adapter was trained for another base model: its prefix has {got[0]} layers of {got[1]} "
                              f"key/value heads of {got[2]} features, the served base model {base[0]}, {base[1]} and {base[2]}")


def _check_targets_agree(targets: list[str] | str | None, modules: Mapping[str, LoraModule | Ia3Module]) -> None:
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


def _module_key(key: str) -> str:
    """A tensor key without PEFT's prefix; a key that cannot name a module is refused."""
    if not _TENSOR_KEY.fullmatch(key):
        raise InvalidAdapter(
            f"{WEIGHTS_FILE}: tensor key {quote(key)} is not a module path "
            "(1-512 characters of letters, digits, '_', '.', '-')"
        )
    return key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key


def _pair_tensors(index: SafetensorsIndex) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Map PEFT keys to module paths: {path: {"A": key, "B": key}}, {path: magnitude key}."""
    found: dict[str, dict[str, str]] = {}
    magnitudes: dict[str, str] = {}
    adapter_names = set()
    for key in index.tensors:
        path = _module_key(key)
        m = _LORA_KEY.match(path)
        if m is None:
            mag = _MAGNITUDE_KEY.match(path)
            if mag is None:
                raise _unexpected_tensor(key)
            adapter_names.add(mag["adapter"])
            if mag["module"] in magnitudes:
                raise InvalidAdapter(f"{WEIGHTS_FILE} holds two DoRA magnitude vectors for {mag['module']}")
            magnitudes[mag["module"]] = key
            continue
        adapter_names.add(m["adapter"])
        slot = found.setdefault(m["module"], {})
        if m["ab"] in slot:
            raise InvalidAdapter(f"{WEIGHTS_FILE} holds two lora_{m['ab']} tensors for {m['module']}")
        slot[m["ab"]] = key
    if len(adapter_names) > 1:
        names = sorted(n or "(none)" for n in adapter_names)
        raise InvalidAdapter(f"{WEIGHTS_FILE} mixes several adapters ({', '.join(names)}); push one at a time")
    return found, magnitudes


def _unexpected_tensor(key: str) -> AdapterdError:
    if "lora_embedding_" in key:
        return UnknownTargetModule(f"tensor {quote(key)}: LoRA on embeddings is not supported, only on linear layers")
    if ".lora_B" in key and key.endswith(".bias"):
        return UnsupportedAdapter(f"tensor {quote(key)}: a lora_B bias (lora_bias) is not supported")
    if "modules_to_save" in key or "trainable_tokens" in key:
        return UnsupportedAdapter(f"tensor {quote(key)}: only LoRA A/B weights can be served, not full module copies")
    return UnsupportedAdapter(
        f"tensor {quote(key)} is not a LoRA A/B weight (expected '<module>.lora_A.weight' and '.lora_B.weight'); "
        "bias and other trained parameters are not supported"
    )


def _check_fits_base(modules: dict[str, LoraModule | Ia3Module], linear_shapes: Mapping[str, tuple[int, int]]) -> None:
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
        if isinstance(mod, Ia3Module):
            want = base_in if mod.feedforward else base_out
            if mod.features != want:
                side = "input" if mod.feedforward else "output"
                raise AdapterMismatch(
                    f"adapter was trained for another base model: module {path}'s IA3 vector scales {mod.features} "
                    f"{side} features, the served base model's layer has {want}"
                )
            continue
        if (mod.in_features, mod.out_features) != (base_in, base_out):
            raise AdapterMismatch(
                f"adapter was trained for another base model: module {path} takes {mod.in_features} -> "
                f"{mod.out_features} features in the adapter, {base_in} -> {base_out} in the served base model"
            )


def _leaf_names(linear_shapes: Mapping[str, tuple[int, int]]) -> str:
    return ", ".join(sorted({p.rsplit(".", 1)[-1] for p in linear_shapes}))

