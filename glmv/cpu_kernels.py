"""CPU fast path: linear layers through oneDNN with weights prepacked once at load.

On the 2-core CPUs we run on, torch's default float32 matmul (the BLAS behind nn.Linear) reaches about half of
what oneDNN does with a prepacked weight, both for the many-row matmuls of the vision tower and prefill and for the
8-row matmuls of decoding (measured in bench/bench_generate.py). Packing replaces each nn.Linear by a PackedLinear
holding the weight in oneDNN's blocked layout; the original weight is dropped, so memory stays the same.
Only float32 on CPU, and only where torch was built with oneDNN; everything else keeps nn.Linear.
"""

from __future__ import annotations

import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    def __init__(self, linear: nn.Linear, batch_hint: int = 8):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        # the layout is chosen for `batch_hint` rows but serves any number of rows
        self.register_buffer("packed_weight", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(),
                                                                                     batch_hint), persistent=False)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach(), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def is_packed(model: nn.Module) -> bool:
    """Whether any linear below `model` was packed (such a model cannot be moved, cast or traced)."""
    return any(isinstance(m, PackedLinear) for m in model.modules())


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear below `model` for a PackedLinear, one at a time (peak: one extra weight).
    Returns how many were packed."""
    # Hold (parent, name) pairs only: a reference to the linears themselves would keep every original weight
    # alive until the end, doubling the peak.
    targets = [(parent, name) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for count, (parent, name) in enumerate(targets):
        try:
            packed = PackedLinear(getattr(parent, name))
        except RuntimeError as e:  # an unusual CPU or build: keep plain nn.Linear from here on
            log.warning("oneDNN weight packing unavailable (%s); using plain linear layers", e)
            return count
        setattr(parent, name, packed)
    return len(targets)
