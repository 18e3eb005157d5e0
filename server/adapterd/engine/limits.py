"""Request checks against the server's limits, before anything is queued.

Each failure is an InvalidArgument whose message names the field, the value and the limit,
so the caller knows what to change. The checks here are the whole contract: the engine
below assumes requests that passed them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from adapterd.config import SchedulerConfig
from adapterd.engine.grammar import ResponseFormat
from adapterd.engine.sampling import MAX_TOP_LOGPROBS, SamplingParams
from adapterd.errors import InvalidArgument


def check_prompt(prompt: str, prompt_tokens: int, limits: SchedulerConfig) -> None:
    if not prompt:
        raise InvalidArgument("prompt must not be empty")
    if prompt_tokens > limits.max_input_tokens:
        raise InvalidArgument(
            f"prompt is {prompt_tokens} tokens, over the server's max input tokens "
            f"({limits.max_input_tokens}): shorten the prompt"
        )


@dataclass
class GenerateArgs:
    """A request's generation parameters as the caller gave them (None = not set)."""

    max_new_tokens: int
    temperature: float = 0.0
    top_p: float | None = None
    top_k: int = 0
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None  # None: free text


def sampling_params(
    *,
    prompt_tokens: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float | None,
    top_k: int,
    repetition_penalty: float | None,
    seed: int | None,
    stop: list[str] | tuple[str, ...],
    logprobs: bool,
    limits: SchedulerConfig,
    top_logprobs: int = 0,
    presence_penalty: float = 0.0,
    frequency_penalty: float = 0.0,
    ignore_eos: bool = False,
    grammar: object | None = None,
) -> SamplingParams:
    """Check the generation parameters; None means "not set" (the default)."""
    if max_new_tokens < 1:
        raise InvalidArgument(f"params.max_new_tokens must be >= 1; got {max_new_tokens}")
    total = prompt_tokens + max_new_tokens
    if total > limits.max_total_tokens:
        room = limits.max_total_tokens - prompt_tokens
        raise InvalidArgument(
            f"prompt ({prompt_tokens} tokens) + params.max_new_tokens ({max_new_tokens}) = {total}, "
            f"over the server's max total tokens ({limits.max_total_tokens}): "
            f"set params.max_new_tokens to at most {room}"
        )
    if not (temperature >= 0 and math.isfinite(temperature)):  # also refuses NaN
        raise InvalidArgument(f"params.temperature must be >= 0 (0 = greedy); got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InvalidArgument(f"params.top_p must be in (0, 1]; got {top_p}")
    if repetition_penalty is not None and not (repetition_penalty > 0 and math.isfinite(repetition_penalty)):
        raise InvalidArgument(f"params.repetition_penalty must be > 0 (1 = none); got {repetition_penalty}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if not -2.0 <= value <= 2.0:  # also refuses NaN
            raise InvalidArgument(f"params.{name} must be in [-2, 2] (0 = none); got {value}")
    if not 0 <= top_logprobs <= MAX_TOP_LOGPROBS:
        raise InvalidArgument(f"params.top_logprobs must be in 0..{MAX_TOP_LOGPROBS}; got {top_logprobs}")
    if top_logprobs and not logprobs:
        raise InvalidArgument("params.top_logprobs needs params.logprobs set")
    # The sampler seeds a 64-bit signed generator: s and s + 2^63 would give the same tokens,
    # so what it cannot tell apart is refused (as training's --seed is).
    if seed is not None and not 0 <= seed < 2**63:
        raise InvalidArgument(f"params.seed must be in 0..2^63-1; got {seed}")
    if len(stop) > limits.max_stop_sequences:
        raise InvalidArgument(
            f"params.stop has {len(stop)} sequences; at most {limits.max_stop_sequences} are allowed"
        )
    for i, s in enumerate(stop):
        if not s:
            raise InvalidArgument(f"params.stop[{i}] is empty")
        if len(s) > limits.max_stop_length:
            raise InvalidArgument(
                f"params.stop[{i}] is {len(s)} characters; at most {limits.max_stop_length} are allowed"
            )
    return SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=1.0 if top_p is None else top_p,
        top_k=top_k,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        seed=seed,
        stop=tuple(stop),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
        presence_penalty=presence_penalty,
        frequency_penalty=frequency_penalty,
        ignore_eos=ignore_eos,
        grammar=grammar,
    )
