"""The adapter rules and the error hierarchy, shared by the server (adapterd) and the client
(adapterctl), without torch or grpc: the one place where an adapter, a name or a reference
is checked, and where every failure gets its status code.

    errors.py              one exception class per failure a user can act on, with its gRPC code
    names.py               names `[a-z0-9][a-z0-9._-]{0,63}`; "tenant/name@3" (parse_ref)
    text.py                quoting input in messages; free text shown to other users
    files.py               the two files of an adapter, a directory of them, their sha256 identity
    lora_config.py         adapter_config.json of a LoRA (or DoRA) adapter
    kinds.py               the kinds served (LoRA, DoRA, IA3, prompt and prefix tuning), their configs
    safetensors_header.py  the safetensors header: dtypes, shapes, byte ranges
    adapter.py             the whole adapter, and its fit to the served base model

`adapterctl push` runs these before the upload and the server runs them again at push time
(then loads the tensors with torch, adapterd/registry/validate.py). Nothing here reads
tensor values: the header alone says every tensor's dtype, shape and byte range, and that
is enough to check names, ranks, shapes and sizes.
"""

from adapterd_rules.adapter import (
    PEFT_PREFIX,
    PROMPT_KEY,
    CheckedAdapter,
    Ia3Module,
    LoraModule,
    PromptShape,
    check_adapter,
)
from adapterd_rules.errors import *  # noqa: F403 - the hierarchy is part of this package's API
from adapterd_rules.errors import __all__ as _error_names
from adapterd_rules.files import (
    ADAPTER_FILES,
    CONFIG_FILE,
    PICKLED_FILES,
    WEIGHTS_FILE,
    adapter_digest,
    read_adapter_dir,
    require_adapter_files,
    sha256_file,
)
from adapterd_rules.kinds import (
    DEFAULT_MAX_VIRTUAL_TOKENS,
    KINDS,
    MIXABLE_KINDS,
    PROMPT_KINDS,
    Ia3Settings,
    PromptSettings,
    Settings,
    parse_config,
)
from adapterd_rules.lora_config import (
    MAX_ABS_WEIGHT,
    MAX_CONFIG_BYTES,
    MAX_DELTA,
    MAX_SCALING,
    LoraSettings,
    check_scaling,
    parse_lora_config,
    read_config,
)
from adapterd_rules.names import NAME_PATTERN, NAME_RE, check_name, is_name, parse_ref
from adapterd_rules.safetensors_header import (
    DTYPE_SIZES,
    MAX_HEADER_BYTES,
    SERVABLE_DTYPES,
    SafetensorsIndex,
    TensorInfo,
    check_safetensors_start,
    read_safetensors_header,
)
from adapterd_rules.text import MAX_DESCRIPTION_CHARS, check_text, control_character, quote

__all__ = [
    *_error_names,
    "PEFT_PREFIX", "PROMPT_KEY", "CheckedAdapter", "Ia3Module", "LoraModule", "PromptShape", "check_adapter",
    "ADAPTER_FILES", "CONFIG_FILE", "PICKLED_FILES", "WEIGHTS_FILE", "adapter_digest", "read_adapter_dir",
    "require_adapter_files", "sha256_file",
    "MAX_ABS_WEIGHT", "MAX_CONFIG_BYTES", "MAX_DELTA", "MAX_SCALING", "LoraSettings", "check_scaling",
    "parse_lora_config", "read_config",
    "DEFAULT_MAX_VIRTUAL_TOKENS", "KINDS", "MIXABLE_KINDS", "PROMPT_KINDS", "Ia3Settings", "PromptSettings", "Settings",
    "parse_config",
    "NAME_PATTERN", "NAME_RE", "check_name", "is_name", "parse_ref",
    "DTYPE_SIZES", "MAX_HEADER_BYTES", "SERVABLE_DTYPES", "SafetensorsIndex", "TensorInfo",
    "check_safetensors_start", "read_safetensors_header",
    "MAX_DESCRIPTION_CHARS", "check_text", "control_character", "quote",
]
