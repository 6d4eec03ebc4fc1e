"""The GLM-V text decoder: GQA attention with q/k/v bias, partial interleaved M-RoPE, sandwich RMSNorms.

Positions are 3-D (t, h, w) per token (`glmv.model.rope_index`); text tokens carry the same value in all three.
The rotary part of each head (the first `rotary_dim` dims) takes its frequency pairs from the t, h and w positions
according to `mrope_section`; the remaining dims pass through unrotated.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from glmv.config import TextConfig
from glmv.vision import RMSNorm


class KVCache:
    """Preallocated keys and values for every layer: (layers, B, H_kv, max_len, Dh). Written in place."""

    def __init__(self, cfg: TextConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        shape = (cfg.num_hidden_layers, batch, cfg.num_key_value_heads, max_len, cfg.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    def row_view(self, row: int, offset: int) -> "KVCache":
        """The cache of one row whose slot 0 is slot `offset` here (e.g. where a left-padded row starts)."""
        view = KVCache.__new__(KVCache)
        view.k, view.v = self.k[:, row:row + 1, :, offset:], self.v[:, row:row + 1, :, offset:]
        return view

    def keep_rows(self, rows: torch.Tensor) -> None:
        """Drop finished rows so they stop costing compute. `rows` (ascending) move forward in place, one row at a
        time, so compaction never holds a second copy of the cache."""
        for new, old in enumerate(rows.tolist()):
            if new != old:
                self.k[:, new] = self.k[:, old]
                self.v[:, new] = self.v[:, old]
        self.k, self.v = self.k[:, : len(rows)], self.v[:, : len(rows)]


class TextRotary(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.sections = list(cfg.mrope_section)
        self.register_buffer("inv_freq", torch.empty(cfg.rotary_dim // 2), persistent=False)
        self.init_buffers()

    def init_buffers(self, device="cpu"):
        """(Re)compute the non-persistent rotary table, e.g. after the model was built on the meta device.
        An explicit device, because ops on meta tensors import ~150 MB of torch's symbolic machinery."""
        dim = self.cfg.rotary_dim
        self.inv_freq = 1.0 / (self.cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float, device=device) / dim))

    def _apply(self, fn, recurse=True):
        # model.to(torch.bfloat16) would round the frequencies (angle errors grow with position): recompute them
        # in float32 on wherever the module now lives.
        super()._apply(fn, recurse)
        self.init_buffers(self.inv_freq.device)
        return self

    def forward(self, position_ids: torch.Tensor, dtype: torch.dtype):
        """position_ids (3, B, T) -> cos, sin (B, T, rotary_dim), computed in float32 as the reference does."""
        freqs = position_ids[..., None].float() * self.inv_freq  # (3, B, T, rd/2)
        # frequency pair i takes its position from axis t, h or w by the section it falls in
        freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(freqs.split(self.sections, dim=-1))], dim=-1)
        freqs = freqs.repeat_interleave(2, dim=-1)  # (B, T, rd): interleaved pairs (2i, 2i+1)
        return freqs.cos().to(dtype), freqs.sin().to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, Dh); rotates the first cos.shape[-1] dims as interleaved pairs."""
    rd = cos.shape[-1]
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, rd)
    x_rot, x_pass = x[..., :rd], x[..., rd:]
    rotated = torch.stack([-x_rot[..., 1::2], x_rot[..., 0::2]], dim=-1).flatten(-2)
    return torch.cat([x_rot * cos + rotated * sin, x_pass], dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, self.num_heads * self.head_dim, bias=cfg.attention_bias)
        self.k_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.v_proj = nn.Linear(cfg.hidden_size, self.num_kv_heads * self.head_dim, bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x, cos, sin, mask, cache: KVCache | None = None, layer: int = 0, start: int = 0):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            cache.k[layer, :, :, start:start + T] = k
            cache.v[layer, :, :, start:start + T] = v
            k, v = cache.k[layer, :, :, :start + T], cache.v[layer, :, :, :start + T]  # (B, Hkv, S, Dh)
        # mask None: plain causal attention over a row with no padding (queries are the last T keys)
        causal = mask is None and T > 1
        if causal and k.shape[2] != T:
            raise ValueError("a causal step without a mask must start at cache slot 0")
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           enable_gqa=self.num_kv_heads != self.num_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, H*Dh) -> (B, T, D)


class MLP(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_up_proj = nn.Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)  # fused [gate; up]
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(cfg)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_self_attn_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_mlp_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, cos, sin, mask, cache=None, layer=0, start=0):
        x = x + self.post_self_attn_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer, start))
        return x + self.post_mlp_layernorm(self.mlp(self.post_attention_layernorm(x)))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = TextRotary(cfg)

    def forward(self, x: torch.Tensor, position_ids: torch.Tensor, mask: torch.Tensor,
                cache: KVCache | None = None, start: int = 0) -> torch.Tensor:
        """x (B, T, D) embeddings, position_ids (3, B, T), mask (B, 1, T, start+T) bool or None for a causal
        pass over unpadded rows -> hidden (B, T, D)."""
        cos, sin = self.rotary(position_ids, x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i, start)
        return self.norm(x)


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
