"""The kinds of PEFT adapter the server serves, and their adapter_config.json.

    kind           peft_type        what it changes                     tensors (PEFT's keys)
    lora           LORA             y += scale * B A x                  <module>.lora_A/B.weight
    dora           LORA, use_dora   y = m / ||W + scale B A|| * (...)   + <module>.lora_magnitude_vector
    ia3            IA3              x *= l (feedforward) or y *= l      <module>.ia3_l
    prompt_tuning  PROMPT_TUNING    virtual tokens before the prompt    prompt_embeddings (n, hidden)
    prefix_tuning  PREFIX_TUNING    keys and values before the prompt,  prompt_embeddings
                                    per layer                           (n, layers * 2 * kv_heads * head_dim)

Only LoRA adapters can be mixed in one request (weighted sums of deltas of one form).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from adapterd_rules.errors import InvalidAdapter, UnsupportedAdapter
from adapterd_rules.files import CONFIG_FILE
from adapterd_rules.lora_config import LoraSettings, parse_lora_config, read_config
from adapterd_rules.text import quote

KINDS = ("lora", "dora", "ia3", "prompt_tuning", "prefix_tuning")
MIXABLE_KINDS = ("lora",)
PROMPT_KINDS = ("prompt_tuning", "prefix_tuning")

# Virtual tokens a prompt- or prefix-tuning adapter may prepend, unless the server says
# otherwise (--max-virtual-tokens): they take KV cache and prefill time on every request.
DEFAULT_MAX_VIRTUAL_TOKENS = 128

PEFT_TYPES = frozenset({"LORA", "IA3", "PROMPT_TUNING", "PREFIX_TUNING"})
_SERVED_TYPES = "LORA (with or without DoRA), IA3, PROMPT_TUNING and PREFIX_TUNING"


@dataclass(frozen=True)
class Ia3Settings:
    """IA3: learned vectors scaling the input of `feedforward_modules` and the output of
    the other target modules."""

    target_modules: list[str] | str | None
    feedforward_modules: list[str] | str | None
    base_model: str
    raw: dict = field(repr=False)
    kind = "ia3"
    rank, alpha, scaling = 0, 0.0, 0.0  # no LoRA rank: what the registry records for these


@dataclass(frozen=True)
class PromptSettings:
    """Prompt tuning (virtual token embeddings) or prefix tuning (per-layer keys and values)."""

    kind: str  # "prompt_tuning" | "prefix_tuning"
    num_virtual_tokens: int
    token_dim: int  # prompt tuning: the hidden size; prefix tuning: kv_heads * head_dim
    num_layers: int
    num_heads: int  # prefix tuning: the key/value heads
    base_model: str
    raw: dict = field(repr=False)
    target_modules = None
    rank, alpha, scaling = 0, 0.0, 0.0

    @property
    def embedding_width(self) -> int:
        """The second dimension of prompt_embeddings."""
        return self.token_dim if self.kind == "prompt_tuning" else self.num_layers * 2 * self.token_dim


Settings = LoraSettings | Ia3Settings | PromptSettings


def parse_config(config_bytes: bytes, *, max_rank: int | None = None,
                 max_virtual_tokens: int | None = None) -> Settings:
    """adapter_config.json of any served kind; any other PEFT type is UnsupportedAdapter."""
    cfg = read_config(config_bytes)
    peft_type = cfg["peft_type"]
    if not isinstance(peft_type, str):
        raise InvalidAdapter(f"{CONFIG_FILE}: peft_type must be a string, got {quote(peft_type)}")
    if peft_type.upper() in PEFT_TYPES and peft_type != peft_type.upper():  # PeftType is case-sensitive
        raise InvalidAdapter(f'{CONFIG_FILE}: peft_type must be "{peft_type.upper()}", as PEFT writes it; '
                             f"got {quote(peft_type)}")
    if peft_type not in PEFT_TYPES:
        raise UnsupportedAdapter(f"peft_type {quote(peft_type)} is not supported: this server serves {_SERVED_TYPES} adapters")
    if peft_type == "LORA":
        return parse_lora_config(cfg, max_rank=max_rank)
    _refuse_modules_to_save(cfg)
    if peft_type == "IA3":
        return _parse_ia3(cfg)
    return _parse_prompt(cfg, peft_type, max_virtual_tokens)


def _parse_ia3(cfg: dict) -> Ia3Settings:
    if cfg.get("fan_in_fan_out"):
        raise UnsupportedAdapter(f"{CONFIG_FILE}: fan_in_fan_out (GPT-2 style Conv1D layers) is not supported")
    targets, ff = cfg.get("target_modules"), cfg.get("feedforward_modules")
    for name, value in (("target_modules", targets), ("feedforward_modules", ff)):
        if value is not None and not (
            isinstance(value, str) or (isinstance(value, list) and all(isinstance(t, str) for t in value))
        ):
            raise InvalidAdapter(f"{CONFIG_FILE}: {name} must be a list of names or a string, got {quote(value)}")
    if isinstance(targets, list) and isinstance(ff, list) and not set(ff) <= set(targets):
        raise InvalidAdapter(f"{CONFIG_FILE}: feedforward_modules {quote(ff)} must be a subset of target_modules "
                             f"{quote(targets)}, as PEFT requires")
    return Ia3Settings(targets, ff, str(cfg.get("base_model_name_or_path") or ""), cfg)


def _parse_prompt(cfg: dict, peft_type: str, max_virtual_tokens: int | None) -> PromptSettings:
    kind = "prompt_tuning" if peft_type == "PROMPT_TUNING" else "prefix_tuning"
    task = cfg.get("task_type")
    if task != "CAUSAL_LM":
        raise UnsupportedAdapter(f"{CONFIG_FILE}: task_type {quote(task)}: a {peft_type} adapter is served for "
                                 'task_type "CAUSAL_LM" only (PeftModelForCausalLM)')
    if cfg.get("num_transformer_submodules", 1) != 1:
        raise UnsupportedAdapter(f"{CONFIG_FILE}: num_transformer_submodules "
                                 f"{quote(cfg.get('num_transformer_submodules'))}: encoder-decoder prompts are not supported")
    values = {}
    for key in ("num_virtual_tokens", "token_dim", "num_layers", "num_attention_heads"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InvalidAdapter(f"{CONFIG_FILE}: {key} must be a positive integer, got {quote(v)}")
        values[key] = v
    n = values["num_virtual_tokens"]
    limit = DEFAULT_MAX_VIRTUAL_TOKENS if max_virtual_tokens is None else max_virtual_tokens
    if n > limit:
        raise UnsupportedAdapter(f"{CONFIG_FILE}: num_virtual_tokens {n} is above this server's limit of {limit} "
                                 "(--max-virtual-tokens)")
    if kind == "prefix_tuning" and values["token_dim"] % values["num_attention_heads"]:
        raise InvalidAdapter(f"{CONFIG_FILE}: token_dim {values['token_dim']} is not a multiple of num_attention_heads "
                             f"{values['num_attention_heads']}")
    return PromptSettings(kind, n, values["token_dim"], values["num_layers"], values["num_attention_heads"],
                          str(cfg.get("base_model_name_or_path") or ""), cfg)


def _refuse_modules_to_save(cfg: dict) -> None:
    if cfg.get("modules_to_save"):
        raise UnsupportedAdapter(f"{CONFIG_FILE}: modules_to_save stores full copies of base modules; "
                                 "only the adapter's own weights can be served")
