"""The paged KV cache: every layer's keys and values in one pool of fixed-size blocks, and a block table per slot.

A row holds ceil(positions / block_size) blocks, taken as it grows and given back when it ends, so the slots together
need the memory of the positions their rows hold, not slots x the longest row. Blocks are reference-counted: the
members of a prefix group point at the full blocks of their shared prefix (a partial last block is copied, as each
member writes its own tokens after it). Block 0 is scratch: empty slots and the table entries past a row's blocks
point at it, so that a static-shape decode step of a slot without a row writes there harmlessly.

Per layer the pool is (blocks, block_size, H_kv, Dh), flash attention's paged layout (`block_table` of
varlen_attn); SDPA (CPU, float32) gathers a row's positions through its table. The table lives on the device
(slots, max_blocks) int32 and on the host as lists, which every change updates together.
"""

from __future__ import annotations

import torch

SCRATCH = 0


class BlockPool:
    """Host bookkeeping of the blocks: free list and reference counts (block 0, scratch, is never handed out)."""

    def __init__(self, blocks: int):
        self.refs = [0] * blocks
        self.free = list(range(blocks - 1, 0, -1))  # popped from the end: low ids first

    @property
    def in_use(self) -> int:
        return len(self.refs) - 1 - len(self.free)

    def take(self, n: int) -> list[int] | None:
        if n > len(self.free):
            return None
        ids = [self.free.pop() for _ in range(n)]
        for i in ids:
            self.refs[i] = 1
        return ids

    def share(self, ids: list[int]) -> None:
        for i in ids:
            self.refs[i] += 1

    def release(self, ids: list[int]) -> None:
        for i in ids:
            self.refs[i] -= 1
            if not self.refs[i]:
                self.free.append(i)

    def extend(self, blocks: int) -> None:
        """The pool grew to `blocks` (new ids after the old ones)."""
        self.free[:0] = range(blocks - 1, len(self.refs) - 1, -1)
        self.refs.extend([0] * (blocks - len(self.refs)))


class PagedKVCache:
    def __init__(self, num_layers: int, blocks: int, block_size: int, slots: int, max_blocks: int, kv_heads: int,
                 head_dim: int, dtype, device):
        shape = (blocks, block_size, kv_heads, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.block_size = block_size
        self.table = torch.full((slots, max_blocks), SCRATCH, dtype=torch.int32, device=device)
        self.rows: list[list[int]] = [[] for _ in range(slots)]  # host copy of each slot's blocks
        self.pool = BlockPool(blocks)

    @property
    def blocks(self) -> int:
        return self.k[0].shape[0]

    @property
    def slots(self) -> int:
        return self.table.shape[0]

    @property
    def max_len(self) -> int:
        """Positions a slot's table can address."""
        return self.table.shape[1] * self.block_size

    def block_bytes(self) -> int:
        return 2 * len(self.k) * self.k[0][0].numel() * self.k[0].element_size()

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    # -- a slot's blocks ------------------------------------------------------------------------------------------

    def reserve(self, slot: int, positions: int) -> bool:
        """Give the slot blocks for its first `positions` positions; False (nothing taken) if the pool lacks them."""
        need = self.blocks_for(positions) - len(self.rows[slot])
        if need <= 0:
            return True
        ids = self.pool.take(need)
        if ids is None:
            return False
        self._set(slot, self.rows[slot] + ids)
        return True

    def adopt(self, slot: int, shared: list[int]) -> None:
        """Start the slot's row on blocks it shares (a group's full prefix blocks)."""
        self.pool.share(shared)
        self._set(slot, list(shared))

    def release(self, slot: int) -> None:
        self.pool.release(self.rows[slot])
        self._set(slot, [])

    def _set(self, slot: int, ids: list[int]) -> None:
        self.rows[slot] = ids
        row = torch.full((self.table.shape[1],), SCRATCH, dtype=torch.int32)
        row[:len(ids)] = torch.tensor(ids, dtype=torch.int32)
        self.table[slot] = row.to(self.table.device)

    def copy_block(self, dst: int, src: int) -> None:
        for pool in self.k + self.v:
            pool[dst] = pool[src]

    # -- addressing ------------------------------------------------------------------------------------------------

    def flat(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's keys and values as (blocks * block_size, H_kv, Dh): position p of block b is row b * bs + p."""
        return self.k[layer].flatten(0, 1), self.v[layer].flatten(0, 1)

    def index(self, blocks: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat rows of `positions` (any shape) in rows whose block ids are `blocks` (..., max_blocks), on the
        device, with no host sync."""
        bs = self.block_size
        block = torch.gather(blocks.long(), -1, (positions // bs).long())
        return block * bs + positions % bs

    def host_index(self, ids: list[int], start: int, end: int) -> torch.Tensor:
        """Flat rows of positions [start, end) of a row whose blocks are `ids` (built on the host: prefill)."""
        bs = self.block_size
        positions = torch.arange(start, end)
        return torch.tensor(ids, dtype=torch.long)[positions // bs] * bs + positions % bs

    # -- growing (a pool without a fixed size) -------------------------------------------------------------------

    def grown(self, blocks: int, max_blocks: int) -> "PagedKVCache":
        """A larger cache holding this one's blocks and tables (this one is dropped)."""
        blocks, max_blocks = max(blocks, self.blocks), max(max_blocks, self.table.shape[1])
        new = PagedKVCache.__new__(PagedKVCache)
        new.k = [_grow0(t, blocks) for t in self.k]
        new.v = [_grow0(t, blocks) for t in self.v]
        new.block_size, new.rows, new.pool = self.block_size, self.rows, self.pool
        new.table = torch.full((self.slots, max_blocks), SCRATCH, dtype=torch.int32, device=self.table.device)
        new.table[:, :self.table.shape[1]] = self.table
        new.pool.extend(blocks)
        return new


def _grow0(t: torch.Tensor, n: int) -> torch.Tensor:
    if t.shape[0] == n:
        return t
    out = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=t.device)
    out[:t.shape[0]] = t
    return out
