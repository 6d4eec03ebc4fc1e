"""FP8 releases (GLM-4.5V-FP8, GLM-4.6V-FP8): e4m3 weights with block-wise scales, as transformers' fine-grained FP8
integration and vLLM read them.

config.json carries `quantization_config: {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
"weight_block_size": [128, 128], "modules_to_not_convert": [...]}`; each quantized `X.weight` (out, in) is stored
as F8_E4M3 next to `X.weight_scale_inv` (ceil(out/128), ceil(in/128)) float32, and the weight is q * scale_inv of
its block. Which tensors are quantized is read from the checkpoint itself (dtype and scale), so the module list
only has to be well formed.

Two ways to run them:
- dequantize at load (CPU, and GPUs without FP8): each tensor becomes the compute dtype as it is read;
- keep FP8 (CUDA from sm89, or GLMV_FP8=keep): the decoder's linear layers and experts hold the FP8 weights and
  their scales (half the bytes of bfloat16) and dequantize per layer as they run; experts dequantize only the
  experts that received tokens. Activations stay in the compute dtype (the dynamic activation scheme quantizes
  them per call; computing them unquantized is the more accurate of the two).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmv.config import SCALE_SUFFIX, ConfigError

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max  # 448
SCALE = SCALE_SUFFIX   # the suffix of a weight's block scales, by the name glmv.weights and glmv.moe use


@dataclass(frozen=True)
class Fp8Spec:
    block: tuple[int, int] = (128, 128)  # (rows, columns) of a weight block sharing one scale
    modules_to_not_convert: tuple[str, ...] = ()


def read_quantization(config_file: Path) -> Fp8Spec | None:
    """The checkpoint's FP8 settings, None for an unquantized checkpoint; anything else named and refused."""
    raw = json.loads(Path(config_file).read_text()).get("quantization_config")
    if raw is None:
        return None
    where = f"{config_file}: quantization_config"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a JSON object")
    checks = [("quant_method", ("fp8",)), ("activation_scheme", ("dynamic",)), ("fmt", ("e4m3", None)),
              ("scale_fmt", ("float", None))]
    for key, allowed in checks:
        value = raw.get(key, None if None in allowed else "")
        if (value.lower() if isinstance(value, str) else value) not in allowed:
            raise ConfigError(f"{where}.{key} {value!r} is not supported (glmv reads {allowed[0]!r} block-wise FP8)")
    block = raw.get("weight_block_size")
    if not (isinstance(block, list) and len(block) == 2 and all(type(b) is int and b > 0 for b in block)):
        raise ConfigError(f"{where}.weight_block_size must be two positive integers, got {block!r}")
    skip = raw.get("modules_to_not_convert") or []
    if not (isinstance(skip, list) and all(isinstance(m, str) for m in skip)):
        raise ConfigError(f"{where}.modules_to_not_convert must be a list of module names, got {skip!r}")
    return Fp8Spec(tuple(block), tuple(skip))


def keep_on(device: torch.device, spec: Fp8Spec | None) -> bool:
    """Whether FP8 weights stay FP8 on this device (GLMV_FP8=keep|dequantize overrides the choice)."""
    choice = os.environ.get("GLMV_FP8", "auto")
    if spec is None or choice == "dequantize":
        return False
    if choice == "keep":
        return True
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= (8, 9)


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], parts: tuple[int, ...] = (),
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., R, C) FP8 and scale_inv (..., ceil(R/bm), ceil(C/bn)) -> q * scale of its block in `dtype`, computed
    in float32 as transformers does. parts: row counts of weights stacked along R, each with its own scale rows
    (an expert's [gate; up]); a last block may be partial."""
    bm, bn = block
    parts = parts or (q.shape[-2],)
    grids = scale_inv.float().split([cdiv(p, bm) for p in parts], dim=-2)
    rows = torch.cat([g.repeat_interleave(bm, dim=-2)[..., :p, :] for g, p in zip(grids, parts)], dim=-2)
    full = rows.repeat_interleave(bn, dim=-1)[..., :q.shape[-1]]  # (..., R, C)
    return (q.float() * full).to(dtype)


def quantize(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """w (..., R, C) -> (e4m3 weights, float32 scale_inv (..., ceil(R/bm), ceil(C/bn))): each block scaled so its
    largest magnitude is FP8's largest, the released checkpoints' block quantization (partial last blocks too)."""
    bm, bn = block
    R, C = w.shape[-2:]
    padded = F.pad(w.float(), (0, cdiv(C, bn) * bn - C, 0, cdiv(R, bm) * bm - R))
    tiles = padded.unflatten(-1, (-1, bn)).unflatten(-3, (-1, bm))  # (..., R/bm, bm, C/bn, bn)
    amax = tiles.abs().amax(dim=(-3, -1))  # (..., R/bm, C/bn)
    scale_inv = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (tiles / scale_inv[..., :, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q.flatten(-2).flatten(-3, -2)[..., :R, :C].contiguous(), scale_inv


class Fp8Linear(nn.Module):
    """nn.Linear over an FP8 weight and its block scales, dequantized to the input's dtype on every call."""

    def __init__(self, linear: nn.Linear, block: tuple[int, int]):
        super().__init__()
        out_features, in_features = linear.weight.shape
        self.block = block
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=FP8, device="meta"),
                                   requires_grad=False)
        self.register_buffer("weight_scale_inv", torch.empty(cdiv(out_features, block[0]),
                                                             cdiv(in_features, block[1]), device="meta"))
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, dequantize(self.weight, self.weight_scale_inv, self.block, dtype=x.dtype), self.bias)
