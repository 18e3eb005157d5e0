"""Weighted mixing of LoRA adapters per request, as PEFT's add_weighted_adapter combines them.

A request may name several LoRA adapters with weights. Their mix is built once (off the step
path, like any load) into one adapter of scaling 1 and served from a slot like any other:

    linear  (PEFT's "linear", LoRAX's linear merge; equal ranks r)
            A = sum_i sign_i sqrt(|w_i s_i|) A_i,  B = sum_i sqrt(|w_i s_i|) B_i     rank r
            The delta B A is not the weighted sum of the deltas (it has cross terms B_i A_j);
            weights 1 and 0 give the first adapter exactly.
    cat     (PEFT's "cat"; llama.cpp's per-request list of scaled adapters)
            A = [w_1 s_1 A_1; w_2 s_2 A_2; ...],  B = [B_1, B_2, ...]                 rank sum r_i
            B A = sum_i w_i s_i B_i A_i: exactly the weighted sum of the deltas.

Only plain LoRA adapters mix (MIXABLE_KINDS): DoRA's magnitudes, IA3's vectors and virtual
tokens have no weighted sum of this form.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import adapterd_rules as rules
import torch

from adapterd import errors
from adapterd.resolve import AdapterWeights, ModelSpec, ResolvedAdapter

COMBINATIONS = ("linear", "cat")
MAX_MIX = 8  # adapters in one mix


@dataclass(frozen=True)
class MixPart:
    adapter: ResolvedAdapter
    weight: float


def check_mix(parts: list[tuple[str, float]], combination: str) -> None:
    """The request's list of (reference, weight), before anything is resolved."""
    if combination not in COMBINATIONS:
        raise errors.InvalidArgument(f"combination must be one of {', '.join(COMBINATIONS)}; got {rules.quote(combination)}")
    if not 1 <= len(parts) <= MAX_MIX:
        raise errors.InvalidArgument(f"adapters: give 1 to {MAX_MIX} adapters to mix; got {len(parts)}")
    refs = [ref for ref, _ in parts]
    if len(set(refs)) != len(refs):
        raise errors.InvalidArgument("adapters: an adapter appears twice in the mix; give each once with its weight")
    for ref, weight in parts:
        if not ref:
            raise errors.InvalidArgument("adapters: every entry needs an adapter name")
        if not math.isfinite(weight) or abs(weight) > rules.MAX_SCALING:
            raise errors.InvalidArgument(f"adapters: the weight of {rules.quote(ref)} must be a finite number "
                                         f"within ±{rules.MAX_SCALING:g}; got {weight!r}")


def resolved_mix(parts: list[MixPart], combination: str) -> ResolvedAdapter:
    """One ResolvedAdapter for the mix: its key changes with any part's key or weight."""
    key = f"mix:{combination}:" + ";".join(f"{p.adapter.key}*{p.weight!r}" for p in parts)
    name = "+".join(f"{p.adapter.name}*{p.weight:g}" for p in parts)

    def load(spec: ModelSpec, max_rank: int) -> AdapterWeights:
        return combine([p.adapter.load(spec, max_rank) for p in parts], [p.weight for p in parts],
                       combination, max_rank, name)

    return ResolvedAdapter(key, name, load)


def combine(adapters: list[AdapterWeights], weights: list[float], combination: str, max_rank: int,
            name: str = "") -> AdapterWeights:
    """The mix of `adapters` (checked LoRA weights) as one adapter of scaling 1."""
    for a in adapters:
        if a.kind not in rules.MIXABLE_KINDS:
            raise errors.InvalidArgument(
                f"adapter {rules.quote(a.name)} is of kind {a.kind}; only {', '.join(rules.MIXABLE_KINDS)} "
                "adapters can be mixed"
            )
    if combination == "linear":
        ranks = sorted({a.rank for a in adapters})
        if len(ranks) > 1:
            raise errors.InvalidArgument(
                f"combination linear needs adapters of one rank (as PEFT's add_weighted_adapter); these have ranks "
                f"{ranks}: use combination cat"
            )
        rank = ranks[0]
    else:
        rank = sum(a.rank for a in adapters)
        if rank > max_rank:
            raise errors.InvalidArgument(
                f"combination cat gives rank {rank} (the sum of the ranks), above this server's max rank {max_rank} "
                "(--max-rank); mix fewer adapters or use combination linear"
            )
    modules = sorted({m for a in adapters for m in a.tensors})
    tensors = {}
    for module in modules:
        present = [(a, w) for a, w in zip(adapters, weights, strict=True) if module in a.tensors]
        if combination == "linear":
            a_sum, b_sum = 0, 0
            for a, w in present:
                ws = w * a.scaling
                root = math.sqrt(abs(ws))
                a_sum = a_sum + math.copysign(root, ws) * a.tensors[module][0]
                b_sum = b_sum + root * a.tensors[module][1]
            tensors[module] = (a_sum.contiguous(), b_sum.contiguous())
        else:
            tensors[module] = (torch.cat([w * a.scaling * a.tensors[module][0] for a, w in present], dim=0),
                               torch.cat([a.tensors[module][1] for a, _ in present], dim=1).contiguous())
    return AdapterWeights(
        name=name, sha256="", rank=max(t[0].shape[0] for t in tensors.values()), alpha=float(rank), scaling=1.0,
        target_modules=sorted({m.rsplit(".", 1)[-1] for m in modules}), tensors=tensors,
        nbytes=sum(a.nbytes for a in adapters), config={"combination": combination, "weights": weights},
    )
