"""Task-subspace LoRA (--task-subspace M): each adapted linear layer's LoRA A may read its
input only along the M directions where the task's inputs stand out most from general
text's, so the adapter changes little where it sees general text.

A LoRA layer adds B A x to the frozen layer's output. On general prompts, what an adapter
should do is nothing, and B A x is small when the rows of A lie where general inputs x
carry little energy. Where that is also where the task's inputs carry much is a
generalized eigenproblem on the two input covariances, measured on the base model (the
adapter off) at every real token of the task's training examples and of general examples
(the base's own answers to the replay prompts):

    C_task v = lambda (C_general + eps I) v

Its top M eigenvectors span the directions with the highest ratio lambda of task to
general energy; Q is an orthonormal basis of their span, and A is kept at A Q Q^T: at the
start and after every optimizer step (projected gradient descent), so every checkpoint
and the saved adapter lie in the subspace. What is published is a plain LoRA adapter: the
engine and PEFT serve it as any other.

eps is EPS times the mean eigenvalue of C_general: directions general text never uses
still count as a little used, so the ratio is finite.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch
from peft.tuners.lora import LoraLayer
from transformers import TrainerCallback

from adapterd.training.data import Example, collate, tokens

EPS = 1e-3


def lora_linears(model) -> dict[str, LoraLayer]:
    """The model's LoRA layers on linear modules (the ones with a lora_A matrix), by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, LoraLayer) and "default" in getattr(m, "lora_A", {})}


@torch.no_grad()
def input_covariances(model, tokenizer, examples: list[Example], layers: dict[str, LoraLayer], *, batch_size: int,
                      on_batch: Callable[[], None] = lambda: None) -> tuple[dict[str, torch.Tensor], int]:
    """({name: sum over real tokens of x x^T (float64, d_in x d_in)}, tokens): each layer's
    input on `examples` (prompt and completion), the base model's (adapter off)."""
    sums: dict[str, torch.Tensor] = {}
    mask: list[torch.Tensor] = []  # the current batch's real tokens, (B, T) bool
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # this batch's products by input: q, k and v (gate and up) share theirs

    def hook(name):
        def record(module, args):
            x = args[0]
            key = id(x)
            if key not in seen or seen[key][0] is not x:
                real = x[mask[0]].float()  # (N, d_in)
                seen[key] = (x, (real.T @ real).double())
            product = seen[key][1]
            sums[name] = sums[name] + product if name in sums else product
        return record

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    count = 0
    try:
        with model.disable_adapter():
            for start in range(0, len(examples), batch_size):
                batch = collate([tokens(e, tokenizer) for e in examples[start:start + batch_size]], tokenizer.pad_token_id)
                attention = batch["attention_mask"].to(device)
                mask[:] = [attention.bool()]
                model(input_ids=batch["input_ids"].to(device), attention_mask=attention)
                seen.clear()
                count += int(attention.sum())
                on_batch()
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return sums, count


def task_basis(c_task: torch.Tensor, c_general: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, ratios): an orthonormal basis (d x min(size, d)) of the span of the top
    generalized eigenvectors of (c_task, c_general + eps I), and their eigenvalues (the
    ratio of task to general energy along each, highest first). Covariances are means
    (sums over their token counts)."""
    d = c_general.shape[0]
    size = min(size, d)
    general = c_general + EPS * torch.trace(c_general) / d * torch.eye(d, dtype=c_general.dtype, device=c_general.device)
    values, vectors = torch.linalg.eigh(general)
    whiten = vectors * values.rsqrt() @ vectors.T  # general^(-1/2), symmetric
    ratios, u = torch.linalg.eigh(whiten @ c_task @ whiten)
    top = whiten @ u[:, -size:].flip(-1)  # (d, size): the generalized eigenvectors, highest ratio first
    q, _ = torch.linalg.qr(top)
    return q, ratios[-size:].flip(-1)


def task_bases(model, tokenizer, task: list[Example], general: list[Example], size: int, *, batch_size: int,
               on_batch: Callable[[], None] = lambda: None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{LoRA layer name: task_basis(...)} for every LoRA linear layer of `model`."""
    layers = lora_linears(model)
    sums_task, n_task = input_covariances(model, tokenizer, task, layers, batch_size=batch_size, on_batch=on_batch)
    sums_general, n_general = input_covariances(model, tokenizer, general, layers, batch_size=batch_size,
                                                on_batch=on_batch)
    return {name: task_basis(sums_task[name] / n_task, sums_general[name] / n_general, size) for name in layers}


def _pairs(model, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.nn.Parameter, torch.Tensor]]:
    """(LoRA A weight (r, d_in), Q as float32 on its device) for every layer named in `bases`."""
    layers = lora_linears(model)
    pairs = []
    for name, (q, _) in bases.items():
        weight = layers[name].lora_A["default"].weight
        pairs.append((weight, q.to(device=weight.device, dtype=torch.float32)))
    return pairs


@torch.no_grad()
def _project(pairs: list[tuple[torch.nn.Parameter, torch.Tensor]]) -> None:
    for weight, q in pairs:
        weight.copy_(((weight.float() @ q) @ q.T).to(weight.dtype))


def project(model, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """A <- A Q Q^T in every LoRA layer named in `bases`."""
    _project(_pairs(model, bases))


def off_subspace(model, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The largest share of any LoRA A's norm outside its subspace (0 when projected)."""
    worst = 0.0
    for weight, q in _pairs(model, bases):
        weight = weight.detach().float()
        outside = weight - (weight @ q) @ q.T
        worst = max(worst, float(outside.norm() / weight.norm().clamp(min=1e-30)))
    return worst


class ProjectionCallback(TrainerCallback):
    """Keeps every LoRA A of `model` in its task subspace after each optimizer step (the
    weights and their bases looked up once, not at every step)."""

    def __init__(self, model, bases: dict[str, tuple[torch.Tensor, torch.Tensor]]):
        self.pairs = _pairs(model, bases)

    def on_optimizer_step(self, args, state, control, **kwargs):
        _project(self.pairs)


def summary(bases: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict:
    """The task-to-general energy ratios the subspaces kept: the median over layers of
    their largest and their smallest (the upper median)."""
    return {
        "layers": len(bases),
        "ratio_top_median": statistics.median_high(float(r[0]) for _, r in bases.values()),
        "ratio_last_median": statistics.median_high(float(r[-1]) for _, r in bases.values()),
    }
