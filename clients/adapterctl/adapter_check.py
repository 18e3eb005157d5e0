"""The adapter rules, without torch: names, adapter_config.json, the safetensors header.

One module holds the rules so `adapterctl push` finds a mistake before the upload and the
server refuses the same things at push time (server/adapterd/registry/validate.py imports
this module, then loads the tensors with torch). Nothing here reads tensor values: the
header alone says every tensor's dtype, shape and byte range, and that is enough to check
names, ranks, shapes and sizes.

    adapter_config.json        peft_type LORA, r, lora_alpha, options we can serve
    adapter_model.safetensors  [u64 n][n bytes of JSON header][data]
                               header: key -> {dtype, shape, data_offsets: [begin, end]}
                               key:    base_model.model.<module path>.lora_{A,B}.weight
                               A: (r, in)  B: (out, r)  for each module's (in, out)

The errors here are plain exceptions with the same names as the server's typed errors
(adapterd.errors); the server translates them one to one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what the registry stores, in this order

MAX_CONFIG_BYTES = 1 << 20  # a LoRA config is a few KiB
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; far above any real adapter's header
PEFT_PREFIX = "base_model.model."
MAX_DESCRIPTION_CHARS = 4096

# Bounds that keep an adapter's outputs finite. A real adapter's scaling (lora_alpha / r, or
# / sqrt(r) with rsLoRA) is about 0.5-16 and its weights well below 1; these are far above
# that and far below where float16 (max 65504) or float32 overflows.
MAX_SCALING = 1e4
MAX_ABS_WEIGHT = 1e4  # |lora_A| and |scaling * lora_B|, element-wise
MAX_DELTA = 1e4  # |scaling * (B @ A)| per weight, bounded by scaling * r * max|A| * max|B|

NAME_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
TENANT_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

# Bytes per element for every dtype safetensors defines; the loadable ones are SERVABLE.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
SERVABLE_DTYPES = ("F32", "F16", "BF16", "F64")

# What a tensor key of a PEFT adapter is made of (module paths are Python attribute names
# and layer numbers); anything else cannot name a module, and is never echoed as it is.
_TENSOR_KEY = re.compile(r"[A-Za-z0-9_.-]{1,512}")
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[A-Za-z0-9_-]+))?\.weight$")

# LoRA options that change the forward pass (or what is in the file) beyond plain
# `base(x) + scale * B(A(x))`; serving them as plain LoRA would give wrong outputs.
_UNSERVABLE_OPTIONS = {
    "use_dora": "DoRA (use_dora) adds a magnitude vector; merge the adapter or retrain without DoRA",
    "lora_bias": "lora_bias adds a bias to lora_B; retrain with lora_bias=False",
    "use_qalora": "QALoRA (use_qalora) pools the input; retrain with plain LoRA",
    "layer_replication": "layer_replication changes the base model's layers",
    "rank_pattern": "rank_pattern (a rank per module) is not supported; use one r for all modules",
    "alpha_pattern": "alpha_pattern (an alpha per module) is not supported; use one lora_alpha",
    "modules_to_save": "modules_to_save stores full copies of base modules; only LoRA A/B weights can be served",
    "trainable_token_indices": "trainable_token_indices changes the embeddings; only LoRA A/B weights can be served",
    "target_parameters": "target_parameters (LoRA on raw parameters, e.g. MoE experts) is not supported",
    "alora_invocation_tokens": "activated LoRA (alora_invocation_tokens) is not supported",
    "kasa_config": "KaSA (kasa_config) changes the base weights and the LoRA forward",
    "monteclora_config": "MonteCLoRA (monteclora_config) is not supported",
    "arrow_config": "Arrow routing (arrow_config) is not supported",
    "use_bdlora": "block-diagonal LoRA (use_bdlora) is not supported",
    "megatron_config": "Megatron parallel LoRA layers (megatron_config) are not supported",
}


class CheckError(Exception):
    """An adapter or a name that the server would refuse. Subclasses mirror adapterd.errors."""


# ---- echoing input ------------------------------------------------------------------------

QUOTE_CHARS = 120


def quote(value, limit: int = QUOTE_CHARS) -> str:
    """`value` as an error message may echo it: repr() (so control characters come out
    escaped), cut to `limit` characters. A message never carries a whole hostile input: a
    100,000-character name must not become a 100 KB status message."""
    text = repr(value)
    if len(text) <= limit:
        return text
    size = f"{len(value)} characters" if isinstance(value, str) else f"{len(text)} characters as text"
    return f"{text[:limit]}... ({size})"


def control_character(text: str) -> tuple[int, str] | None:
    """(position, character) of the first character that a terminal would act on instead of
    showing (C0 and C1 controls, DEL, line and paragraph separators), or None."""
    for i, ch in enumerate(text):
        if unicodedata.category(ch) in ("Cc", "Zl", "Zp"):
            return i, ch
    return None


def check_text(text: str, field: str, max_chars: int = MAX_DESCRIPTION_CHARS) -> str:
    """A free-text field shown to other users (a description): bounded, and one line of
    printable text, so it cannot move another user's cursor, retitle or clear a terminal."""
    if len(text) > max_chars:
        raise InvalidText(f"{field} is {len(text)} characters; at most {max_chars} are allowed")
    found = control_character(text)
    if found is not None:
        i, ch = found
        raise InvalidText(
            f"{field} holds a control character (U+{ord(ch):04X} at position {i}); "
            "use one line of printable text"
        )
    return text


class InvalidName(CheckError):
    pass


class InvalidText(CheckError):
    """A free-text field (a description) that cannot be shown as it is."""


class InvalidAdapter(CheckError):
    pass


class PickledWeights(InvalidAdapter):
    pass


class UnsupportedAdapter(InvalidAdapter):
    pass


class CorruptSafetensors(InvalidAdapter):
    pass


class UnknownTargetModule(InvalidAdapter):
    pass


class AdapterMismatch(CheckError):
    """Trained for another base model (FAILED_PRECONDITION on the server)."""


class AdapterTooLarge(CheckError):
    pass


# ---- names -------------------------------------------------------------------------------


def check_name(name: str, what: str = "adapter name") -> str:
    """A registry name: `[a-z0-9][a-z0-9._-]{0,63}`, never a path or anything like one."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise InvalidName(
            f"{what} {quote(name)} is not valid: use 1-64 characters of a-z, 0-9, '.', '_', '-', "
            "starting with a letter or digit, without '..'"
        )
    return name


def parse_ref(ref: str) -> tuple[str | None, str, int | None]:
    """"name", "name@3", "tenant/name", "tenant/name@3" -> (tenant or None, name, version or None)."""
    if not isinstance(ref, str) or not ref:
        raise InvalidName("adapter reference is empty: use 'name', 'name@3' or 'tenant/name@3'")
    rest, version = ref, None
    if "@" in ref:
        rest, _, v = ref.rpartition("@")
        # Exactly the digits a version is printed with: "name@01" is not another spelling of
        # "name@1" (one ref, one spelling: routing and caches compare them as strings).
        if not (v.isascii() and v.isdigit() and len(v) <= 9 and v[0] != "0"):
            raise InvalidName(
                f"adapter reference {quote(ref)}: the version after '@' must be a number >= 1, "
                "without leading zeros"
            )
        version = int(v)
    tenant = None
    if "/" in rest:
        tenant, _, rest = rest.partition("/")
        check_name(tenant, "tenant")
    check_name(rest)
    return tenant, rest, version


# ---- adapter_config.json ------------------------------------------------------------------


@dataclass(frozen=True)
class LoraSettings:
    """What the server needs from adapter_config.json."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str] | str | None  # as written in the config
    base_model: str  # base_model_name_or_path, informational
    raw: dict = field(repr=False)

    @property
    def scaling(self) -> float:
        # rsLoRA: alpha / sqrt(r), which keeps the update's scale stable across ranks.
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def parse_config(config_bytes: bytes, *, max_rank: int | None = None) -> LoraSettings:
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_FILE} is {len(config_bytes)} bytes; a LoRA config is a few KiB")
    cfg = _load_json(config_bytes, CONFIG_FILE, InvalidAdapter)
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must be a JSON object, got {type(cfg).__name__}")
    peft_type = cfg.get("peft_type")
    if peft_type is None:
        raise InvalidAdapter(f"{CONFIG_FILE} has no peft_type: not a PEFT adapter config")
    if not isinstance(peft_type, str) or peft_type.upper() != "LORA":
        raise UnsupportedAdapter(f"peft_type {quote(peft_type)} is not supported: only LORA adapters can be served")
    if peft_type != "LORA":  # PEFT itself reads only "LORA" (PeftType is case-sensitive)
        raise InvalidAdapter(f'{CONFIG_FILE}: peft_type must be "LORA", as PEFT writes it; got {quote(peft_type)}')
    for option, why in _UNSERVABLE_OPTIONS.items():
        if cfg.get(option):
            raise UnsupportedAdapter(f"{CONFIG_FILE}: {why}")
    bias = cfg.get("bias", "none")
    if bias not in ("none", None):
        raise UnsupportedAdapter(f"{CONFIG_FILE}: bias={quote(bias)} trains base biases; only bias='none' can be served")
    r = cfg.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InvalidAdapter(f"{CONFIG_FILE}: r must be a positive integer, got {quote(r)}")
    if max_rank is not None and r > max_rank:
        raise UnsupportedAdapter(f"rank r={r} is above this server's max rank {max_rank} (--max-rank)")
    alpha = cfg.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidAdapter(f"{CONFIG_FILE}: lora_alpha must be a number, got {quote(alpha)}")
    rslora = cfg.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InvalidAdapter(f"{CONFIG_FILE}: use_rslora must be true or false, got {quote(rslora)}")
    targets = cfg.get("target_modules")
    if targets is not None and not (
        isinstance(targets, str) or (isinstance(targets, list) and all(isinstance(t, str) for t in targets))
    ):
        raise InvalidAdapter(f"{CONFIG_FILE}: target_modules must be a list of names or a string, got {quote(targets)}")
    base = cfg.get("base_model_name_or_path") or ""
    settings = LoraSettings(r, float(alpha), rslora, targets, str(base), cfg)
    check_scaling(settings.scaling, f"{CONFIG_FILE}: lora_alpha {alpha:g} with r={r}"
                  + (" (rsLoRA: lora_alpha / sqrt(r))" if rslora else " (lora_alpha / r)"))
    return settings


def check_scaling(scaling: float, what: str) -> None:
    """A scaling the forward can multiply by without overflowing (`what` says where it came from)."""
    if not (math.isfinite(scaling) and abs(scaling) <= MAX_SCALING):
        raise InvalidAdapter(
            f"{what} gives a LoRA scaling of {scaling:g}, above the limit of {MAX_SCALING:g}: "
            "its outputs would not be finite numbers; lower lora_alpha"
        )


def _load_json(data: bytes, what: str, error: type[CheckError], **kw):
    """json.loads, with every way it can fail as `error` naming `what`: not UTF-8, not JSON,
    or nested deeper than the parser recurses (a header of 100,000 '[')."""
    try:
        return json.loads(data.decode("utf-8"), **kw)
    except UnicodeDecodeError as e:
        raise error(f"{what} is not valid JSON: not UTF-8 ({e.reason} at byte {e.start})") from e
    except RecursionError as e:
        raise error(f"{what} is not valid JSON for this server: it nests arrays or objects too deeply") from e
    except ValueError as e:
        raise error(f"{what} is not valid JSON: {e}") from e


# ---- safetensors header -------------------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets into the data section, which starts at data_start in the file
    end: int


@dataclass(frozen=True)
class SafetensorsIndex:
    data_start: int  # 8 + header length
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    file_size: int


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise CorruptSafetensors(f"{WEIGHTS_FILE}: header repeats the key {quote(k)}")
        out[k] = v
    return out


def read_safetensors_header(source: bytes | memoryview | Path, *, max_header: int = MAX_HEADER_BYTES) -> SafetensorsIndex:
    """Parse and check the header of a safetensors file (bytes or a path), reading no data.

    Checks: the length prefix is within the file and the cap; the header is a JSON object
    of tensors with known dtypes, whole non-negative shapes and data_offsets whose size is
    numel * dtype size; the ranges do not overlap and tile the data section exactly, so a
    truncated file or trailing junk is caught here.
    """
    if isinstance(source, (str, Path)):
        with open(source, "rb") as f:
            file_size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            n = _header_length(prefix, file_size, max_header)
            header = f.read(n)
    else:
        file_size = len(source)
        n = _header_length(bytes(source[:8]), file_size, max_header)
        header = bytes(source[8 : 8 + n])
    if len(header) != n:
        raise CorruptSafetensors(f"{WEIGHTS_FILE} is truncated inside its header")
    return _parse_header(header, file_size)


def check_safetensors_start(start: bytes, file_size: int, *, max_header: int = MAX_HEADER_BYTES) -> SafetensorsIndex | None:
    """The same checks on the first bytes of a `file_size`-byte safetensors file as they
    arrive (an upload): raises as soon as they show the file is invalid, returns the index
    once `start` holds the whole header, None while it needs more bytes."""
    if file_size < 8 or len(start) >= 8:
        n = _header_length(bytes(start[:8]), file_size, max_header)
        if len(start) >= 8 + n:
            return _parse_header(bytes(start[8 : 8 + n]), file_size)
    return None


def _parse_header(header: bytes, file_size: int) -> SafetensorsIndex:
    obj = _load_json(header, f"{WEIGHTS_FILE}: header", CorruptSafetensors, object_pairs_hook=_no_duplicate_keys)
    if not isinstance(obj, dict):
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: header must be a JSON object")
    metadata = obj.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: __metadata__ must map strings to strings")
    data_size = file_size - 8 - len(header)
    tensors = {key: _tensor_info(key, entry) for key, entry in obj.items()}
    _check_tiling(tensors, data_size)
    return SafetensorsIndex(8 + len(header), tensors, metadata, file_size)


def _header_length(prefix: bytes, file_size: int, max_header: int) -> int:
    if len(prefix) < 8:
        raise CorruptSafetensors(f"{WEIGHTS_FILE} is {file_size} bytes: too short to hold a header")
    (n,) = struct.unpack("<Q", prefix)
    if n > max_header:
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: header length {n} is above the {max_header}-byte limit")
    if 8 + n > file_size:
        raise CorruptSafetensors(
            f"{WEIGHTS_FILE}: header length {n} runs past the end of the {file_size}-byte file (truncated?)"
        )
    if n < 2:
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: header length {n} is too small")
    return n


def _tensor_info(key: str, entry) -> TensorInfo:
    if not isinstance(entry, dict):
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: header entry {quote(key)} is not an object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in DTYPE_SIZES:
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: tensor {quote(key)} has an unknown dtype {quote(dtype)}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: tensor {quote(key)} has an invalid shape {quote(shape)}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: tensor {quote(key)} has invalid data_offsets {quote(offsets)}")
    begin, end = offsets
    if begin > end:
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: tensor {quote(key)} has data_offsets that end before they begin")
    expected = math.prod(shape) * DTYPE_SIZES[dtype]
    if end - begin != expected:
        raise CorruptSafetensors(
            f"{WEIGHTS_FILE}: tensor {quote(key)} of shape {shape} and dtype {dtype} needs {expected} bytes, "
            f"its data_offsets give {end - begin}"
        )
    return TensorInfo(dtype, tuple(shape), begin, end)


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_tiling(tensors: dict[str, TensorInfo], data_size: int) -> None:
    pos = 0
    for key, info in sorted(tensors.items(), key=lambda kv: (kv[1].begin, kv[1].end)):
        if info.begin < pos:
            raise CorruptSafetensors(f"{WEIGHTS_FILE}: tensor {quote(key)} overlaps the tensor before it")
        if info.begin > pos:
            raise CorruptSafetensors(f"{WEIGHTS_FILE}: a gap of unindexed bytes before tensor {quote(key)}")
        pos = info.end
    if pos > data_size:
        raise CorruptSafetensors(
            f"{WEIGHTS_FILE} is truncated: its tensors need {pos} data bytes, the file holds {data_size}"
        )
    if pos < data_size:
        raise CorruptSafetensors(f"{WEIGHTS_FILE}: {data_size - pos} bytes after the last tensor")


# ---- the whole adapter --------------------------------------------------------------------


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


def _unexpected_tensor(key: str) -> CheckError:
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


def read_adapter_dir(path: Path) -> tuple[bytes, Path]:
    """The config bytes and the weights path of an adapter directory, refusing a pickled
    .bin, a missing file, and files that are symlinks pointing out of the directory."""
    path = Path(path)
    if not path.is_dir():
        raise InvalidAdapter(f"{path} is not a directory holding {CONFIG_FILE} and {WEIGHTS_FILE}")
    root = path.resolve()
    weights = path / WEIGHTS_FILE
    if not weights.exists():
        pickled = [n for n in PICKLED_FILES if (path / n).exists()]
        if pickled:
            raise PickledWeights(
                f"{pickled[0]} is a pickle and is never loaded (unpickling runs code). Convert it to "
                f"safetensors: load it with torch.load and save with safetensors.torch.save_file as "
                f"{WEIGHTS_FILE}, or call PeftModel.save_pretrained(dir, safe_serialization=True)"
            )
        raise InvalidAdapter(f"{path} has no {WEIGHTS_FILE}")
    config = path / CONFIG_FILE
    if not config.exists():
        raise InvalidAdapter(f"{path} has no {CONFIG_FILE}")
    for f in (config, weights):
        real = f.resolve()
        if not real.is_relative_to(root) or not real.is_file():
            raise InvalidAdapter(f"{f} is a link out of {path} or not a regular file; copy the file in")
    return config.read_bytes(), weights


# ---- content identity ---------------------------------------------------------------------


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def adapter_digest(file_sha256: Mapping[str, str]) -> str:
    """One sha256 for an adapter version: over the sorted "file-name sha256" lines. Two
    versions with the same files share it, so caches keyed by it never serve stale weights."""
    manifest = "".join(f"{name} {file_sha256[name]}\n" for name in sorted(file_sha256))
    return hashlib.sha256(manifest.encode()).hexdigest()
