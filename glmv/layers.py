"""Primitives shared by the vision tower and the text decoder: RMSNorm, SiLU-gated MLPs, rotary frequency tables.

Numerics follow the reference on purpose: norm statistics and rotary angles are computed in float32 whatever the
model dtype (this is what the checkpoints were made with).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The reference's x * rsqrt(mean(x^2) + eps) in float32; F.rms_norm gives the same bits in one call, and
        # a CPU decode step runs 4 norms per layer on a few rows, where each op's fixed cost is what counts.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)) with separate gate/up weights (the vision blocks' and the merger's layout)."""

    def __init__(self, dim: int, hidden: int, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=bias)
        self.up_proj = nn.Linear(dim, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class FusedGatedMLP(nn.Module):
    """The same MLP with gate and up fused into one [gate; up] weight (the text decoder's layout): one matmul."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(dim, 2 * hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def inverse_frequencies(dim: int, theta: float, device="cpu") -> torch.Tensor:
    """(dim / 2,) float32 rotary frequencies 1 / theta^(2i / dim)."""
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))


class RotaryTable:
    """Mixin for a module holding a non-persistent float32 `inv_freq` table of `rotary_table_dim()` dims.

    The table is recomputed, never cast: model.to(torch.bfloat16) would round the frequencies (angle errors grow with
    position), and a model built on the meta device needs it computed once its weights are loaded.
    """

    def rotary_table_dim(self) -> int:
        raise NotImplementedError

    def rotary_theta(self) -> float:
        raise NotImplementedError

    def register_rotary_table(self) -> None:
        self.register_buffer("inv_freq", torch.empty(self.rotary_table_dim() // 2), persistent=False)
        self.init_buffers()

    def init_buffers(self, device="cpu"):
        """An explicit device, because ops on meta tensors import ~150 MB of torch's symbolic machinery."""
        self.inv_freq = inverse_frequencies(self.rotary_table_dim(), self.rotary_theta(), device)

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        self.init_buffers(self.inv_freq.device)
        return self
