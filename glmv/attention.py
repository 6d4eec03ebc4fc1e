"""Attention for the text decoder over a paged KV cache (glmv.paged), and the three ways a layer attends.

- `Dense`: a whole (left-padded) batch at once with no cache: `model.forward`, used for logits.
- `Prefill`: the real tokens of several rows packed into one sequence (no padding compute). Row r's tokens are written
  to its blocks at positions start_r.. and attend causally to the row's first start_r + n_r positions, so a row can
  continue a prompt prefix already in its blocks (a shared prefix).
- `Decode`: one token per slot, every slot at its own position; shapes never change during a run (CUDA graphs).

On CUDA in half precision, prefill and decode run flash attention's variable-length kernel over the block tables
(`torch.nn.attention.varlen.varlen_attn` with `block_table`: no mask, GQA native, causal bottom-right, per-row key
counts); elsewhere SDPA over each row's positions gathered through its table: per row with `is_causal`
(flash-eligible) or a lower-right causal bias, and for decode the query heads of a KV group folded into the query
length so that a plain boolean mask works without repeating keys per head. GLMV_ATTENTION=sdpa forces SDPA
everywhere, as does a torch whose varlen_attn lacks an argument the layout needs (`seqused_k`, `enable_gqa`,
`block_table`: torch 2.9-2.11).
"""

from __future__ import annotations

import functools
import inspect
import itertools
import logging
import os

import torch
import torch.nn.functional as F

from glmv.paged import PagedKVCache

log = logging.getLogger(__name__)
# torch.nn.attention's varlen and bias modules import torch._dynamo (~2 s of every model actor's start-up on CPU):
# both are imported on first use on CUDA, the only device where their kernels are used.
_UNLOADED = object()
varlen_attn = _UNLOADED   # torch's flash varlen kernel once loaded; None where this torch has none (< 2.9)
# What the cache layout needs from the kernel: per-row key counts (a row's last block is partly filled), native GQA,
# a bottom-right causal window and block tables. torch 2.9-2.11's varlen_attn has none of the first two.
VARLEN_ARGUMENTS = ("seqused_k", "enable_gqa", "window_size", "block_table")


def varlen_supported(fn) -> bool:
    """Whether this torch's varlen_attn takes every argument the cache layout needs."""
    if fn is None:
        return False
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return all(name in params for name in VARLEN_ARGUMENTS)


def _load_varlen():
    global varlen_attn
    if varlen_attn is _UNLOADED:
        try:
            from torch.nn.attention.varlen import varlen_attn as kernel
        except ImportError:  # torch < 2.9
            kernel = None
        varlen_attn = kernel
    return varlen_attn


def _require_varlen() -> None:
    """For Prefill/Decode built with varlen=True: callers normally ask use_varlen() first, which loads the kernel."""
    if _load_varlen() is None:
        raise ValueError("varlen=True, but this torch has no varlen_attn")


def use_varlen(like: torch.Tensor) -> bool:
    """Whether prefill/decode over a cache like `like` should use flash attention's variable-length kernel."""
    if not (like.is_cuda and like.dtype in (torch.float16, torch.bfloat16)
            and os.environ.get("GLMV_ATTENTION", "auto") != "sdpa"):
        return False
    if not varlen_supported(_load_varlen()):
        _log_no_varlen()
        return False
    return True


@functools.cache
def _log_no_varlen() -> None:
    log.warning("torch %s has no flash varlen_attn taking %s; prefill and decode use SDPA", torch.__version__,
                ", ".join(VARLEN_ARGUMENTS))


def lower_right_causal(n: int, total: int, device: torch.device):
    """The mask of n queries that are the last n of `total` positions (a row continuing a prefix in its slot)."""
    if device.type == "cuda":   # torch's CausalBias runs the flash/efficient kernels' own lower-right variant
        from torch.nn.attention.bias import causal_lower_right

        return causal_lower_right(n, total)
    # elsewhere CausalBias materialises this same mask, and warns on every call that no fused kernel takes it
    return torch.ones(n, total, dtype=torch.bool, device=device).tril(total - n)


class Dense:
    """A (B, T) batch with no cache; mask (B, 1, T, T) bool, or None for plain causal rows without padding."""

    def __init__(self, mask: torch.Tensor | None):
        self.mask = mask

    def __call__(self, layer: int, q, k, v):
        """q (B, T, H, Dh), k/v (B, T, H_kv, Dh) -> (B, T, H, Dh)."""
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask, is_causal=self.mask is None and q.shape[2] > 1,
                                           enable_gqa=q.shape[1] != k.shape[1])
        return y.transpose(1, 2)


class Prefill:
    """Packed rows: row r has lengths[r] new tokens at positions starts[r].. of the row whose blocks are tables[r]
    (a paged cache); they attend causally to that row's first starts[r] + lengths[r] positions, so a row can continue
    a prompt prefix already in its blocks (a group's shared prefix)."""

    def __init__(self, cache: PagedKVCache, tables: list[list[int]], starts: list[int], lengths: list[int],
                 varlen: bool = False):
        self.cache, self.starts, self.lengths, self.varlen = cache, starts, lengths, varlen
        if varlen:
            _require_varlen()
        device = cache.k[0].device
        ends = [s + n for s, n in zip(starts, lengths)]
        # where each packed token's keys/values go: (N,) rows of the flattened pool
        self.write = torch.cat([cache.host_index(t, s, e) for t, s, e in zip(tables, starts, ends)]).to(device)
        if varlen:  # queries packed back to back; each row's keys through its block table
            width = max(len(t) for t in tables)
            self.table = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32, device=device)
            self.cu_q = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
            self.cu_k = torch.tensor([0, *itertools.accumulate(ends)], dtype=torch.int32, device=device)
            self.used_k = torch.tensor(ends, dtype=torch.int32, device=device)
            self.max_q, self.max_k = max(lengths), max(ends)
        else:  # each row's keys gathered block by block through its table: its first blocks_for(start + n) ids
            self.reads = [torch.tensor(t[:cache.blocks_for(e)], device=device) for t, e in zip(tables, ends)]

    def __call__(self, layer: int, q, k, v):
        """q (1, N, H, Dh), k/v (1, N, H_kv, Dh) -> (1, N, H, Dh)."""
        keys, values = self.cache.flat(layer)
        keys[self.write] = k[0]
        values[self.write] = v[0]
        if self.varlen:
            y = varlen_attn(q[0], self.cache.k[layer], self.cache.v[layer], self.cu_q, self.cu_k, self.max_q,
                            self.max_k, window_size=(-1, 0), enable_gqa=True, seqused_k=self.used_k,
                            block_table=self.table)
            return y[None]
        out, offset = [], 0
        for read, start, n in zip(self.reads, self.starts, self.lengths):
            q_row = q[:, offset:offset + n].transpose(1, 2)  # (1, H, n, Dh)
            k_row = self.cache.k[layer][read].flatten(0, 1)[None, :start + n].transpose(1, 2)  # (1, H_kv, start+n, Dh)
            v_row = self.cache.v[layer][read].flatten(0, 1)[None, :start + n].transpose(1, 2)
            bias = lower_right_causal(n, start + n, q.device) if start else None
            y = F.scaled_dot_product_attention(q_row, k_row, v_row, attn_mask=bias, is_causal=bias is None,
                                               enable_gqa=q_row.shape[1] != k_row.shape[1])
            out.append(y.transpose(1, 2))
            offset += n
        return torch.cat(out, dim=1)


class Decode:
    """One new token per slot, written at positions[s] of the slot's row (its block table); it attends to the row's
    positions 0..positions[s].

    kv_len bounds the positions read by SDPA (>= every position + 1); keep it fixed for a static-shape step. varlen:
    use flash attention's variable-length kernel over the block tables (see `use_varlen`), which reads each slot's
    keys up to its position.
    """

    def __init__(self, cache: PagedKVCache, positions: torch.Tensor, kv_len: int, varlen: bool = False):
        self.cache, self.positions, self.kv_len, self.varlen = cache, positions, kv_len, varlen
        if varlen:
            _require_varlen()
        self.write = cache.index(cache.table, positions[:, None])[:, 0]  # (B,) flat rows
        self.read = None  # (B, kv_len / block_size) block ids, built on first use by the SDPA path, for all layers
        self.mask = None
        self.used_k = None

    def __call__(self, layer: int, q, k, v):
        """q (B, 1, H, Dh), k/v (B, 1, H_kv, Dh) -> (B, 1, H, Dh)."""
        keys, values = self.cache.flat(layer)
        keys[self.write] = k[:, 0]
        values[self.write] = v[:, 0]
        B, _, H, Dh = q.shape
        if self.varlen:
            return self._varlen(layer, q).view(B, 1, H, Dh)
        if self.mask is None:  # additive: SDPA would turn a boolean mask into this in every layer
            blocks = self.cache.blocks_for(self.kv_len)
            self.read = self.cache.table[:, :blocks].long()  # whole blocks: one copy each, not one per position
            visible = torch.arange(blocks * self.cache.block_size, device=q.device) <= self.positions[:, None]
            bias = torch.zeros(visible.shape, dtype=q.dtype, device=q.device).masked_fill_(~visible, float("-inf"))
            self.mask = bias[:, None, None, :]  # (B, 1, 1, S)
        kv_heads = keys.shape[1]
        q = q.view(B, kv_heads, H // kv_heads, Dh)  # the query heads of one KV group as its query rows
        keys = self.cache.k[layer][self.read].flatten(1, 2).transpose(1, 2)  # (B, H_kv, S, Dh)
        values = self.cache.v[layer][self.read].flatten(1, 2).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=self.mask)  # (B, H_kv, G, Dh)
        return y.reshape(B, 1, H, Dh)

    def _varlen(self, layer: int, q):
        B, max_k = q.shape[0], self.cache.max_len
        if self.used_k is None:
            self.cu_q = torch.arange(B + 1, dtype=torch.int32, device=q.device)
            self.cu_k = self.cu_q * max_k
            self.used_k = (self.positions + 1).to(torch.int32)
        return varlen_attn(q[:, 0], self.cache.k[layer], self.cache.v[layer], self.cu_q, self.cu_k, 1, max_k,
                           enable_gqa=True, seqused_k=self.used_k, block_table=self.cache.table)
