"""The GLM-4.5V/4.6V mixture-of-experts text decoder (transformers' Glm4vMoeForConditionalGeneration).

Against the dense decoder (glmv.text): rotary dims pair as halves (x[i], x[i + rd/2]) instead of neighbours; a
layer has two norms, not four; the first `first_k_dense_replace` layers keep a gated MLP and the others route each
token to `num_experts_per_tok` of `n_routed_experts` experts plus always-on shared experts. The router works in
float32 whatever the model dtype: sigmoid scores, plus `e_score_correction_bias` to choose (never to weigh), best
`topk_group` of `n_group` groups (a group scores by its top 2), then the top k inside them; the chosen scores are
normalised (`norm_topk_prob`) and scaled (`routed_scaling_factor`).

Experts run over the token copies sorted by expert: one grouped matmul per projection (`torch._grouped_mm`: no host
sync, so a decode step stays capturable in a CUDA graph) where torch has it for the dtype and device, else a loop
over the experts that received tokens, one matmul each. Attention, caches and the engine interface are the dense
decoder's. Under tensor parallelism (glmv.parallel) a rank holds a contiguous share of the experts: the copies of
tokens routed to other ranks' experts sort last, outside every expert's rows, and add nothing.
"""

from __future__ import annotations

import re

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmv import fp8
from glmv.config import MOE_ARCHITECTURE, TextConfig
from glmv.layers import GatedMLP, RMSNorm
from glmv.model import Glm4vForConditionalGeneration
from glmv.text import Attention, TextModel
from glmv.weights import Piece

GROUPED_MM = True  # use torch._grouped_mm where it runs (tests switch it off to check the loop against it)


def apply_rotary_halves(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, Dh); rotates the first rd = 2 * rotation.shape[-1] dims as pairs (x[i], x[i + rd/2]): the
    reference's x * cos + rotate_half(x) * sin, with its float32 cos and sin cast to x's dtype."""
    half = rotation.shape[-1]
    cos, sin = rotation.real[:, :, None].to(x.dtype), rotation.imag[:, :, None].to(x.dtype)  # (B, T, 1, rd/2)
    x1, x2, rest = x[..., :half], x[..., half:2 * half], x[..., 2 * half:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], dim=-1)


class MoeAttention(Attention):
    rotate = staticmethod(apply_rotary_halves)


class TopkRouter(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        m = cfg.moe
        self.top_k, self.groups, self.topk_group = m.num_experts_per_tok, m.n_group, m.topk_group
        self.norm_topk_prob, self.scaling = m.norm_topk_prob, m.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(m.n_routed_experts, cfg.hidden_size))
        self.register_buffer("e_score_correction_bias", torch.zeros(m.n_routed_experts, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (N, D) -> (weights (N, k) float32, expert indices (N, k))."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        choice = scores + self.e_score_correction_bias
        if self.topk_group < self.groups:  # keep the best groups only (with all groups kept this changes nothing)
            N, E = choice.shape
            grouped = choice.view(N, self.groups, E // self.groups)
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, G)
            best = group_scores.topk(self.topk_group, dim=-1, sorted=False)[1]
            keep = torch.zeros_like(group_scores).scatter_(1, best, 1).bool()
            choice = choice.masked_fill(~keep[..., None].expand_as(grouped).reshape(N, E), float("-inf"))
        indices = choice.topk(self.top_k, dim=-1, sorted=False)[1]
        weights = scores.gather(1, indices)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices


class Experts(nn.Module):
    """The routed experts' weights stacked as transformers' fused layout holds them: gate_up_proj (E, 2I, D) with
    [gate; up] rows, down_proj (E, D, I)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        m = cfg.moe
        self.num_experts, self.inner = m.n_routed_experts, m.moe_intermediate_size
        self.first = 0  # the global id of this rank's first expert (expert parallel: glmv.parallel.shard)
        self.split = False  # whether other ranks hold some of the experts
        self.gate_up_proj = nn.Parameter(torch.empty(m.n_routed_experts, 2 * m.moe_intermediate_size,
                                                     cfg.hidden_size))
        self.down_proj = nn.Parameter(torch.empty(m.n_routed_experts, cfg.hidden_size, m.moe_intermediate_size))

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x (N, D), indices and weights (N, k) -> the weighted sum of each token's k experts (N, D)."""
        k, E = indices.shape[1], self.num_experts
        flat = indices.flatten()  # (N*k,)
        if self.split:  # this rank's experts as 0..E-1; other ranks' copies as E: sorted last, in no expert's rows
            flat = flat - self.first
            mine = (flat >= 0) & (flat < E)
            flat = torch.where(mine, flat, E)
        order = flat.argsort(stable=True)  # token copies grouped by expert, each expert's in token order
        token = order.div(k, rounding_mode="floor")
        counts = torch.zeros(E + 1, dtype=torch.long, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat))[:E]  # (E,), without bincount's host sync
        xs = x[token]  # (N*k, D)
        ys = self._grouped(xs, counts) if self.grouped_ok(x) else self._looped(xs, counts)  # (N*k, D)
        ys = (ys * weights.flatten()[order, None]).to(x.dtype)
        if self.split:  # the rows of other ranks' copies were never computed
            ys = ys.masked_fill(~mine[order, None], 0)
        # one index_add in expert order sums each token's experts in the order the reference adds them
        return torch.zeros_like(x).index_add_(0, token, ys)

    def grouped_ok(self, x: torch.Tensor) -> bool:
        """torch._grouped_mm takes float32/bfloat16 on CPU and bfloat16 on CUDA from sm90, rows 16-byte aligned;
        traced by torch.compile, bfloat16 only (its shape function refuses float32)."""
        if not (GROUPED_MM and hasattr(torch, "_grouped_mm")) or self.gate_up_proj.dtype != x.dtype:
            return False
        if x.dtype != torch.bfloat16 and torch.compiler.is_compiling():
            return False
        aligned = (x.shape[-1] * x.element_size()) % 16 == 0 and (self.inner * x.element_size()) % 16 == 0
        if x.is_cuda:
            return aligned and x.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
        return aligned and x.dtype in (torch.float32, torch.bfloat16)

    def _grouped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offsets = counts.cumsum(0).to(torch.int32)  # each expert's end row
        gate, up = torch._grouped_mm(xs, self.gate_up_proj.transpose(1, 2), offs=offsets).chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=offsets)

    def _looped(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        ys = torch.empty_like(xs)
        start = 0
        for e, n in enumerate(counts.tolist()):  # one matmul per expert that received tokens
            if n:
                gate, up = F.linear(xs[start:start + n], self.expert_weight("gate_up_proj", e, xs.dtype)).chunk(2, -1)
                ys[start:start + n] = F.linear(F.silu(gate) * up, self.expert_weight("down_proj", e, xs.dtype))
                start += n
        return ys

    def expert_weight(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        return getattr(self, name)[e]

    def to_fp8(self, block: tuple[int, int]) -> None:
        """Become Fp8Experts (on the meta device, before loading): FP8 stacks plus their stacked scale grids."""
        E, D, inner = self.num_experts, self.down_proj.shape[1], self.inner
        shapes = {"gate_up_proj": ((E, 2 * inner, D), (E, 2 * fp8.cdiv(inner, block[0]), fp8.cdiv(D, block[1]))),
                  "down_proj": ((E, D, inner), (E, fp8.cdiv(D, block[0]), fp8.cdiv(inner, block[1])))}
        for name, (shape, grid) in shapes.items():
            setattr(self, name, nn.Parameter(torch.empty(shape, dtype=fp8.FP8, device="meta"), requires_grad=False))
            self.register_buffer(name + fp8.SCALE, torch.empty(grid, device="meta"))
        self.__class__ = Fp8Experts
        self.block = block


class Fp8Experts(Experts):
    """Experts holding FP8 weights and block scales (glmv.fp8): each expert that received tokens is dequantized
    to the compute dtype as it runs."""

    block: tuple[int, int]

    def expert_weight(self, name: str, e: int, dtype: torch.dtype) -> torch.Tensor:
        parts = (self.inner, self.inner) if name == "gate_up_proj" else ()
        return fp8.dequantize(getattr(self, name)[e], getattr(self, name + fp8.SCALE)[e], self.block, parts, dtype)

    def to_fp8(self, block: tuple[int, int]) -> None:
        pass


class MoeMLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate = TopkRouter(cfg)
        self.experts = Experts(cfg)
        self.shared_experts = GatedMLP(cfg.hidden_size, cfg.moe.moe_intermediate_size * cfg.moe.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # (N, D)
        weights, indices = self.gate(flat)
        return self.experts(flat, indices, weights).view_as(x) + self.shared_experts(x)


class MoeDecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = MoeAttention(cfg, layer)
        dense = layer < cfg.moe.first_k_dense_replace
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size) if dense else MoeMLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rotation, attend, keep: torch.Tensor | None = None):
        y = self.self_attn(self.input_layernorm(x), rotation, attend, keep)
        if keep is not None:
            x = x[:, keep]
        x = x + y
        return x + self.mlp(self.post_attention_layernorm(x))


class MoeTextModel(TextModel):
    def make_layer(self, cfg: TextConfig, i: int) -> nn.Module:
        return MoeDecoderLayer(cfg, i)


# released checkpoints hold one tensor per expert and projection; FP8 ones add a block-scale tensor for each
_PER_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight(_scale_inv)?$")


class Glm4vMoeForConditionalGeneration(Glm4vForConditionalGeneration):
    """GLM-4.5V / GLM-4.6V: the dense family's vision tower and glue, the MoE text decoder."""

    architecture = MOE_ARCHITECTURE
    text_model = MoeTextModel
    has_mtp_layer = True

    def checkpoint_piece(self, name: str, scale_rows: int | None = None) -> Piece | None:
        """Besides the MTP layer skipped, per-expert tensors go to their slice of the stacked ones. scale_rows: rows
        of one expert's FP8 block-scale grid for its gate or up projection, when scales are kept (glmv.fp8)."""
        piece = super().checkpoint_piece(name)
        expert = _PER_EXPERT.match(name)
        if piece is None or not expert:
            return piece
        prefix, e, part, scale = expert.group(1), int(expert.group(2)), expert.group(3), expert.group(4) or ""
        if e >= self.config.text.moe.n_routed_experts:
            return Piece(name)  # not a model tensor: reported as unexpected
        if part == "down":
            return Piece(f"{prefix}.down_proj{scale}", (e,))
        rows = scale_rows if scale else self.config.text.moe.moe_intermediate_size
        start = 0 if part == "gate" else rows
        return Piece(f"{prefix}.gate_up_proj{scale}", (e, slice(start, start + rows)))
