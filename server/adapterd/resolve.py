"""The contract between whoever stores adapters (the registry, a directory) and the engine:
what a request's adapter reference resolves to, the checked weights it loads as, and the
base model adapters are checked against. Neither side imports the other; both import this.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from adapterd_rules import PromptShape

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class ModelSpec:
    """What adapters are checked against: the base model's identity and its linear layers."""

    name: str  # the directory's name, or the model's _name_or_path
    identity: str  # sha256 of config.json: two bases with the same shapes still differ
    # module path (as in the base model, e.g. "model.layers.0.self_attn.q_proj") -> (in, out)
    linear_shapes: dict[str, tuple[int, int]]
    prompt_shape: PromptShape | None = None  # what prompt and prefix tuning must fit; None: not checked


@dataclass
class AdapterWeights:
    """A checked adapter, ready to be copied into a slot; every tensor float32 on the CPU.

    kind "lora":  tensors: base module path -> (A (r, in), B (out, r));
                  the forward is base(x) + scaling * (x @ A.T) @ B.T
    kind "dora":  the same, and magnitudes: module path -> m (out,)
    kind "ia3":   ia3: module path -> (vector, feedforward): x * l (feedforward) or base(x) * l
    prompt kinds: virtual: (virtual tokens, width), PEFT's prompt_embeddings
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
    kind: str = "lora"
    magnitudes: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    ia3: dict[str, tuple[torch.Tensor, bool]] = field(default_factory=dict, repr=False)
    virtual: torch.Tensor | None = field(default=None, repr=False)
    # DoRA's per-module output scale m / ||W + scaling B A||, computed against the base's
    # weights when the adapter is first put in a slot, and kept for the next time.
    dora_scales: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    @property
    def virtual_tokens(self) -> int:
        return 0 if self.virtual is None else int(self.virtual.shape[0])


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
