"""adapter_config.json: what the server needs of it, and the options it cannot serve."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from adapterd_rules.errors import InvalidAdapter, UnsupportedAdapter
from adapterd_rules.files import CONFIG_FILE, load_json
from adapterd_rules.text import quote

MAX_CONFIG_BYTES = 1 << 20  # a LoRA config is a few KiB

# Bounds that keep an adapter's outputs finite. A real adapter's scaling (lora_alpha / r, or
# / sqrt(r) with rsLoRA) is about 0.5-16 and its weights well below 1; these are far above
# that and far below where float16 (max 65504) or float32 overflows.
MAX_SCALING = 1e4
MAX_ABS_WEIGHT = 1e4  # |lora_A| and |scaling * lora_B|, element-wise
MAX_DELTA = 1e4  # |scaling * (B @ A)| per weight, bounded by scaling * r * max|A| * max|B|

# LoRA options that change the forward pass (or what is in the file) beyond plain
# `base(x) + scale * B(A(x))` (or DoRA's, use_dora); serving them as plain LoRA would give
# wrong outputs.
_UNSERVABLE_OPTIONS = {
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



@dataclass(frozen=True)
class LoraSettings:
    """What the server needs from adapter_config.json."""

    rank: int
    alpha: float
    use_rslora: bool
    target_modules: list[str] | str | None  # as written in the config
    base_model: str  # base_model_name_or_path, informational
    raw: dict = field(repr=False)
    use_dora: bool = False  # DoRA: a magnitude vector per module rescales each output

    @property
    def kind(self) -> str:
        return "dora" if self.use_dora else "lora"

    @property
    def scaling(self) -> float:
        # rsLoRA: alpha / sqrt(r), which keeps the update's scale stable across ranks.
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)


def read_config(config_bytes: bytes) -> dict:
    """adapter_config.json as a JSON object with a peft_type."""
    if len(config_bytes) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{CONFIG_FILE} is {len(config_bytes)} bytes; an adapter config is a few KiB")
    cfg = load_json(config_bytes, CONFIG_FILE, InvalidAdapter)
    if not isinstance(cfg, dict):
        raise InvalidAdapter(f"{CONFIG_FILE} must be a JSON object, got {type(cfg).__name__}")
    if cfg.get("peft_type") is None:
        raise InvalidAdapter(f"{CONFIG_FILE} has no peft_type: not a PEFT adapter config")
    return cfg


def parse_lora_config(cfg: dict, *, max_rank: int | None = None) -> LoraSettings:
    """A LORA config (read_config's object): plain LoRA, rsLoRA or DoRA."""
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
    dora = cfg.get("use_dora", False)
    if not isinstance(dora, bool):
        raise InvalidAdapter(f"{CONFIG_FILE}: use_dora must be true or false, got {quote(dora)}")
    base = cfg.get("base_model_name_or_path") or ""
    settings = LoraSettings(r, float(alpha), rslora, targets, str(base), cfg, dora)
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

