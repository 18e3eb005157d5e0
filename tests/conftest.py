"""Shared fixtures: tiny random models built from configs, and random PEFT adapters.

Nothing is downloaded. Models are written once per test session into a temp directory
with the byte-level tokenizer of the demo model; every quantized out_features is a
multiple of 32 (bitsandbytes' CPU path needs it).
"""

from __future__ import annotations

from pathlib import Path

import pytest

# initializer_range 0.2: peaky logits, so greedy comparisons are not decided by near-ties.
TINY = {
    "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2),
    "phi": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=512, partial_rotary_factor=0.5, initializer_range=0.2),
    "falcon": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, alibi=False,
                   bias=False, new_decoder_architecture=False, multi_query=True, initializer_range=0.2),
}
TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "phi": ["q_proj", "k_proj", "v_proj", "dense", "fc1", "fc2"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
}


def _vocab():
    from adapterd.engine.demo import VOCAB_SIZE

    return VOCAB_SIZE


@pytest.fixture(scope="session")
def model_factory(tmp_path_factory):
    """model_factory(arch) -> directory of a tiny random model of that architecture."""
    from adapterd.engine.demo import save_random_model

    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def make(arch: str, seed: int = 0) -> Path:
        key = f"{arch}-{seed}"
        if key not in built:
            built[key] = save_random_model(root / key, arch, dict(TINY[arch], vocab_size=_vocab()), seed)
        return built[key]

    return make


def make_peft_adapter(base_dir: Path, out_dir: Path, *, arch: str, seed: int, rank: int = 8,
                      alpha: int = 16, targets: list[str] | None = None, use_rslora: bool = False) -> Path:
    """Train nothing: a PEFT LoRA adapter with random A and B (init_lora_weights=False)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or TARGETS[arch],
                        init_lora_weights=False, use_rslora=use_rslora, lora_dropout=0.0)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


@pytest.fixture(scope="session")
def adapter_factory(tmp_path_factory):
    """adapter_factory(base_dir, arch, seed, **kw) -> a PEFT adapter directory (cached)."""
    root = tmp_path_factory.mktemp("adapters")
    built: dict[tuple, Path] = {}

    def make(base_dir: Path, arch: str, seed: int, **kw) -> Path:
        key = (str(base_dir), arch, seed, tuple(sorted((k, str(v)) for k, v in kw.items())))
        if key not in built:
            built[key] = make_peft_adapter(base_dir, root / f"{arch}-{seed}-{len(built)}", arch=arch, seed=seed, **kw)
        return built[key]

    return make
