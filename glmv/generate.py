"""Static-batch generation: one left-padded batch, vision once, a prefill per row, then a plain decode loop.

- The vision tower runs once over every image and frame of the batch, packed together.
- Prefill runs row by row over each row's real tokens, so padding costs nothing.
- Keys/values live in a preallocated cache (`glmv.text.KVCache`); each step writes one slot in place.
- 3-D rope: each row's offset (`delta`) is computed once from the prompt; a token generated after n real tokens
  sits at n + delta on all three axes.
- Rows stop independently at their eos and leave the batch right away (cache rows included), so short captions
  stop costing compute while long ones finish.
- Sampling draws one uniform number per row and step from that row's own generator (seeded by `seed`), so a row
  gives the same text with the same seed whatever else is in its batch. (Prefill is computed per row; decode steps
  are batched, so results are batch-independent up to floating-point reduction order: exact in float32 here, while
  in bfloat16 a near-tie between two tokens can flip.)
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from glmv.model import Glm4vForConditionalGeneration, rope_index
from glmv.text import KVCache

# Used where neither the call nor generation_config.json says otherwise: transformers' GenerationConfig defaults,
# except max_new_tokens (transformers stops at a total length of 20, too short for a caption).
DEFAULTS = dict(max_new_tokens=256, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)


@dataclass
class RowResult:
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: str  # "eos" or "length"
    vision_s: float  # the batch's vision tower time (shared by its rows)
    prefill_s: float  # the batch's prefill time (shared by its rows)
    decode_s: float  # from the end of prefill until this row finished


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, T + new): prompt, new tokens, pad after a row finished
    rows: list[RowResult] = field(default_factory=list)


@dataclass
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


def _setting(name, value, generation_config):
    if value is not None:
        return value
    configured = generation_config.get(name)
    return DEFAULTS[name] if configured is None else configured


@torch.inference_mode()
def generate(model: Glm4vForConditionalGeneration, input_ids: torch.Tensor, attention_mask=None,
             mm_token_type_ids=None, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
             video_grid_thw=None, *, max_new_tokens=None, do_sample=None, temperature=None, top_k=None, top_p=None,
             repetition_penalty=None, eos_token_id=None, pad_token_id=None, seed: int | list[int] | None = 0,
             return_dict_in_generate: bool = False, compile_decode: bool = False):
    """Generate for a left-padded batch; returns prompt + new tokens (B, T + new), like transformers' generate.

    Settings default to the checkpoint's generation_config.json, then to transformers' defaults. With
    return_dict_in_generate=True, returns a GenerateOutput whose `.rows` carry token counts, finish reasons and
    timings. compile_decode=True runs the decode step through torch.compile (dynamic shapes, compiled once per
    model); off by default until it is measured on a GPU.
    """
    gen_cfg = model.generation_config
    max_new_tokens = int(_setting("max_new_tokens", max_new_tokens, gen_cfg))
    params = SamplingParams(
        do_sample=bool(_setting("do_sample", do_sample, gen_cfg)),
        temperature=float(_setting("temperature", temperature, gen_cfg)),
        top_k=int(_setting("top_k", top_k, gen_cfg)),
        top_p=float(_setting("top_p", top_p, gen_cfg)),
        repetition_penalty=float(_setting("repetition_penalty", repetition_penalty, gen_cfg)),
    )
    params.validate()
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    eos = eos_token_id if eos_token_id is not None else gen_cfg.get("eos_token_id", model.config.text.eos_token_id)
    eos = torch.tensor([eos] if isinstance(eos, int) else list(eos or []), dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else gen_cfg.get("pad_token_id", model.config.text.pad_token_id)
    pad = int(pad if pad is not None else eos[0])

    device = model.device
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    input_ids = input_ids.to(device)
    B, T = input_ids.shape
    valid = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device)).bool()
    n_real = valid.sum(-1)
    if (n_real == 0).any():
        raise ValueError(f"rows {(n_real == 0).nonzero().flatten().tolist()} have no tokens (attention_mask all 0)")
    if not torch.equal(valid, torch.arange(T, device=device)[None, :] >= (T - n_real)[:, None]):
        raise ValueError("generate needs left-padded rows (attention_mask 0...0 1...1); pad on the left")
    types = model.token_types(input_ids) if mm_token_type_ids is None else mm_token_type_ids.to(device)
    if seed is None:  # a fresh random seed per row
        seed = torch.randint(0, 2**62, (B,)).tolist()
    seeds = [seed] * B if isinstance(seed, int) else list(seed)
    if len(seeds) != B:
        raise ValueError(f"seed: got {len(seeds)} seeds for a batch of {B} rows")
    generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
    lm = model.model.language_model
    decode_step = _compiled(lm) if compile_decode else lm

    t0 = time.perf_counter()
    image_features, video_features = model.encode_vision(pixel_values, image_grid_thw,
                                                         pixel_values_videos, video_grid_thw)
    _sync(device)
    t1 = time.perf_counter()
    x = model.embed(input_ids, types, image_features, video_features)
    position_ids, deltas = rope_index(types, valid, image_grid_thw, video_grid_thw,
                                      model.config.vision.spatial_merge_size)
    cache = KVCache(lm.cfg, B, T + max_new_tokens, model.dtype, device)
    position_ids = position_ids.to(device)
    # Prefill row by row over each row's real tokens only: no compute spent on padding, and a row's prefill does
    # not depend on what else is in the batch. Its keys land in the row's left-padded slots T-n .. T-1.
    last_hidden = []
    for row, n in enumerate(n_real.tolist()):
        hidden = lm(x[row:row + 1, T - n:], position_ids[:, row:row + 1, T - n:], None,
                    cache.row_view(row, T - n), start=0)
        last_hidden.append(hidden[:, -1])
    logits = model.lm_head(torch.cat(last_hidden))  # (B, V)
    _sync(device)
    t2 = time.perf_counter()
    vision_s, prefill_s = t1 - t0, t2 - t1

    out = torch.full((B, T + max_new_tokens), pad, dtype=torch.long)
    out[:, :T] = input_ids.cpu()
    active = torch.arange(B)  # original row index of each row still in the batch
    key_valid = torch.zeros(B, T + max_new_tokens, dtype=torch.bool, device=device)
    key_valid[:, :T] = valid
    next_pos = (n_real.cpu() + deltas).to(device)  # (b,) rope position of the next token
    seen = _seen_tokens(input_ids, valid, logits.shape[-1]) if params.repetition_penalty != 1.0 else None
    n_generated = torch.zeros(B, dtype=torch.long)
    finish = ["length"] * B
    decode_s = [0.0] * B
    steps = 0
    for step in range(max_new_tokens):
        tokens = _choose(logits, params, seen, [generators[i] for i in active.tolist()])  # (b,) on CPU
        out[active, T + step] = tokens
        n_generated[active] += 1
        steps = step + 1
        if seen is not None:
            seen[torch.arange(len(active), device=device), tokens.to(device)] = True
        done = torch.isin(tokens, eos)
        if done.any() or step == max_new_tokens - 1:
            now = time.perf_counter() - t2
            for i in active[done].tolist():
                finish[i] = "eos"
            for i in (active if step == max_new_tokens - 1 else active[done]).tolist():
                decode_s[i] = now
        if step == max_new_tokens - 1 or done.all():
            break
        if done.any():  # finished rows leave the batch
            keep = (~done).nonzero().flatten()
            keep_dev = keep.to(device)
            active, tokens = active[keep], tokens[keep]
            cache.keep_rows(keep_dev)
            key_valid, next_pos = key_valid[keep_dev], next_pos[keep_dev]
            seen = seen[keep_dev] if seen is not None else None
        # one decode step for the rows still running
        slot = T + step
        key_valid[:, slot] = True
        x = lm.embed_tokens(tokens.to(device)[:, None])  # (b, 1, D)
        positions = next_pos[None, :, None].expand(3, -1, 1)  # (3, b, 1)
        mask = key_valid[:, None, None, : slot + 1]  # (b, 1, 1, S)
        hidden = decode_step(x, positions, mask, cache, start=slot)
        logits = model.lm_head(hidden[:, -1])
        next_pos = next_pos + 1

    sequences = out[:, : T + steps]
    if not return_dict_in_generate:
        return sequences
    n_prompt = n_real.tolist()
    rows = [RowResult(n_prompt[i], int(n_generated[i]), finish[i], vision_s, prefill_s, decode_s[i]) for i in range(B)]
    return GenerateOutput(sequences=sequences, rows=rows)


def _seen_tokens(input_ids, valid, vocab_size):
    """(B, V) bool: which token ids each row's real prompt tokens hold (padding is not a seen token)."""
    seen = torch.zeros(input_ids.shape[0], vocab_size, dtype=torch.bool, device=input_ids.device)
    rows, cols = valid.nonzero(as_tuple=True)
    seen[rows, input_ids[rows, cols]] = True
    return seen


def _choose(logits: torch.Tensor, p: SamplingParams, seen, generators) -> torch.Tensor:
    """Next token per row from (b, V) logits: repetition penalty, then greedy or temperature/top-k/top-p sampling."""
    logits = logits.float()
    bad = ~torch.isfinite(logits).all(-1)
    if bad.any():  # e.g. an overflow in half precision: fail loudly rather than emit an arbitrary token
        raise FloatingPointError(f"non-finite logits in batch rows {bad.nonzero().flatten().tolist()}")
    if seen is not None:
        penalised = torch.where(logits < 0, logits * p.repetition_penalty, logits / p.repetition_penalty)
        logits = torch.where(seen, penalised, logits)
    if not p.do_sample:
        return logits.argmax(-1).cpu()
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
    cdf = logits.softmax(-1).cumsum(-1)  # (b, V), on the model's device
    # one uniform per row from the row's own CPU generator, so seeding does not depend on the device
    u = torch.stack([torch.rand(1, generator=g, dtype=torch.float64) for g in generators]).float().to(cdf.device)
    u = u * cdf[:, -1:]  # the cdf's last entry is 1 up to rounding
    return torch.searchsorted(cdf, u).clamp_max(cdf.shape[-1] - 1).flatten().cpu()


def _compiled(lm):
    """torch.compile of the text model, made once per model (batch size and cache length are dynamic)."""
    from glmv.cpu_kernels import is_packed

    if is_packed(lm):
        raise ValueError("compile_decode cannot trace oneDNN-packed CPU weights; load with fast_cpu=False")
    if "_compiled" not in lm.__dict__:  # kept out of the module tree, so it is never a submodule or in state_dict
        lm.__dict__["_compiled"] = torch.compile(lm, dynamic=True)
    return lm.__dict__["_compiled"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
