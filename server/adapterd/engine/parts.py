"""What the engine loop is given: the loaded model with its LoRA slots, and torch's threads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from adapterd.config import CacheConfig, ModelConfig
from adapterd.resolve import ModelSpec

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

    from adapterd.engine.lora import LoraSlots


@dataclass
class EngineParts:
    """What the engine loop drives: built once, owned by the loop thread afterwards."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    slots: LoraSlots
    spec: ModelSpec


def load_engine_parts(model_config: ModelConfig, cache_config: CacheConfig) -> EngineParts:
    """Load the base model (stored as --quantization says) and give it the LoRA slots. The
    base model is whatever --base-model may name: a directory, a GGUF file, demo, unset."""
    import torch

    from adapterd.engine.lora import inject_lora
    from adapterd.engine.model import base_model_dir, default_device, load_base_model, parse_dtype

    path = base_model_dir(model_config.base_model)  # a GGUF file is converted on first use
    device = default_device() if model_config.device == "auto" else torch.device(model_config.device)
    dtype = parse_dtype(model_config.compute_dtype, device)
    model, tokenizer, spec = load_base_model(path, device=device, compute_dtype=dtype,
                                             quantization=model_config.quantization)
    slots = inject_lora(model, num_slots=cache_config.gpu_slots + 1, max_rank=cache_config.max_rank)
    return EngineParts(model, tokenizer, slots, spec)


def set_torch_threads(requested: int) -> int:
    """Set torch's CPU threads (process-wide) to `requested`, or for 0 to the usable cores,
    capped by what OMP_NUM_THREADS already set. Returns the number set. The gRPC threads
    get their share because idle OpenMP workers spin only briefly (see __main__.py)."""
    import torch

    if requested <= 0:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        requested = max(1, min(torch.get_num_threads(), cores))
    torch.set_num_threads(requested)
    return requested
