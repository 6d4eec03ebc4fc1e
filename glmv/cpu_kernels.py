"""CPU fast path: linear layers through oneDNN with weights prepacked once at load.

On the 2-core CPUs we run on, torch's default float32 matmul (the BLAS behind nn.Linear) reaches about half of
what oneDNN does with a prepacked weight, both for the many-row matmuls of the vision tower and prefill and for the
8-row matmuls of decoding (measured in bench/bench_generate.py). Packing replaces each nn.Linear by a PackedLinear
whose `weight` parameter is the same values in oneDNN's blocked layout (an opaque `torch._mkldnn` tensor); the
original weight is dropped, so memory stays the same. The module keeps torch's contract: `parameters()` lists every
weight, and `state_dict()` / `load_state_dict()` read and write them in the ordinary dense layout.
Only float32 on CPU, and only where torch was built with oneDNN; everything else keeps nn.Linear.

Linears of one input that a module lists in `fused_linears` ({"qkv_proj": ("q_proj", "k_proj", "v_proj")}) are
packed as one weight: one matmul, whose output is theirs side by side. A decode step's matmuls are a few rows against
the whole weight, and each call costs a fixed start (threads, a cold stream of weight pages) besides the bytes:
fusing q, k and v took ~1.3 ms off a 37 ms decode step of the bench model. The fused module still saves and loads
the separate keys of the checkpoint.
"""

from __future__ import annotations

import functools
import logging

import torch
import torch.nn as nn

log = logging.getLogger(__name__)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    return (device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()
            and hasattr(torch.ops.mkldnn, "_linear_pointwise") and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


class PackedLinear(nn.Module):
    """One nn.Linear, or several of the same input (`parts`: their names in the parent), as one packed weight."""

    def __init__(self, linears: list[nn.Linear], parts: tuple[str, ...] = (), batch_hint: int = 8):
        super().__init__()
        self.parts = parts
        self.in_features = linears[0].in_features
        self.part_features = [linear.out_features for linear in linears]
        self.out_features = sum(self.part_features)
        self.batch_hint = batch_hint  # the layout is chosen for this many rows but serves any number of rows
        weight = torch.cat([linear.weight.detach() for linear in linears])
        self.weight = nn.Parameter(self._pack(weight), requires_grad=False)
        biases = [linear.bias for linear in linears]
        if any(b is not None for b in biases) and not all(b is not None for b in biases):
            raise ValueError(f"cannot fuse linears with and without bias: {parts}")
        self.bias = None if biases[0] is None else nn.Parameter(torch.cat([b.detach() for b in biases]),
                                                                requires_grad=False)

    def _pack(self, weight: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight, self.batch_hint)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.weight, self.bias, "none", [], "")

    def _keys(self, prefix: str) -> list[tuple[str, str]]:
        """(weight key, bias key) per part in the checkpoint layout. A fused module's own name ends `prefix`; its
        parts are its siblings."""
        if not self.parts:
            return [(prefix + "weight", prefix + "bias")]
        parent = prefix[:prefix.rstrip(".").rfind(".") + 1]
        return [(f"{parent}{name}.weight", f"{parent}{name}.bias") for name in self.parts]

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        dense = self.weight.detach().to_dense().split(self.part_features)  # the plain (out, in) layout
        biases = self.bias.detach().split(self.part_features) if self.bias is not None else [None] * len(dense)
        for (weight_key, bias_key), weight, bias in zip(self._keys(prefix), dense, biases):
            destination[weight_key] = weight
            if bias is not None:
                destination[bias_key] = bias

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"  # a fused module's: its parts' weights, concatenated by _merge_part_keys
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
        fused = f", parts={self.parts}" if self.parts else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}{fused}")


def is_packed(model: nn.Module) -> bool:
    """Whether any linear below `model` was packed (such a model cannot be moved, cast or traced)."""
    return any(isinstance(m, PackedLinear) for m in model.modules())


def pack_linears(model: nn.Module) -> int:
    """Swap every nn.Linear below `model` for a PackedLinear, one at a time (peak: one extra weight), fusing the
    groups that modules list in `fused_linears`. Returns how many nn.Linear were packed."""
    # Hold (parent, names) pairs only: a reference to the linears themselves would keep every original weight
    # alive until the end, doubling the peak.
    targets = []
    for parent in model.modules():
        fused = {name: parts for name, parts in getattr(parent, "fused_linears", {}).items()
                 if all(type(getattr(parent, part, None)) is nn.Linear for part in parts)}
        in_groups = {part for parts in fused.values() for part in parts}
        targets += [(parent, name, parts) for name, parts in fused.items()]
        targets += [(parent, name, ()) for name, child in parent.named_children()
                    if type(child) is nn.Linear and name not in in_groups]
    count = 0
    for parent, name, parts in targets:
        try:
            packed = PackedLinear([getattr(parent, part) for part in parts or (name,)], parts)
        except RuntimeError as e:  # an unusual CPU or build: keep plain nn.Linear from here on
            log.warning("oneDNN weight packing unavailable (%s); using plain linear layers", e)
            return count
        if parts:  # the fused module takes its first part's place, so state_dict keeps the checkpoint's key order
            parent._modules = {(name if key == parts[0] else key): (packed if key == parts[0] else module)
                               for key, module in parent._modules.items() if key not in parts[1:]}
            parent.register_load_state_dict_pre_hook(functools.partial(_merge_part_keys, name=name, parts=parts))
        else:
            setattr(parent, name, packed)
        count += len(parts) or 1
    return count


def _merge_part_keys(module, state_dict, prefix, *args, name: str, parts: tuple[str, ...]) -> None:
    """Load hook of a module with fused linears: its parts' checkpoint keys become the fused module's, concatenated
    (a child only sees the keys under its own name). Parts missing from the state dict are left to be reported."""
    for leaf in ("weight", "bias"):
        keys = [f"{prefix}{part}.{leaf}" for part in parts]
        if all(key in state_dict for key in keys):
            state_dict[f"{prefix}{name}.{leaf}"] = torch.cat([state_dict.pop(key) for key in keys])
