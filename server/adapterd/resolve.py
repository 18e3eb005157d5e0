"""The contract between whoever stores adapters (the registry, a directory) and the engine:
what a request's adapter reference resolves to, the checked weights it loads as, and the
base model adapters are checked against. Neither side imports the other; both import this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelSpec:
    """What adapters are checked against: the base model's identity and its linear layers."""

    name: str  # the directory's name, or the model's _name_or_path
    identity: str  # sha256 of config.json: two bases with the same shapes still differ
    # module path (as in the base model, e.g. "model.layers.0.self_attn.q_proj") -> (in, out)
    linear_shapes: dict[str, tuple[int, int]]


@dataclass
class AdapterWeights:
    """A checked LoRA adapter, ready to be copied into a slot.

    tensors: base module path -> (A (r, in), B (out, r)), float32 on the CPU.
    The forward is base(x) + scaling * (x @ A.T) @ B.T.
    """

    name: str
    sha256: str  # adapter_digest of the files: the content identity caches key by
    rank: int
    alpha: float
    scaling: float
    target_modules: list[str]
    tensors: dict[str, tuple[torch.Tensor, torch.Tensor]]
    nbytes: int  # size of the files
    config: dict = field(repr=False)


# loader(spec, max_rank) -> AdapterWeights; runs in the cache's thread pool, never on the
# event loop or the engine's step path.
Loader = Callable[[ModelSpec, int], AdapterWeights]


@dataclass(frozen=True)
class ResolvedAdapter:
    key: str  # equal keys mean equal weights; a failure is remembered per key
    name: str  # what served the request, reported back: "name" or "name@version"
    load: Loader = field(compare=False)


class Resolver(Protocol):
    def resolve(self, tenant: str, ref: str) -> ResolvedAdapter:
        """Raise NotFound for an adapter the tenant cannot see, InvalidArgument for a bad ref."""
