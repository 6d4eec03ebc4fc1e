"""CPU fast path: linear layers through oneDNN with weights prepacked once at load.

On the 2-core CPUs we run on, torch's default float32 matmul (the BLAS behind nn.Linear) reaches about half of
what oneDNN does with a prepacked weight, both for the many-row matmuls of the vision tower and prefill and for the
8-row matmuls of decoding (measured in bench/bench_generate.py). Packing replaces each nn.Linear by a PackedLinear
whose `weight` parameter is the same values in oneDNN's blocked layout (an opaque `torch._mkldnn` tensor); the
original weight is dropped, so memory stays the same. The module keeps torch's contract: `parameters()` lists every
weight, and `state_dict()` / `load_state_dict()` read and write them in the ordinary dense layout.
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
        self.batch_hint = batch_hint  # the layout is chosen for this many rows but serves any number of rows
        self.weight = nn.Parameter(self._pack(linear.weight.detach()), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach(), requires_grad=False)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, self.batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.weight.detach().to_dense()  # the plain (out, in) layout

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        dense = state_dict.get(key)
        if dense is not None:  # the parent's loader would copy_ a dense tensor into the blocked one: repack instead
            state_dict = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if dense is None:
            return
        missing_keys.remove(key)
        if tuple(dense.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(dense.shape)}, the "
                              f"current model needs {(self.out_features, self.in_features)}")
            return
        self.weight = nn.Parameter(self._pack(dense.to(torch.float32).contiguous()), requires_grad=False)

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
