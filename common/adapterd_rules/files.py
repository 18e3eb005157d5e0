"""The files of a PEFT adapter: which they are, reading a directory of them, their identity."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

from adapterd_rules.errors import AdapterdError, InvalidAdapter, InvalidArgument, PickledWeights
from adapterd_rules.text import quote

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLED_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)  # what the registry stores, in this order

_PICKLE_HELP = (
    "is a pickle and is never loaded (unpickling runs code). Convert it to safetensors: "
    "PeftModel.save_pretrained(dir, safe_serialization=True), or load it with torch.load and save "
    f"it with safetensors.torch.save_file as {WEIGHTS_FILE}"
)


def load_json(data: bytes, what: str, error: type[AdapterdError], **kw):
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


def require_adapter_files(names: set[str], *, ignored: set[str] = frozenset()) -> None:
    """The file-name rules of an adapter, for a mapping of files or a push header: both
    files present, a lone pickle refused with how to convert it, nothing else but `ignored`."""
    pickled = names & set(PICKLED_FILES)
    if pickled and WEIGHTS_FILE not in names:
        raise PickledWeights(f"{sorted(pickled)[0]} {_PICKLE_HELP}")
    unexpected = names - set(ADAPTER_FILES) - ignored
    if unexpected:
        raise InvalidArgument(
            f"unexpected file(s) {quote(sorted(unexpected))}: an adapter is {CONFIG_FILE} and {WEIGHTS_FILE}"
        )
    for required in ADAPTER_FILES:
        if required not in names:
            raise InvalidAdapter(f"the adapter has no {required}")


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
            raise PickledWeights(f"{pickled[0]} {_PICKLE_HELP}")
        raise InvalidAdapter(f"{path} has no {WEIGHTS_FILE}")
    config = path / CONFIG_FILE
    if not config.exists():
        raise InvalidAdapter(f"{path} has no {CONFIG_FILE}")
    for f in (config, weights):
        real = f.resolve()
        if not real.is_relative_to(root) or not real.is_file():
            raise InvalidAdapter(f"{f} is a link out of {path} or not a regular file; copy the file in")
    return config.read_bytes(), weights


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
