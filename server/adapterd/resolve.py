"""The contract between whoever stores adapters (the registry, a directory) and the engine:
what a request's adapter reference resolves to, and the base model adapters are checked
against. Neither side imports the other; both import this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class ModelSpec:
    """What adapters are checked against: the base model's identity and its linear layers."""

    name: str  # the directory's name, or the model's _name_or_path
    identity: str  # sha256 of config.json: two bases with the same shapes still differ
    model_type: str
    # module path (as in the base model, e.g. "model.layers.0.self_attn.q_proj") -> (in, out)
    linear_shapes: dict[str, tuple[int, int]]


# loader(spec, max_rank) -> AdapterWeights; runs in the cache's thread pool, never on the
# event loop or the engine's step path.
Loader = Callable[..., object]


@dataclass(frozen=True)
class ResolvedAdapter:
    key: str  # equal keys mean equal weights; a failure is remembered per key
    name: str  # what served the request, reported back: "name" or "name@version"
    load: Loader = field(compare=False)


class Resolver(Protocol):
    def resolve(self, tenant: str, ref: str) -> ResolvedAdapter:
        """Raise NotFound for an adapter the tenant cannot see, InvalidArgument for a bad ref."""
