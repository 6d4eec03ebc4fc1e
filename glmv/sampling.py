"""Choosing the next token on the device, with no host sync: repetition penalty, greedy or temperature/top-k/top-p.

Randomness is counter-based: the uniform number a row draws for its n-th new token is a hash of (row key, n), computed
with integer tensor ops. So a row's draws depend only on its own key and how far it got, never on its batch, its slot,
the device or the step at which it was admitted, and the draw needs no generator state (it can be captured in a
CUDA graph). Row keys come from per-row seeds; `row_seed(seed, item_id, task)` derives one per (item, task), so
sampled outputs of different items are independent while a rerun reproduces them.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

_M32 = 0xFFFFFFFF


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float

    def validate(self):
        if self.do_sample and not self.temperature > 0:
            raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def row_seed(seed: int, item_id: str, task: str) -> int:
    """A 62-bit seed for one (item, task) of a run seeded with `seed`."""
    digest = hashlib.blake2b(f"{seed}\x00{item_id}\x00{task}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2


def row_keys(seeds: list[int], device) -> torch.Tensor:
    """(R, 2) int64: two 32-bit words per row, hashed from its seed (any Python int)."""
    words = []
    for seed in seeds:
        digest = hashlib.blake2b(str(int(seed)).encode(), digest_size=8).digest()
        words.append([int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:], "little")])
    return torch.tensor(words, dtype=torch.long, device=device).view(-1, 2)


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """x * c mod 2^32 for 0 <= x < 2^32, in int64 without overflow (16-bit halves of c)."""
    return (x * (c & 0xFFFF) + (((x * (c >> 16)) & 0xFFFF) << 16)) & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer hash with good avalanche (C. Wellons' lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform(keys: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """(B, 2) keys, (B,) counters -> (B,) float32 uniform in (0, 1]: never 0, so a zero-probability token at the
    start of the vocabulary can never be drawn."""
    h = _mix32(keys[:, 0] ^ _mix32(keys[:, 1] ^ _mix32(counters & _M32)))
    return ((h >> 8) + 1).float() / float(1 << 24)


def seen_tokens(input_ids: torch.Tensor, valid: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """(B, V) bool: which token ids each row's real prompt tokens hold (padding is not a seen token)."""
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool, device=input_ids.device)
    rows, cols = valid.nonzero(as_tuple=True)
    seen[rows, input_ids[rows, cols]] = True
    return seen


def choose(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None, keys: torch.Tensor,
           counters: torch.Tensor) -> torch.Tensor:
    """Next token per row from (B, V) logits -> (B,) int64 on the logits' device."""
    logits = logits.float()
    if seen is not None:
        penalised = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not p.do_sample:
        return logits.argmax(-1)
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = logits.topk(p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1)  # ascending
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative <= 1 - p.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    cdf = logits.softmax(-1).cumsum(-1)  # (B, V)
    u = uniform(keys, counters)[:, None] * cdf[:, -1:]  # the cdf's last entry is 1 up to rounding
    return torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1).flatten()
