"""Batched LoRA: one base layer call for the whole batch, a LoRA delta per row's adapter.

      x (B, T, in) ──► base (NF4, once for the batch) ───────────────┐
        │                                                           + ──► y (B, T, out)
        └──► x @ A_row^T (B, T, r) ──► @ (scale * B_row)^T (B, T, out) ┘

Every target linear keeps preallocated slot stacks and a scaling per slot: A as PEFT holds
it, [S, r_max, in], and scale * B transposed, (scale * B)^T [S, r_max, out], so the rows of
one adapter at rank r are one contiguous block of each stack (the C kernel below streams
them; a rank below r_max would otherwise read a strided quarter of each cache line). Slot 0
is "no adapter" and stays zero. Activating an adapter is a copy into a slot; the forward
allocates nothing per adapter. The stacks are float32 or bfloat16 (`stack_dtype`; bfloat16
halves the bytes a decode step reads, which is what bounds a mixed step on the CPU); the
torch paths multiply in the base's compute dtype, the C kernel sums in float32.

On the CPU the base call goes straight to bitsandbytes' packed kernel (nf4cpu.py), and
siblings that read the same input (q/k/v, gate/up) share one call (`SiblingGroup`).

Two ways to apply the delta, chosen per batch (both checked against `reference_forward`):
- gathered: each layer holds its rows' A and (scale * B) as per-row stacks, sliced to the
  largest rank in the batch. Each step is then two batched matmuls per layer (bmm,
  baddbmm_). Per-op overhead dominates at small sizes, so this is the fast path for the
  decode batches of small and medium models. The running batch's stacks live in buffers
  with room to grow and are updated in place: when the batch changes, only the rows whose
  slot changed are copied (the generator appends new rows and moves the last row into a
  finished row's place, so a join or a finish touches a few rows, not all). A prefill
  group's plan is `transient`: gathered apart, it leaves the running batch's buffers alone.
- segments: rows are sorted by slot; per contiguous segment of one adapter, two matmuls.
  Used when the gathered stacks would exceed a memory budget (large models, large batches).

The other kinds ride on the same slots. IA3 and DoRA are per-slot vectors, applied per row
(or token) only in batches that hold such a slot, made when the first one is loaded:

    x' = x * in_scale[slot]                     IA3 on a feedforward module (ones elsewhere)
    y  = base(x') + delta                       the LoRA delta above (DoRA's too)
    y' = y * out_scale[slot] + out_shift[slot]  IA3 on the other modules: out_scale = l;
                                                DoRA: g = m / ||W + scale B A||, y' = g (y - b) + b,
                                                so out_scale = g, out_shift = (1 - g) b

Prompt and prefix tuning live in the slot table too (`LoraSlots.virtual`, prompts.py).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from adapterd.engine import native
from adapterd.engine.nf4cpu import FusedKernel, PackedKernel
from adapterd.engine.prompts import Virtual
from adapterd.engine.variants import dora_scale
from adapterd.errors import UnknownTargetModule

# Module names the batched layer wraps: Llama/Mistral/Qwen, Phi, Falcon, GPT-NeoX style.
TARGET_NAMES = frozenset({
    "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    "dense", "fc1", "fc2",
    "query_key_value", "dense_h_to_4h", "dense_4h_to_h",
})

# Siblings that take the same input; on the CPU their base layers run as one kernel call.
FUSED_SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))

# Up to this many changed rows of the running batch are copied one by one (a copy_ each,
# half the memory traffic of index_select + index_copy_); more take the indexed ops.
COPY_ROWS_MAX = 2

# Gathered per-row stacks above this many bytes (over all layers) switch to segments.
DEFAULT_GATHER_BUDGET = 256 * 2**20


@dataclass(frozen=True)
class BatchPlan:
    """What the layers need to know about the current batch, built once per batch change."""

    key: tuple[int, ...]  # slot of every row, in row order
    index: torch.Tensor  # (B,) slot ids, long, on the model's device
    segments: tuple[tuple[int, int, int], ...]  # (slot, start, end) runs, slot 0 omitted
    gathered: bool
    transient: bool = False  # a prefill group: gathered apart from the running batch's buffers
    # Rows whose slot differs from what the layers' buffers hold (positions, then their
    # slots), or None: gather every row. As index tensors too where there are more than
    # COPY_ROWS_MAX of them.
    changed: tuple[tuple[int, ...], tuple[int, ...]] | None = None
    changed_index: tuple[torch.Tensor, torch.Tensor] | None = None
    capacity: int = 0  # rows a buffer gets room for when it is (re)made


# A flat run of at most this many tokens that holds several adapters takes the grouped
# path; longer runs (prompt chunks) take one pair of matmuls per contiguous run of an adapter.
GROUPED_MAX_TOKENS = 64


@dataclass
class FlatPlan:
    """A flat run of tokens (the paged engine): each token's adapter slot. Each layer reads
    each of the run's adapters once, at its own rank (no per-row copy of stacks at the max
    rank), in one of four ways chosen here once per step:

      kernel       a decode-sized run on the CPU: one call of the C kernel (lora_flat.c) per
                   layer, each token by its own adapter's rows of the slot stacks, read in
                   place; nothing is copied when the run's adapters change
      one adapter  xa = x @ A^T (T, r); y += xa @ (scale B)^T, base tokens masked to zero
      grouped      the run's n adapters side by side as stacks (n, in, r), (n, r, out):
                   x gathered by adapter (n, m, in) -> two bmm -> index_add_ back into y;
                   four ops per layer whatever n, and no multiply by another adapter's
                   weights (a decode step without the kernel: a GPU); the stacks are
                   copied when the run's set of adapters changes, not per step
      runs         per contiguous run of one adapter (tokens are ordered by slot), two
                   matmuls on views: exact work, for prompt chunks where compute dominates"""

    slots: tuple[int, ...]  # the distinct adapter slots in the run (0 omitted), ascending
    token_slot: torch.Tensor  # (T,) long
    uniform: bool  # every token on the same adapter slot
    runs: tuple[tuple[int, int, int], ...] = ()  # (slot, start, end), slot 0 omitted
    grouped: tuple[torch.Tensor, torch.Tensor | None] | None = None  # (n, m) token index, (n, m, 1) valid
    kernel: KernelRun | None = None
    key: tuple[int, ...] = ()  # token_slots
    _masks: dict = field(default_factory=dict)

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device, kernels: native.Kernels | None = None,
              max_rank: int = 0) -> FlatPlan:
        distinct = tuple(sorted(set(token_slots) - {0}))
        runs, start = [], 0
        for i in range(1, len(token_slots) + 1):
            if i == len(token_slots) or token_slots[i] != token_slots[start]:
                if token_slots[start] != 0:
                    runs.append((token_slots[start], start, i))
                start = i
        grouped = kernel = None
        if kernels is not None and distinct and len(token_slots) <= GROUPED_MAX_TOKENS:
            kernel = KernelRun.build(kernels, token_slots, distinct, max_rank)
        elif len(distinct) > 1 and len(token_slots) <= GROUPED_MAX_TOKENS:
            members = [[t for t, s in enumerate(token_slots) if s == slot] for slot in distinct]
            m = max(len(ts) for ts in members)
            index = torch.tensor([ts + [ts[0]] * (m - len(ts)) for ts in members], device=device)  # (n, m)
            valid = None
            if any(len(ts) < m for ts in members):  # padding repeats a token; its delta is zeroed
                valid = torch.tensor([[1.0] * len(ts) + [0.0] * (m - len(ts)) for ts in members],
                                     device=device)[:, :, None]  # (n, m, 1)
            grouped = (index, valid)
        return cls(distinct, torch.tensor(token_slots, dtype=torch.long, device=device),
                   len(distinct) == 1 and 0 not in token_slots, tuple(runs), grouped, kernel, tuple(token_slots))

    def mask(self, columns: tuple[tuple[int, int], ...], dtype: torch.dtype) -> torch.Tensor | None:
        """(T, R) ones where a token's slot owns the column; None when nothing is masked."""
        if self.uniform and len(columns) == 1:
            return None
        key = (columns, dtype)
        m = self._masks.get(key)
        if m is None:
            col_slot = torch.tensor([s for s, r in columns for _ in range(r)], device=self.token_slot.device)
            m = self._masks[key] = (self.token_slot[:, None] == col_slot[None, :]).to(dtype)  # (T, R)
        return m


@dataclass
class KernelRun:
    """A run's tokens grouped by adapter slot, as lora_flat.c takes them (CPU tensors, kept
    alive here while the layers hold their addresses), and the kernel's scratch."""

    kernels: native.Kernels
    group_slot: torch.Tensor  # (n,) int32
    group_start: torch.Tensor  # (n + 1,) int64: group g is tokens[group_start[g]:group_start[g + 1]]
    tokens: torch.Tensor  # int32: the run's tokens on an adapter, by group
    scratch: torch.Tensor  # (len(tokens), max_rank) float32: x A^T

    @classmethod
    def build(cls, kernels: native.Kernels, token_slots: list[int], distinct: tuple[int, ...], max_rank: int) -> KernelRun:
        by_slot: dict[int, list[int]] = {s: [] for s in distinct}
        for t, s in enumerate(token_slots):
            if s:
                by_slot[s].append(t)
        tokens = [t for s in distinct for t in by_slot[s]]
        starts = [0]
        for s in distinct:
            starts.append(starts[-1] + len(by_slot[s]))
        return cls(kernels, torch.tensor(distinct, dtype=torch.int32), torch.tensor(starts, dtype=torch.int64),
                   torch.tensor(tokens, dtype=torch.int32), torch.empty(len(tokens), max_rank))

    def arguments(self, layer: BatchedLoraLinear) -> tuple:
        """lora_flat's arguments after x and y, for `layer`'s stacks."""
        return (layer.in_features, layer.out_features, layer.lora_a.shape[1], layer.lora_a.data_ptr(),
                layer.lora_b.data_ptr(), layer.rank_table.data_ptr(), self.group_slot.data_ptr(),
                self.group_start.data_ptr(), self.tokens.data_ptr(), len(self.group_slot), self.scratch.data_ptr())


class BatchedLoraLinear(nn.Module):
    """Wraps one base linear (nn.Linear, bitsandbytes Linear4bit or Linear8bitLt) with S LoRA
    slots. `model_dtype`: the compute dtype where the base does not tell it (Linear8bitLt's
    weights are int8; it computes in its input's dtype, the rest of the model's)."""

    def __init__(self, base: nn.Module, num_slots: int, max_rank: int, stack_dtype: torch.dtype | None = None,
                 model_dtype: torch.dtype = torch.float32):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.compute_dtype, device = _compute_dtype(base, model_dtype), _device(base)
        dtype = stack_dtype or self.compute_dtype
        # A and (scale * B)^T per slot: (S, r_max, in) and (S, r_max, out)
        self.register_buffer("lora_a", torch.zeros(num_slots, max_rank, self.in_features, dtype=dtype, device=device), persistent=False)
        self.register_buffer("lora_b", torch.zeros(num_slots, max_rank, self.out_features, dtype=dtype, device=device), persistent=False)
        self.scaling = [0.0] * num_slots
        self.rank = [0] * num_slots  # 0: this slot's adapter does not touch this layer
        self.rank_table = torch.zeros(num_slots, dtype=torch.int32)  # the same, for the C kernel
        self._plan: BatchPlan | None = None
        self._a_rows: torch.Tensor | None = None  # (B, in, r_batch)
        self._b_rows: torch.Tensor | None = None  # (B, r_batch, out), scale folded in
        # The running batch's per-row stacks, with room: (capacity, in, r) and (capacity, r, out).
        # None whenever they may not match the slots LoraSlots last planned (see plan()).
        self._a_buf: torch.Tensor | None = None
        self._b_buf: torch.Tensor | None = None
        self._kernel: PackedKernel | None = None  # the base's CPU kernel, called directly
        self._direct = False  # nf4cpu.attach() gave this layer the direct call (after the warm-up)
        self._siblings: SiblingGroup | None = None  # set by inject_lora for q/k/v and gate/up
        self._sibling_index = 0
        # Flat runs (FlatPlan): how this step applies the delta, and the grouped path's stacks
        # of the run's adapters, kept while the set of adapters stays the same.
        self._flat: tuple | None = None
        self.flat_plan: FlatPlan | None = None  # the run _flat was planned for
        self._cat_key: tuple | None = None
        self._cat: tuple[torch.Tensor, torch.Tensor] | None = None
        # IA3 and DoRA (see the module's docstring): per-slot stacks, None until a slot needs
        # one, and which slots use each; this batch's values per token or row, or None.
        self.in_scale: torch.Tensor | None = None  # (S, in)
        self.out_scale: torch.Tensor | None = None  # (S, out)
        self.out_shift: torch.Tensor | None = None  # (S, out)
        self._scales_in: set[int] = set()
        self._scales_out: set[int] = set()
        self._shifts: set[int] = set()
        self._in_mul: torch.Tensor | None = None
        self._out_mul: torch.Tensor | None = None
        self._out_add: torch.Tensor | None = None

    def set_scales(self, slot: int, *, inputs: torch.Tensor | None = None, outputs: torch.Tensor | None = None,
                   shift: torch.Tensor | None = None) -> None:
        """`slot`'s input scale (in,), output scale (out,) and output shift (out,); None: none."""
        self._flat = self.flat_plan = None
        self._plan = None
        for attr, members, value, dim, fill in (
            ("in_scale", self._scales_in, inputs, self.in_features, 1.0),
            ("out_scale", self._scales_out, outputs, self.out_features, 1.0),
            ("out_shift", self._shifts, shift, self.out_features, 0.0),
        ):
            stack = getattr(self, attr)
            if value is None:
                members.discard(slot)
                if stack is not None:
                    stack[slot].fill_(fill)
                continue
            if stack is None:
                stack = torch.full((len(self.scaling), dim), fill, dtype=self.compute_dtype, device=self.lora_a.device)
                setattr(self, attr, stack)
            stack[slot].copy_(value)
            members.add(slot)

    def _plan_scales(self, slots, index: torch.Tensor, rows: bool) -> None:
        """This batch's per-token (T, d) or per-row (B, 1, d) scales, where a slot has any."""
        present = set(slots)

        def pick(stack, members):
            if not present & members:
                return None
            t = stack.index_select(0, index)
            return t[:, None, :] if rows else t

        self._in_mul = pick(self.in_scale, self._scales_in)
        self._out_mul = pick(self.out_scale, self._scales_out)
        self._out_add = pick(self.out_shift, self._shifts)

    def set_slot(self, slot: int, a: torch.Tensor | None, b: torch.Tensor | None, scaling: float) -> None:
        """Copy A (r, in) and B (out, r) into `slot`; None zeroes the slot for this layer."""
        self._a_buf = self._b_buf = None  # rows of this slot in the buffers are stale now
        self._cat_key = self._cat = self._flat = self.flat_plan = None
        self.lora_a[slot].zero_()
        self.lora_b[slot].zero_()
        if a is None:
            self.rank[slot], self.scaling[slot] = 0, 0.0
            self.rank_table[slot] = 0
            return
        r = a.shape[0]
        self.lora_a[slot, :r].copy_(a)  # (r, in)
        self.lora_b[slot, :r].copy_(b.T * scaling)  # (r, out)
        self.rank[slot], self.scaling[slot] = r, float(scaling)
        self.rank_table[slot] = r

    def plan(self, plan: BatchPlan) -> None:
        """Prepare for a new batch: per-row stacks are made when the batch changes, not every
        step, and for the running batch only the rows that changed."""
        self._plan = plan
        self._flat = self.flat_plan = None
        self._a_rows = self._b_rows = None
        self._plan_scales(plan.key, plan.index, rows=True)
        r = max((self.rank[s] for s in set(plan.key)), default=0)
        if r == 0 or not plan.gathered:
            if not plan.transient:
                self._a_buf = self._b_buf = None  # the buffers no longer follow the batch
            return
        a_src, b_src = self.lora_a[:, :r].transpose(1, 2), self.lora_b[:, :r]  # (S, in, r), (S, r, out) views
        if plan.transient:
            self._a_rows = self._compute(a_src.index_select(0, plan.index)).contiguous()  # (G, in, r)
            self._b_rows = self._compute(b_src.index_select(0, plan.index))  # (G, r, out)
            return
        rows = len(plan.key)
        buf_a, buf_b = self._a_buf, self._b_buf
        if (
            plan.changed is None or buf_a is None or buf_a.shape[2] != r or buf_a.shape[0] < rows
            or (buf_a.is_inference() and not torch.is_inference_mode_enabled())  # cannot update it here
        ):
            cap = max(rows, plan.capacity)
            buf_a = torch.empty((cap, self.in_features, r), dtype=self.compute_dtype, device=a_src.device)
            buf_b = torch.empty((cap, r, self.out_features), dtype=self.compute_dtype, device=b_src.device)
            buf_a[:rows].copy_(a_src.index_select(0, plan.index))
            buf_b[:rows].copy_(b_src.index_select(0, plan.index))
            self._a_buf, self._b_buf = buf_a, buf_b
        elif plan.changed_index is not None:
            positions, slots = plan.changed_index
            buf_a.index_copy_(0, positions, self._compute(a_src.index_select(0, slots)))
            buf_b.index_copy_(0, positions, self._compute(b_src.index_select(0, slots)))
        else:  # a row or two (a join, a finish): copy them straight, no temporary
            for p, s in zip(*plan.changed, strict=True):
                buf_a[p].copy_(a_src[s])
                buf_b[p].copy_(b_src[s])
        self._a_rows, self._b_rows = buf_a[:rows], buf_b[:rows]  # (B, in, r), (B, r, out)

    def plan_flat(self, flat: FlatPlan) -> None:
        """Prepare for a flat run (see FlatPlan)."""
        self.flat_plan = flat
        self._plan = None
        self._a_rows = self._b_rows = None
        self._flat = None
        self._plan_scales(flat.slots, flat.token_slot, rows=False)
        if not any(self.rank[s] for s in flat.slots):
            return
        fn = flat.kernel.kernels.lora_flat.get(self.lora_a.dtype) if flat.kernel is not None else None
        if fn is not None and self.compute_dtype == torch.float32 and self.lora_a.device.type == "cpu":
            self._flat = ("kernel", fn, flat.kernel.arguments(self), flat.kernel)  # the last keeps its tensors alive
        elif len(flat.slots) == 1:
            slot = flat.slots[0]
            r = self.rank[slot]
            self._flat = ("one", self._compute(self.lora_a[slot, :r]).T, self._compute(self.lora_b[slot, :r]),
                          flat.mask(((slot, r),), self.compute_dtype))
        elif flat.grouped is not None:
            r = max(self.rank[s] for s in flat.slots)
            key = (flat.slots, r)
            if key != self._cat_key:  # (n, in, r), (n, r, out): zero beyond each adapter's own rank
                index = torch.tensor(flat.slots, device=self.lora_a.device)
                self._cat = (self._compute(self.lora_a[:, :r].index_select(0, index)).transpose(1, 2).contiguous(),
                             self._compute(self.lora_b[:, :r].index_select(0, index)))
                self._cat_key = key
            self._flat = ("grouped", *self._cat, flat.grouped)
        else:
            self._flat = ("runs", flat.runs)

    @property
    def flat_path(self) -> str | None:
        """How this layer applies the current flat run's delta: "kernel", "one", "grouped",
        "runs", or None (no flat run, or no adapter of the run touches this layer)."""
        return self._flat[0] if self._flat is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, in)
        if self._in_mul is not None:
            x = x * self._in_mul
        y = self._base_forward(x)  # (B, T, out)
        if self._flat is not None:
            y = y if y.is_contiguous() else y.contiguous()
            self._flat_delta(x.reshape(-1, self.in_features), y.view(-1, self.out_features))
        elif self._a_rows is not None:
            xa = torch.bmm(x, self._a_rows)  # (B, T, r)
            y = y.baddbmm_(xa, self._b_rows)  # (B, T, out)
        elif self._plan is not None and not self._plan.gathered:
            self._segments(x, y)
        if self._out_mul is not None:
            y = y * self._out_mul
        if self._out_add is not None:
            y = y.add_(self._out_add)
        return y

    def _base_forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._direct or torch.is_grad_enabled():
            return self.base(x)
        if self._siblings is not None:
            y = self._siblings.output(self._sibling_index, x)
            if y is not None:
                return y
        kernel = self._kernel
        if kernel is not None and kernel.matches(self.base):
            return kernel(x)
        y = self.base(x)  # bitsandbytes unpacked the weight (a state-dict save): it packs it again here
        self._kernel = PackedKernel.of(self.base)
        return y

    def attach_kernel(self) -> bool:
        """Call the base's packed CPU kernel directly from now on, where there is one (a packed
        Linear4bit on the CPU: the warm-up forward has packed it). See nf4cpu.attach."""
        self._kernel = PackedKernel.of(self.base)
        self._direct = self._kernel is not None
        return self._direct

    def detach_kernel(self) -> None:
        self._kernel, self._direct = None, False

    def _flat_delta(self, x: torch.Tensor, y: torch.Tensor) -> None:  # x (T, in), y (T, out) in place
        kind = self._flat[0]
        if kind == "kernel":
            _, fn, args, _ = self._flat
            x = x if x.is_contiguous() else x.contiguous()
            fn(x.data_ptr(), y.data_ptr(), *args)
        elif kind == "one":
            _, a, b, mask = self._flat
            xa = x @ a  # (T, r)
            if mask is not None:
                xa.mul_(mask)  # base tokens keep their base output
            y.addmm_(xa, b)
        elif kind == "grouped":
            _, a, b, (index, valid) = self._flat
            n, m = index.shape
            xg = x.index_select(0, index.view(-1)).view(n, m, self.in_features)  # (n, m, in)
            yg = torch.bmm(torch.bmm(xg, a), b)  # (n, m, out)
            if valid is not None:
                yg.mul_(valid)
            y.index_add_(0, index.view(-1), yg.view(n * m, self.out_features))
        else:
            for slot, start, end in self._flat[1]:
                r = self.rank[slot]
                if r:
                    a, b = self._compute(self.lora_a[slot, :r]), self._compute(self.lora_b[slot, :r])
                    y[start:end].addmm_(x[start:end] @ a.T, b)

    def _segments(self, x: torch.Tensor, y: torch.Tensor) -> None:
        for slot, start, end in self._plan.segments:
            r = self.rank[slot]
            if r == 0:
                continue
            xs = x[start:end].reshape(-1, self.in_features)  # (n*T, in)
            xa = xs @ self._compute(self.lora_a[slot, :r]).T  # (n*T, r)
            ys = y[start:end].view(-1, self.out_features)  # (n*T, out), a view into y
            ys.addmm_(xa, self._compute(self.lora_b[slot, :r]))  # scale is folded into the slot's B

    def _compute(self, t: torch.Tensor) -> torch.Tensor:
        """`t` from the stacks in the compute dtype (a copy only where the stacks are narrower)."""
        return t if t.dtype == self.compute_dtype else t.to(self.compute_dtype)


class SiblingGroup:
    """Base layers that take the same input (q/k/v, gate/up) computed in one fused kernel
    call (nf4cpu.FusedKernel): the first member called with an input computes every
    member's output; the others, called next with that same tensor, take theirs.

    The fused kernel is built once every member has its own direct kernel (after the
    warm-up forward has packed the weights), and again after bitsandbytes unpacks and
    repacks them. A model that does not call the members with one input tensor leaves
    outputs unclaimed; after a few such misses the group stops fusing for good."""

    MAX_MISSES = 3

    def __init__(self, members: list[BatchedLoraLinear]):
        self.members = members
        self._bases = [m.base for m in members]
        self._fused: FusedKernel | None = None
        self._x: torch.Tensor | None = None  # the input the pending outputs were computed for
        self._pending: dict[int, torch.Tensor] = {}  # member index -> its output for _x
        self._misses = 0
        self._fusable = True  # False: no direct kernel (GPU, plain Linear) or no fused one, never fuse

    def output(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        """Member `i`'s base output for `x`, or None: compute it the member's own way."""
        if self._x is x and i in self._pending:
            y = self._pending.pop(i)
            if not self._pending:
                self._x = None
            return y
        if self._pending:  # outputs computed for an input nobody asked about again
            self._pending, self._x = {}, None
            self._misses += 1
        if self._misses >= self.MAX_MISSES or not self._fusable:
            return None
        if any(m._in_mul is not None for m in self.members):  # IA3 on a member's input: inputs differ
            return None
        fused = self._fused
        if fused is None or not fused.matches(self._bases):
            fused = self._fused = self._build()
            if fused is None:
                return None
        outs = fused(x)
        self._pending = {j: y for j, y in enumerate(outs) if j != i}
        self._x = x
        return outs[i]

    def _build(self) -> FusedKernel | None:
        """Fuse once every member's own kernel is current (each has been called, so the
        weights are packed); the members then call the fused weights' views directly too."""
        if not all(m._direct for m in self.members):
            self._fusable = False
            return None
        if not all(m._kernel is not None and m._kernel.matches(m.base) for m in self.members):
            return None
        fused = FusedKernel.of(self._bases)
        if fused is None:  # shapes or formats the kernel cannot take in one call
            self._fusable = False
            return None
        for member, kernel in zip(self.members, fused.members, strict=True):
            member._kernel = kernel
        return fused


class LoraSlots:
    """The slot table of a model: every wrapped layer, load/unload, and the batch plan."""

    def __init__(self, layers: dict[str, BatchedLoraLinear], num_slots: int, max_rank: int,
                 device: torch.device, gather_budget_bytes: int = DEFAULT_GATHER_BUDGET,
                 kernels: native.Kernels | None = None):
        self.layers = layers
        self.virtual: dict[int, Virtual] = {}  # slot -> its prompt- or prefix-tuning tokens
        self.kinds: dict[int, str] = {}  # slot -> the kind of adapter it holds
        self.prompt_shape = None  # adapterd_rules.PromptShape of the model (inject_lora sets it)
        self.kernels = kernels  # lora_flat.c for decode-sized flat runs, on the CPU
        self._flat: FlatPlan | None = None  # the last flat run's plan
        self.num_slots = num_slots
        self.max_rank = max_rank
        self.device = device
        self.gather_budget_bytes = gather_budget_bytes
        self._plan: BatchPlan | None = None
        self._held: tuple[int, ...] | None = None  # the slots the layers' running-batch buffers hold
        # Per row: the sum over layers of (in + out) * r_max elements, the gathered worst case.
        elem = next(iter(layers.values())).lora_a.element_size() if layers else 4
        self._row_bytes = sum((m.in_features + m.out_features) * max_rank * elem for m in layers.values())

    def load(self, slot: int, weights) -> None:
        """Copy an AdapterWeights (validated, CPU tensors) into `slot` (1..num_slots-1). A
        DoRA adapter's scales are computed against the base here, the first time only."""
        self._check_slot(slot)
        unknown = (set(weights.tensors) | set(weights.ia3)) - set(self.layers)
        if unknown:
            raise UnknownTargetModule(
                f"adapter targets modules the server does not batch: {sorted(unknown)[:4]}"
            )
        if weights.rank > self.max_rank:
            raise ValueError(f"rank {weights.rank} exceeds the slot rank {self.max_rank}")
        virtual = None
        if weights.virtual is not None:
            dtype = next(iter(self.layers.values())).compute_dtype if self.layers else torch.float32
            virtual = Virtual.of(weights.kind, weights.virtual, self.prompt_shape, self.device, dtype)
        with torch.no_grad():
            for name, layer in self.layers.items():
                ab = weights.tensors.get(name)
                layer.set_slot(slot, *(ab if ab is not None else (None, None)), weights.scaling)
                layer.set_scales(slot, **_scales(name, layer, weights))
        self.virtual.pop(slot, None)
        if virtual is not None:
            self.virtual[slot] = virtual
        self.kinds[slot] = weights.kind
        self._plan = self._held = None

    def unload(self, slot: int) -> None:
        self._check_slot(slot)
        with torch.no_grad():
            for layer in self.layers.values():
                layer.set_slot(slot, None, None, 0.0)
                layer.set_scales(slot)
        self.virtual.pop(slot, None)
        self.kinds.pop(slot, None)
        self._plan = self._held = None

    def virtual_tokens(self, slot: int) -> int:
        v = self.virtual.get(slot)
        return v.tokens if v is not None else 0

    def gathers(self, rows: int) -> bool:
        """Whether a batch of `rows` rows takes the gathered path. Otherwise (segments) the
        rows must be sorted by slot."""
        return rows * self._row_bytes <= self.gather_budget_bytes

    def set_batch(self, slots: list[int], *, transient: bool = False) -> None:
        """Tell every layer which slot each row uses. Rows must be sorted by slot for the
        segment path. A no-op when the batch and the slots are unchanged. `transient`: a
        prefill group, planned without touching the running batch's buffers; the next call
        without it is the running batch again, and copies only the rows that changed."""
        key = tuple(slots)
        if self._plan is not None and self._plan.key == key and self._plan.transient == transient:
            return
        segments, start = [], 0
        for i in range(1, len(key) + 1):
            if i == len(key) or key[i] != key[start]:
                if key[start] != 0:
                    segments.append((key[start], start, i))
                start = i
        gathered = self.gathers(len(key))
        index = torch.tensor(key, dtype=torch.long, device=self.device)
        changed = changed_index = None
        if gathered and not transient and self._held is not None:
            held = self._held
            moved = tuple(i for i, s in enumerate(key) if i >= len(held) or held[i] != s)
            changed = (moved, tuple(key[i] for i in moved))
            if len(moved) > COPY_ROWS_MAX:
                changed_index = (torch.tensor(moved, dtype=torch.long, device=self.device), index[list(moved)])
        # Room for the batch to grow without a new buffer, within the gather budget.
        capacity = min(max(2 * len(key), 8), max(len(key), self.gather_budget_bytes // max(self._row_bytes, 1)))
        plan = BatchPlan(key, index, tuple(segments), gathered, transient, changed, changed_index, capacity)
        for layer in self.layers.values():
            layer.plan(plan)
        if not transient:
            self._held = key if gathered else None
        self._plan = plan

    def set_tokens(self, token_slots: list[int]) -> None:
        """Tell every layer the adapter slot of each token of a flat run (paged engine). A
        decode step with the same rows as the last one keeps its plan, unless a layer was
        planned otherwise since (a slot loaded, a padded batch)."""
        flat = self._flat
        if flat is None or flat.key != tuple(token_slots) or any(m.flat_plan is not flat for m in self.layers.values()):
            flat = self._flat = FlatPlan.build(token_slots, self.device, self.kernels, self.max_rank)
            for layer in self.layers.values():
                layer.plan_flat(flat)
        self._plan = self._held = None  # the next set_batch plans afresh

    def _check_slot(self, slot: int) -> None:
        if not 1 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} out of range 1..{self.num_slots - 1} (slot 0 is the base model)")


def inject_lora(model: nn.Module, *, num_slots: int, max_rank: int,
                gather_budget_bytes: int = DEFAULT_GATHER_BUDGET, stack_dtype: torch.dtype | None = None,
                kernels: bool = True) -> LoraSlots:
    """Replace every target linear of `model` by a BatchedLoraLinear with `num_slots` slots
    (slot 0 = no adapter, so num_slots - 1 adapters can be resident at once). `stack_dtype`:
    the slot stacks' dtype (default: the base's compute dtype). `kernels`: use the C kernel
    for decode-sized flat runs on the CPU where it builds (False: the torch paths only)."""
    if num_slots < 2:
        raise ValueError("num_slots must be >= 2: slot 0 is reserved for the base model")
    layers: dict[str, BatchedLoraLinear] = {}
    model_dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
    targets = [
        (name, module) for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in TARGET_NAMES
    ]
    for name, module in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        wrapped = BatchedLoraLinear(module, num_slots, max_rank, stack_dtype, model_dtype)
        setattr(parent, child, wrapped)
        layers[name] = wrapped
    for name in layers:
        parent_name, _, child = name.rpartition(".")
        for siblings in FUSED_SIBLINGS:
            if child == siblings[0]:
                members = [layers.get(f"{parent_name}.{c}" if parent_name else c) for c in siblings]
                if all(m is not None for m in members):
                    group = SiblingGroup(members)
                    for i, m in enumerate(members):
                        m._siblings, m._sibling_index = group, i
    device = next(model.parameters()).device
    native_kernels = native.load() if kernels and device.type == "cpu" else None
    slots = LoraSlots(layers, num_slots, max_rank, device, gather_budget_bytes, native_kernels)
    from adapterd.engine.attention import supports_paged
    from adapterd.engine.prompts import prompt_shape

    if getattr(model, "config", None) is not None:  # a transformers model (not a bare module of linears)
        slots.prompt_shape = prompt_shape(model, supports_paged(model))
    slots.set_batch([0])
    return slots


def _scales(name: str, layer: BatchedLoraLinear, weights) -> dict[str, torch.Tensor]:
    """set_scales' arguments for module `name` of an adapter: IA3's vector, or DoRA's scale."""
    ia3 = weights.ia3.get(name)
    if ia3 is not None:
        vector, feedforward = ia3
        return {"inputs": vector} if feedforward else {"outputs": vector}
    if name not in weights.magnitudes:
        return {}
    g = weights.dora_scales.get(name)
    if g is None:
        a, b = weights.tensors[name]
        g = weights.dora_scales[name] = dora_scale(layer.base, a, b, weights.scaling, weights.magnitudes[name], name)
    bias = getattr(layer.base, "bias", None)
    if bias is None:
        return {"outputs": g}
    return {"outputs": g, "shift": (1 - g) * bias.detach().to(g.device, torch.float32)}


def reference_forward(base: nn.Module, x: torch.Tensor, adapters: list[tuple | None]) -> torch.Tensor:
    """The oracle: row by row, base(x) + scale * (x @ A.T) @ B.T, with `adapters[i]` either
    None (no adapter) or (A, B, scale) for row i."""
    rows = []
    for i, ad in enumerate(adapters):
        xi = x[i : i + 1]
        yi = base(xi)
        if ad is not None:
            a, b, scale = ad
            yi = yi + scale * (xi @ a.T) @ b.T
        rows.append(yi)
    return torch.cat(rows)


def _compute_dtype(base: nn.Module, model_dtype: torch.dtype) -> torch.dtype:
    dtype = getattr(base, "compute_dtype", None)  # bitsandbytes Linear4bit
    if dtype is not None:
        return dtype
    w = base.weight
    return w.dtype if w.dtype.is_floating_point else model_dtype  # int8: Linear8bitLt


def _device(base: nn.Module) -> torch.device:
    return base.weight.device
