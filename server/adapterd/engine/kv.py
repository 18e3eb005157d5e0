"""The paged KV cache: a pool of fixed-size blocks, a block table per row, and full blocks
shared by prefix.

    pool (per layer)   K, V: [num_blocks * block_size, kv_heads, head_dim], token-major:
                       token j of a row is at slot table[j // block_size] * block_size
                       + j % block_size
    a row              its own block table; it holds its tokens only, so a join or a finish
                       copies nobody's cache, and attention reads each row's real length
    prefix cache       a full block is named by a hash chain: h_0 = H(salt), h_i =
                       H(h_{i-1}, the block's token ids). The salt is the tenant, the adapter's
                       content identity and its resolved "name@version", so a hit never
                       crosses a tenant, an adapter or a version (the peers' worst prefix
                       bugs: a cache reused across adapters). A block nobody holds stays
                       cached until its space is needed (LRU).

Nothing here is thread-safe: the engine thread owns it.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

DEFAULT_BLOCK_SIZE = 16


def prefix_salt(tenant: str, adapter_key: str | None, adapter_name: str | None) -> bytes:
    """h_0 of a request's hash chain: who asks, with which adapter content and version."""
    parts = [tenant, adapter_key or "", adapter_name or ""]
    return hashlib.sha256("\0".join(parts).encode()).digest()


def chain(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", tokens).tobytes()).digest()


class KVPool:
    """The K and V tensors of every layer, allocated once."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device):
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_layers, num_blocks * block_size, kv_heads, head_dim)
        # Never read before written (attention reads a row's own slots only), so left
        # uninitialized: the pages of a large pool are not touched until used.
        self.k = torch.empty(shape, dtype=dtype, device=device)  # (layers, slots, kv_heads, dim)
        self.v = torch.empty(shape, dtype=dtype, device=device)

    @staticmethod
    def shape_of(model) -> tuple[int, int, int, torch.dtype]:
        """(layers, kv_heads, head_dim, dtype) of a model's K/V: what a pool for it holds."""
        c = model.config
        kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
        head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        dtype = next((p.dtype for p in model.parameters() if p.dtype.is_floating_point), torch.float32)
        return c.num_hidden_layers, kv_heads, head_dim, dtype

    @staticmethod
    def bytes_per_token(model) -> int:
        layers, kv_heads, head_dim, dtype = KVPool.shape_of(model)
        return 2 * layers * kv_heads * head_dim * torch.empty((), dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


@dataclass
class BlockStats:
    hits: int = 0  # prompt blocks found in the prefix cache
    lookups: int = 0  # full prompt blocks looked up
    evictions: int = 0  # cached blocks reused for new tokens


@dataclass
class Blocks:
    """Free, held and cached blocks, with reference counts. A block is in exactly one of:
    free (no content anyone can find), held (refcount > 0), or evictable (refcount 0 but
    still cached, LRU order)."""

    num_blocks: int
    block_size: int
    refcount: list[int] = field(init=False)
    stats: BlockStats = field(default_factory=BlockStats)

    def __post_init__(self):
        self.refcount = [0] * self.num_blocks
        self._free = list(range(self.num_blocks - 1, -1, -1))  # pop() gives block 0 first
        self._cached: dict[bytes, int] = {}  # chain hash -> block
        self._hash_of: dict[int, bytes] = {}  # block -> chain hash
        self._salt_of: dict[int, bytes] = {}  # block -> salt, for drop()
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self.reserved = 0  # blocks promised to admitted rows, not yet allocated

    # --- capacity --------------------------------------------------------------------

    @property
    def available(self) -> int:
        """Blocks that can be handed out now (free, or cached by nobody), less promises."""
        return len(self._free) + len(self._evictable) - self.reserved

    @property
    def held(self) -> int:
        return self.num_blocks - len(self._free) - len(self._evictable)

    @property
    def free(self) -> int:
        """Blocks on the free list (never used, or used and not cached)."""
        return len(self._free)

    def held_counted(self) -> int:
        """Blocks some row holds, counted from their refcounts (`held` is the complement of
        the free and evictable lists; the two agree unless a block leaked)."""
        return sum(1 for r in self.refcount if r > 0)

    @property
    def cached(self) -> int:
        return len(self._cached)

    @property
    def evictable(self) -> int:
        """Cached blocks nobody holds: reusable by a prefix hit, or for new tokens."""
        return len(self._evictable)

    def blocks_for(self, tokens: int) -> int:
        return -(-tokens // self.block_size)

    # --- allocation ------------------------------------------------------------------

    def allocate(self) -> int:
        """A block for new tokens, refcount 1: a free one, else the least recently used
        cached block nobody holds. The caller must have reserved it."""
        if self._free:
            block = self._free.pop()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._uncache(block)
            self.stats.evictions += 1
        self.refcount[block] = 1
        return block

    def release(self, blocks: list[int]) -> None:
        for block in blocks:
            self.refcount[block] -= 1
            if self.refcount[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None  # most recently used at the end
                else:
                    self._free.append(block)

    # --- the prefix cache ------------------------------------------------------------

    def match(self, salt: bytes, tokens: list[int], limit: int) -> tuple[list[int], list[bytes]]:
        """The cached blocks that hold `tokens`' first full blocks (at most `limit` blocks),
        each taken (refcount + 1), and their chain hashes. Stops at the first miss."""
        bs = self.block_size
        blocks, hashes, h = [], [], salt
        for i in range(min(limit, len(tokens) // bs)):
            h = chain(h, tokens[i * bs:(i + 1) * bs])
            self.stats.lookups += 1
            block = self._cached.get(h)
            if block is None:
                break
            self.stats.hits += 1
            if self.refcount[block] == 0:
                del self._evictable[block]
            self.refcount[block] += 1
            blocks.append(block)
            hashes.append(h)
        return blocks, hashes

    def register(self, block: int, h: bytes, salt: bytes) -> None:
        """`block` now holds the full block named `h`: others may share it from now on. If
        another row cached the same tokens first, this block simply stays private."""
        if h in self._cached or block in self._hash_of:
            return
        self._cached[h] = block
        self._hash_of[block] = h
        self._salt_of[block] = salt

    def drop(self, salt: bytes) -> int:
        """Forget every cached block of `salt` (an adapter version deleted or replaced);
        blocks nobody holds are freed now. Returns how many were forgotten."""
        gone = [b for b, s in self._salt_of.items() if s == salt]
        for block in gone:
            self._uncache(block)
            if self.refcount[block] == 0:
                del self._evictable[block]
                self._free.append(block)
        return len(gone)

    def _uncache(self, block: int) -> None:
        h = self._hash_of.pop(block)
        self._salt_of.pop(block, None)
        if self._cached.get(h) == block:
            del self._cached[h]
