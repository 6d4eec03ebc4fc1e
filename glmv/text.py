"""The GLM-V text decoder: GQA attention with q/k/v bias, partial interleaved M-RoPE, sandwich RMSNorms.

Positions are 3-D (t, h, w) per token (`glmv.positions.rope_index`); text tokens carry the same value in all three.
The rotary part of each head (the first `rotary_dim` dims) takes its frequency pairs from the t, h and w positions
according to `mrope_section`; the remaining dims pass through unrotated.

The engine interface (in the spirit of gpt-fast): `forward` runs a whole padded batch without a cache; `prefill`
runs the packed real tokens of several rows into their KV-cache slots; `decode_step` runs one token per slot with
shapes that never change during a run. How a layer attends in each case lives in `glmv.attention`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from glmv.attention import Decode, Dense, Prefill
from glmv.config import TextConfig
from glmv.layers import FusedGatedMLP, RMSNorm, RotaryTable


class TextRotary(RotaryTable, nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.sections = list(cfg.mrope_section)
        self.register_rotary_table()

    def rotary_table_dim(self) -> int:
        return self.cfg.rotary_dim

    def rotary_theta(self) -> float:
        return self.cfg.rope_theta

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """position_ids (3, B, T) -> unit rotations (B, T, rotary_dim / 2) complex64, computed in float32 as the
        reference computes its cos/sin."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (3, B, T, rd/2)
        # frequency pair i takes its position from axis t, h or w by the section it falls in
        freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(self.sections, dim=-1))], dim=-1)
        return torch.complex(freqs.cos(), freqs.sin())  # the reference's float32 cos and sin, bit for bit


def apply_rotary(x: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    """x (B, T, H, Dh); rotates the first 2 * rotation.shape[-1] dims as interleaved pairs (x[2i], x[2i+1]), which
    is multiplying the complex numbers x[2i] + i x[2i+1] by the unit rotations (B, T, rd/2)."""
    rd = 2 * rotation.shape[-1]
    work = torch.promote_types(x.dtype, torch.float32)  # half precision rotates in float32, float64 in float64
    pairs = torch.view_as_complex(x[..., :rd].to(work).unflatten(-1, (-1, 2)))  # (B, T, H, rd/2)
    rotated = torch.view_as_real(pairs * rotation[:, :, None].to(pairs.dtype)).flatten(-2).to(x.dtype)
    return torch.cat([rotated, x[..., rd:]], dim=-1)


class Attention(nn.Module):
    fused_linears = {"qkv_proj": ("q_proj", "k_proj", "v_proj")}  # packed as one weight on the CPU fast path
    rotate = staticmethod(apply_rotary)  # how the rotary dims pair up (the MoE decoder pairs halves)

    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.layer = layer  # which cache layer this module reads and writes
        self.num_heads, self.num_kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, rotation, attend: Dense | Prefill | Decode, keep: torch.Tensor | None = None):
        """keep: the token indices whose output is wanted (all when None); every token's keys/values are written."""
        B, T, _ = x.shape
        H, H_kv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        if "qkv_proj" in self._modules:  # one matmul, and q and k rotate together
            qkv = self.qkv_proj(x).view(B, T, H + 2 * H_kv, Dh)
            qk = self.rotate(qkv[:, :, :H + H_kv], rotation)
            q, k, v = qk[:, :, :H], qk[:, :, H:], qkv[:, :, H + H_kv:]
        else:
            q = self.rotate(self.q_proj(x).view(B, T, H, Dh), rotation)
            k = self.rotate(self.k_proj(x).view(B, T, H_kv, Dh), rotation)
            v = self.v_proj(x).view(B, T, H_kv, Dh)
        y = attend(self.layer, q, k, v)  # (B, T, H, Dh)
        if keep is not None:
            y = y[:, keep]  # (B, K, H, Dh)
        return self.o_proj(y.flatten(2))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, layer: int):
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = FusedGatedMLP(cfg.hidden_size, cfg.intermediate_size)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rotation, attend, keep: torch.Tensor | None = None):
        y = self.self_attn(self.input_layernorm(x), rotation, attend, keep)
        if keep is not None:
            x = x[:, keep]
        x = x + self.post_self_attn_layernorm(y)
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(self.make_layer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = TextRotary(cfg)

    def make_layer(self, cfg: TextConfig, i: int) -> nn.Module:
        return DecoderLayer(cfg, i)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """A whole batch, no cache: x (B, T, D), position_ids (3, B, T), mask (B, 1, T, T) bool or None for
        causal rows without padding -> hidden (B, T, D)."""
        return self._run(x, position_ids, Dense(mask))

    def prefill(self, x: torch.Tensor, position_ids: torch.Tensor, batch: Prefill, keep: torch.Tensor) -> torch.Tensor:
        """Packed rows: x (N, D), position_ids (3, N) -> hidden (K, D) of the tokens at indices keep (K,); every
        token's keys/values land in its row's slot. The last layer computes the rest (its output projection and
        MLP, ~90% of its work) for the kept tokens only: a prompt's logits are wanted at its last token alone."""
        return self._run(x[None], position_ids[:, None], batch, keep)[0]

    def decode_step(self, tokens: torch.Tensor, position_ids: torch.Tensor, batch: Decode) -> torch.Tensor:
        """One token per slot: tokens (B,), rope positions (B,) -> hidden (B, D). Static shapes."""
        x = self.embed_tokens(tokens)[:, None]  # (B, 1, D)
        return self._run(x, position_ids[None, :, None].expand(3, -1, 1), batch)[:, 0]

    def _run(self, x, position_ids, attend, keep: torch.Tensor | None = None) -> torch.Tensor:
        rotation = self.rotary(position_ids)
        for layer in self.layers[:-1]:
            x = layer(x, rotation, attend)
        return self.norm(self.layers[-1](x, rotation, attend, keep))


def attention_mask_4d(key_valid: torch.Tensor, query_len: int) -> torch.Tensor:
    """Causal + padding mask for the last `query_len` of S positions: (B, S) bool -> (B, 1, T, S) bool.

    Every query may also see itself, so a padding query never has an all-masked row (SDPA would give NaN there);
    padding outputs are never used.
    """
    B, S = key_valid.shape
    q_pos = torch.arange(S - query_len, S, device=key_valid.device)
    k_pos = torch.arange(S, device=key_valid.device)
    causal = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    mask = causal[None] & key_valid[:, None, :]  # (B, T, S)
    mask |= k_pos[None, None, :] == q_pos[None, :, None]
    return mask[:, None]
