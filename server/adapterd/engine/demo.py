"""The demo base model (`--base-model demo`): a small random Llama with a byte-level
tokenizer, for tests and for benchmarks of the engine alone, where a random model is the
point. (The default base model is a real one: engine/gguf.py.)

Built deterministically on first use into a cache directory, with no download. The same
seed gives the same files, byte for byte. The same builders make the tiny models the tests
use (Llama, Phi, Falcon configs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

# Special tokens after the 256 byte tokens. Their ids are fixed: 256.. in this order.
SPECIAL_TOKENS = ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)  # byte tokens + specials: no id the tokenizer cannot decode

CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

DEMO_SEED = 0
DEMO_CONFIG = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=256,
    intermediate_size=768,  # every quantized out_features divisible by 32
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
)


def build_tokenizer():
    """A byte-level tokenizer: one token per byte, so any text round-trips exactly."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    # alphabet() is a set: order by the byte each char stands for, so ids are stable.
    vocab = {ch: i for i, ch in enumerate(sorted(byte_chars, key=_byte_of_char))}
    for i, tok in enumerate(SPECIAL_TOKENS):
        vocab[tok] = 256 + i
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        bos_token="<|bos|>",
        eos_token="<|eos|>",
        additional_special_tokens=SPECIAL_TOKENS[3:],
        clean_up_tokenization_spaces=False,
        model_max_length=DEMO_CONFIG["max_position_embeddings"],
    )
    fast.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[3:]})
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _byte_of_char(ch: str) -> int:
    # GPT-2's byte-to-unicode map: printable bytes map to themselves, the rest to 256+n.
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    code = ord(ch)
    if code in printable:
        return code
    others = [b for b in range(256) if b not in printable]
    return others[code - 256]


def save_random_model(path: Path, arch: str, config_overrides: dict, seed: int) -> Path:
    """Write a random-weight causal LM of `arch` ("llama", "phi", "falcon", ...) with the
    byte tokenizer to `path`. Deterministic for a given seed."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config = AutoConfig.for_model(
        arch,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **config_overrides,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path


def demo_model_dir(cache_dir: Path | None = None, seed: int = DEMO_SEED) -> Path:
    """Return the demo model directory, building it on first use.

    The directory name carries a hash of the spec, so a changed spec builds anew instead
    of reusing stale files. The build goes to a temporary directory that is renamed into
    place, so a crash never leaves a half-built model that looks complete.
    """
    cache_dir = Path(cache_dir or default_cache_dir())
    spec = json.dumps({"config": DEMO_CONFIG, "seed": seed, "v": 1}, sort_keys=True)
    digest = hashlib.sha256(spec.encode()).hexdigest()[:12]
    target = cache_dir / f"demo-llama-{digest}"
    if (target / "config.json").exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=cache_dir))
    try:
        save_random_model(tmp, "llama", DEMO_CONFIG, seed)
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "config.json").exists():  # lost a race to another builder: fine
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_cache_dir() -> Path:
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "adapterd"
