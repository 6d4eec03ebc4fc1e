"""`generate`, transformers-like: a left-padded processor batch in, prompt + new tokens out.

It is a short loop over the model's engine interface (`glmv.engine`): rows wait in a queue, `max_batch_size` decode
slots take them in turn (default: one slot per row, a plain static batch), each distinct image or video goes through
the vision tower once, rows that share their media and leading tokens (the tasks of one item) prefill that prefix
once, and tokens are chosen on the device. Each row's result depends only on its own prompt and seed, not on its
batch, its slot or the mode (exactly in float32; in bfloat16 different batch shapes round differently, so a near-tie
between two tokens can flip).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glmv import prompts as prompts_mod
from glmv.engine import Engine, EngineConfig
from glmv.prompts import PromptBatch
from glmv.sampling import SamplingParams
from glmv.thinking import NO_BUDGET, ThinkingMarkers, markers_for_checkpoint

# Used where neither the call nor generation_config.json says otherwise: transformers' GenerationConfig defaults,
# except max_new_tokens (transformers stops at a total length of 20, too short for a caption).
DEFAULTS = dict(max_new_tokens=256, do_sample=False, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0)


@dataclass
class RowResult:
    num_prompt_tokens: int
    num_generated_tokens: int
    finish_reason: str  # "eos", "length", or "thinking_budget" (reasoning closed at the budget, then eos)
    vision_s: float  # vision tower time of the admission round that started this row (shared by its rows)
    prefill_s: float  # prefill time of that round
    decode_s: float  # from the end of that prefill until this row was seen finished


@dataclass
class GenerateOutput:
    sequences: torch.Tensor  # (B, T + new): prompt, new tokens, pad after a row finished
    rows: list[RowResult] = field(default_factory=list)


def _setting(name, value, generation_config):
    if value is not None:
        return value
    configured = generation_config.get(name)
    return DEFAULTS[name] if configured is None else configured


def _per_row(name: str, value, rows: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * rows
    if len(values) != rows:
        raise ValueError(f"{name}: got {len(values)} values for a batch of {rows} rows")
    return values


@torch.inference_mode()
def generate(model, input_ids: torch.Tensor, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
             image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, *, max_new_tokens=None,
             do_sample=None, temperature=None, top_k=None, top_p=None, repetition_penalty=None, eos_token_id=None,
             pad_token_id=None, seed: int | list[int] | None = None, max_batch_size: int | None = None,
             share_prefix: bool = True, max_thinking_tokens: int | list[int | None] | None = None,
             thinking_markers: ThinkingMarkers | None = None, return_dict_in_generate: bool = False,
             compile_decode: bool = False):
    """Generate for a left-padded batch; returns prompt + new tokens (B, T + new), like transformers' generate.

    Settings default to the checkpoint's generation_config.json, then to transformers' defaults.
    - max_new_tokens: an int, or one per row.
    - seed: one per row (e.g. `glmv.sampling.row_seed(seed, item_id, task)`), an int for every row (rows with the
      same prompt then sample the same text), or None (default): per-row seeds drawn from torch's global generator,
      so `torch.manual_seed` reproduces a run, as in transformers. A row samples the same text with the same seed in
      any batch and any mode.
    - max_batch_size: decode slots; rows beyond it wait, and a finished row's slot takes the next one (None: all
      rows at once).
    - share_prefix: rows with the same media behind the same leading tokens encode the media once and prefill the
      common prefix once.
    - max_thinking_tokens: an int or one per row (None: no budget); a row that has thought that many tokens inside
      <think> is made to close it and answer (finish_reason "thinking_budget"). thinking_markers default to the
      checkpoint's tokenizer and family.
    - compile_decode: torch.compile the decode step, captured in a CUDA graph on CUDA (CPU: needs fast_cpu=False).
    With return_dict_in_generate=True, returns a GenerateOutput whose `.rows` carry token counts, finish reasons
    and timings.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be a (batch, length) tensor, got shape {tuple(input_ids.shape)}")
    B, T = input_ids.shape
    if max_batch_size is not None and max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    batch = prompt_batch(model, input_ids, attention_mask, mm_token_type_ids, pixel_values, image_grid_thw,
                         pixel_values_videos, video_grid_thw, share_prefix=share_prefix)
    max_new = [int(n) for n in _per_row("max_new_tokens", _setting("max_new_tokens", max_new_tokens,
                                                                   model.generation_config), B)]
    budgets = None
    if max_thinking_tokens is not None:
        budgets = [NO_BUDGET if b is None else int(b) for b in _per_row("max_thinking_tokens", max_thinking_tokens, B)]
        if min(budgets) < 0:
            raise ValueError(f"max_thinking_tokens must be >= 0, got {min(budgets)}")
        thinking_markers = thinking_markers or checkpoint_markers(model)
    config = engine_config(model, min(max_batch_size or B, B), do_sample=do_sample, temperature=temperature,
                           top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, eos_token_id=eos_token_id,
                           pad_token_id=pad_token_id, thinking_markers=thinking_markers if budgets else None,
                           compile_decode=compile_decode)
    if seed is None:  # a fresh random seed per row
        seed = torch.randint(0, 2**62, (B,)).tolist()
    engine = Engine(model, config, max_len=max(p.length + n for p, n in zip(batch.prompts, max_new)),
                    max_new=max(max_new))
    ticket = engine.add(batch, max_new, _per_row("seed", seed, B), budgets)
    engine.run()
    outputs = ticket.wait()

    steps = max(len(o.tokens) for o in outputs)
    sequences = torch.full((B, T + steps), config.pad, dtype=torch.long)
    sequences[:, :T] = input_ids.cpu()
    for row, o in enumerate(outputs):
        sequences[row, T:T + len(o.tokens)] = torch.tensor(o.tokens, dtype=torch.long)
    if not return_dict_in_generate:
        return sequences
    rows = [RowResult(p.length, len(o.tokens), o.reason, o.vision_s, o.prefill_s, o.decode_s)
            for p, o in zip(batch.prompts, outputs)]
    return GenerateOutput(sequences=sequences, rows=rows)


def prompt_batch(model, input_ids: torch.Tensor, attention_mask=None, mm_token_type_ids=None, pixel_values=None,
                 image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None, *,
                 share_prefix: bool = True) -> PromptBatch:
    """What an engine schedules, from a left-padded processor batch (the same arguments as `generate`)."""
    input_ids = input_ids.to(model.device)
    valid = _left_padded_mask(input_ids, attention_mask)
    types = model.token_types(input_ids) if mm_token_type_ids is None else mm_token_type_ids.to(model.device)
    return prompts_mod.build(input_ids, valid, types, pixel_values, image_grid_thw, pixel_values_videos,
                             video_grid_thw, model.config.vision.spatial_merge_size, share_prefix)


def _left_padded_mask(input_ids: torch.Tensor, attention_mask) -> torch.Tensor:
    T = input_ids.shape[1]
    valid = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(input_ids.device)).bool()
    n_real = valid.sum(-1)
    if (n_real == 0).any():
        raise ValueError(f"rows {(n_real == 0).nonzero().flatten().tolist()} have no tokens (attention_mask all 0)")
    if not torch.equal(valid, torch.arange(T, device=valid.device)[None, :] >= (T - n_real)[:, None]):
        raise ValueError("generate needs left-padded rows (attention_mask 0...0 1...1); pad on the left")
    return valid


def engine_config(model, slots: int, *, do_sample=None, temperature=None, top_k=None, top_p=None,
                  repetition_penalty=None, eos_token_id=None, pad_token_id=None,
                  thinking_markers: ThinkingMarkers | None = None, compile_decode: bool = False) -> EngineConfig:
    """An engine's settings: the call's, else the checkpoint's generation_config.json, else transformers' defaults."""
    gen_cfg = model.generation_config
    params = SamplingParams(
        do_sample=bool(_setting("do_sample", do_sample, gen_cfg)),
        temperature=float(_setting("temperature", temperature, gen_cfg)),
        top_k=int(_setting("top_k", top_k, gen_cfg)),
        top_p=float(_setting("top_p", top_p, gen_cfg)),
        repetition_penalty=float(_setting("repetition_penalty", repetition_penalty, gen_cfg)),
    )
    eos = eos_token_id if eos_token_id is not None else gen_cfg.get("eos_token_id", model.config.text.eos_token_id)
    if isinstance(eos, torch.Tensor):  # transformers accepts a tensor of ids too
        eos = eos.flatten().tolist()
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    pad = pad_token_id if pad_token_id is not None else gen_cfg.get("pad_token_id", model.config.text.pad_token_id)
    pad = int(pad if pad is not None else (eos[0] if eos else 0))
    config = EngineConfig(params=params, eos=eos, pad=pad, slots=slots, markers=thinking_markers,
                          compile_decode=compile_decode)
    config.validate()
    return config


def checkpoint_markers(model) -> ThinkingMarkers:
    """The thinking markers of the model's own checkpoint, read once (tokenizer + processor family)."""
    if "_thinking_markers" not in model.__dict__:
        if not model.name_or_path:
            raise ValueError("max_thinking_tokens: pass thinking_markers= (the model was not loaded from a folder)")
        model.__dict__["_thinking_markers"] = markers_for_checkpoint(model.name_or_path)
    return model.__dict__["_thinking_markers"]
