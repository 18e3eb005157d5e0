"""The safetensors header, checked without reading a tensor value.

    adapter_model.safetensors  [u64 n][n bytes of JSON header][data]
                               header: key -> {dtype, shape, data_offsets: [begin, end]}
"""

from __future__ import annotations

import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from adapterd_rules.errors import CorruptSafetensors
from adapterd_rules.files import WEIGHTS_FILE, load_json
from adapterd_rules.text import quote

MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit; far above any real adapter's header

# Bytes per element for every dtype safetensors defines; the loadable ones are SERVABLE.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}
SERVABLE_DTYPES = ("F32", "F16", "BF16", "F64")


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
    obj = load_json(header, f"{WEIGHTS_FILE}: header", CorruptSafetensors, object_pairs_hook=_no_duplicate_keys)
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

