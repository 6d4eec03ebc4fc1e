"""The GLM-V vision tower: patches of images and video frames -> features in the text model's width.

Input is the processor's packed patch rows (N, C*T*P*P) for all images / frames of a batch together, and
grid_thw (num_items, 3) in patches. Every (t, h, w) grid is attended as t separate frames of h*w patches, with
bidirectional attention confined to each frame: frames never see each other, images never see each other.
Patch rows are ordered block-major over spatial_merge_size^2 windows, so the final 2x2 merge is a reshape.

Numerics follow the reference implementation on purpose: RMSNorm statistics, rotary embedding and the learned
position-table resampling run in float32 whatever the model dtype (this is what the checkpoints were made with).
RMSNorm, the gated MLP and the rotary table are shared with the text decoder (`glmv.layers`).

GLM-OCR's tower is this one with the switches of its config (`VisionConfig.ocr`): RMSNorm on each head's queries and
keys, biases on the attention output and the MLP, no post-conv norm or learned position table, other MLP widths.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmv.config import VisionConfig
from glmv.errors import InputError
from glmv.layers import GatedMLP, RMSNorm, RotaryTable


class PatchEmbed(nn.Module):
    """Conv3d with stride == kernel over (C, T, P, P) patches; run as one matmul over the flattened patch."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.proj.weight.flatten(1)  # (D, C*T*P*P), same element order as the patch rows
        return F.linear(patches.to(weight.dtype), weight, self.proj.bias)  # (N, D)


class PatchMerger(GatedMLP):
    """proj -> LayerNorm -> GELU -> gated MLP (the checkpoint keeps the MLP's weights at the merger's top level)."""

    def __init__(self, dim: int, context_dim: int):
        super().__init__(dim, context_dim)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.post_projection_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(F.gelu(self.post_projection_norm(self.proj(x))))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_heads
        self.qkv = nn.Linear(cfg.hidden_size, 3 * cfg.hidden_size, bias=cfg.attention_bias)
        self.proj = nn.Linear(cfg.hidden_size, cfg.hidden_size, bias=cfg.block_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, frame_runs) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, -1)  # (N, 3, H, Dh)
        qk = qkv[:, :2]
        if "q_norm" in self._modules:
            qk = torch.stack([self.q_norm(qk[:, 0]), self.k_norm(qk[:, 1])], dim=1)  # (N, 2, H, Dh)
        q, k = apply_rotary_2d(qk, cos, sin).unbind(1)  # q and k rotate together: each (N, H, Dh)
        v = qkv[:, 2]
        # A run of consecutive frames of equal length is one batched SDPA call over slices (no gather); attention
        # never crosses frames.
        out = []
        for start, frames, length in frame_runs:
            rows = slice(start, start + frames * length)
            qr, kr, vr = (t[rows].view(frames, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            y = F.scaled_dot_product_attention(qr, kr, vr)  # (F, H, L, Dh)
            out.append(y.transpose(1, 2).reshape(frames * length, -1))
        return self.proj(torch.cat(out) if len(out) > 1 else out[0])


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.norm1 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.norm2 = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = VisionAttention(cfg)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.mlp_size, bias=cfg.block_bias)

    def forward(self, x, cos, sin, frame_runs):
        x = x + self.attn(self.norm1(x), cos, sin, frame_runs)
        return x + self.mlp(self.norm2(x))


class VisionEmbeddings(nn.Module):
    """Learned (S x S) position table, bicubically resampled to each frame's (h, w) patch grid."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.image_size // cfg.patch_size
        self.position_embedding = nn.Embedding(self.side * self.side, cfg.hidden_size)

    def forward(self, x: torch.Tensor, hw_pos: torch.Tensor, frame_hw: torch.Tensor) -> torch.Tensor:
        # hw_pos: (N, 2) patch row/col; frame_hw: (N, 2) the grid height/width of the frame each patch belongs to
        table = self.position_embedding.weight
        table_2d = table.view(self.side, self.side, -1).permute(2, 0, 1)[None].float()  # (1, D, S, S)
        grid = ((hw_pos.float() + 0.5) / frame_hw.float()) * 2 - 1  # (N, 2) as (y, x) in [-1, 1]
        grid = grid.flip(-1)[None, :, None, :]  # (1, N, 1, 2) as (x, y), grid_sample's order
        pos = F.grid_sample(table_2d, grid, mode="bicubic", align_corners=False, padding_mode="border")
        return x + pos[0, :, :, 0].T.to(table.dtype)  # (N, D)


class VisionTower(RotaryTable, nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        if cfg.position_table:
            self.embeddings = VisionEmbeddings(cfg)
        self.patch_embed = PatchEmbed(cfg)
        if cfg.position_table:
            self.post_conv_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.post_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        m = cfg.spatial_merge_size
        self.downsample = nn.Conv2d(cfg.hidden_size, cfg.out_hidden_size, kernel_size=m, stride=m)
        self.merger = PatchMerger(cfg.out_hidden_size, cfg.merger_size)
        self.register_rotary_table()

    def rotary_table_dim(self) -> int:
        return self.cfg.head_dim // 2  # h and w each rotate with head_dim/4 frequencies (see rotary_2d)

    def rotary_theta(self) -> float:
        return self.cfg.rope_theta

    def check_input(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> None:
        """Refuse patch rows of another width than the tower's, or other than the grids' count (before any work:
        over several ranks a rank with no frames to encode must refuse them too, not wait for the others)."""
        cfg = self.cfg
        if patches.shape[-1] != cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2:
            raise InputError(
                f"patch rows of {patches.shape[-1]} values, but this vision tower takes {cfg.in_channels} x "
                f"{cfg.temporal_patch_size} x {cfg.patch_size}^2 (config.json's vision_config in_channels x "
                f"temporal_patch_size x patch_size^2): the processor's patch_size or temporal_patch_size is not the "
                f"model's")
        expected = int(grid_thw.prod(-1).sum())
        if patches.shape[0] != expected:
            raise InputError(f"{patches.shape[0]} patch rows, but the grid_thw of the images and videos make "
                             f"{expected}: pixel values and grids come from different inputs")

    def forward(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """patches (N, C*T*P*P), grid_thw (num_items, 3) -> merged features (N / merge^2, out_hidden_size)."""
        self.check_input(patches, grid_thw)
        device = patches.device
        hw_pos, frame_hw, frame_runs = _frame_layout(grid_thw, self.cfg.spatial_merge_size, device)
        cos, sin = self.rotary_2d(hw_pos)

        x = self.patch_embed(patches)  # (N, D)
        if self.cfg.position_table:
            x = self.embeddings(self.post_conv_layernorm(x), hw_pos, frame_hw)
        for block in self.blocks:
            x = block(x, cos, sin, frame_runs)
        x = self.post_layernorm(x)

        m = self.cfg.spatial_merge_size
        x = x.view(-1, m, m, x.shape[-1]).permute(0, 3, 1, 2).flatten(1)  # (N/m^2, D*m*m): rows are block-major
        # the stride-m convolution over each m x m window as one matmul (several times faster than conv2d on CPU)
        x = F.linear(x, self.downsample.weight.flatten(1), self.downsample.bias)  # (N/m^2, out_hidden)
        return self.merger(x)

    def rotary_2d(self, hw_pos: torch.Tensor):
        freqs = hw_pos[..., None].float() * self.inv_freq  # (N, 2, Dh/4)
        angles = freqs.flatten(1)  # (N, Dh/2): h frequencies then w frequencies
        angles = torch.cat([angles, angles], dim=-1)  # (N, Dh) for rotate-half pairs (i, i + Dh/2)
        return angles.cos(), angles.sin()


def apply_rotary_2d(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (N, ..., Dh), cos/sin (N, Dh): NeoX-style rotate-half over the whole head dim, computed in float32 like the
    reference."""
    dtype = x.dtype
    x = x.float()
    shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (x.shape[-1],)
    cos, sin = cos.view(shape), sin.view(shape)  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x * cos + rotated * sin).to(dtype)


def frames_grid(grid_thw: torch.Tensor, frames: range) -> torch.Tensor:
    """The grid_thw (items, 3) rows of frames [start, stop) of the items' frames counted in order: each item with
    frames in the range as (its frames there, h, w)."""
    ends = grid_thw[:, 0].cumsum(0)
    t = ends.clamp(max=frames.stop) - (ends - grid_thw[:, 0]).clamp(min=frames.start)  # (items,), <= 0: none
    keep = t > 0
    return torch.cat([t[keep, None], grid_thw[keep, 1:]], dim=1)


def _frame_layout(grid_thw: torch.Tensor, merge: int, device):
    """Per patch: its (row, col) in its frame and that frame's (h, w); plus the frames as runs.

    Returns hw_pos (N, 2), frame_hw (N, 2), and frame_runs: a list of (first row, num_frames, length), one per run of
    consecutive frames of equal length (a video's frames, same-size images in a row), covering the N rows in order.
    """
    hw_pos, frame_hw, frame_runs = [], [], []
    offset = 0
    for t, h, w in grid_thw.tolist():
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(h // merge, merge, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, w // merge, merge)
        # block-major: (h/m, w/m, m, m) ordering of the (row, col) pairs
        pos = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)  # (h*w, 2)
        hw_pos.append(pos.repeat(t, 1))
        frame_hw.append(torch.tensor([h, w]).expand(t * h * w, 2))
        if frame_runs and frame_runs[-1][2] == h * w:
            start, frames, length = frame_runs[-1]
            frame_runs[-1] = (start, frames + t, length)
        else:
            frame_runs.append((offset, t, h * w))
        offset += t * h * w
    return torch.cat(hw_pos).to(device), torch.cat(frame_hw).to(device), frame_runs
