"""Tiny random-weight GLM-V checkpoints in the exact Hugging Face layout, written without transformers.

    python -m glmv.testing make-tiny OUT [--preset gqa|mha|ocr|moe|moe-grouped|bench|...] [--family glm41v|glm46v]
        [--seed N] [--expert-layout released|fused]
    python -m glmv.testing make-fp8 SRC OUT    (an FP8 release of a tiny checkpoint, block-quantized)

No real GLM-V weights can be fetched here, so tests, benchmarks and the demo run on these. The layout is the one of
the released checkpoints: config.json, sharded safetensors with an index, generation_config.json, tokenizer.json +
tokenizer_config.json (a small byte-level BPE vocabulary holding every GLM special token), chat_template.jinja,
preprocessor_config.json and video_preprocessor_config.json. The `ocr` preset is a GLM-OCR checkpoint (model_type
glm_ocr, with its processor family glm46v); `moe` and `moe-grouped` are GLM-4.5V-shaped mixture-of-experts ones.
Both include the multi-token-prediction layer their released files carry.

Weights are drawn so that outputs vary from token to token: linear layers with ~unit-gain init (std 1/sqrt(fan_in))
and norms near 1. transformers' default 0.02-std init gives near-constant logits, which makes parity tests
meaningless.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import replace
from importlib import resources
from pathlib import Path

import torch

from glmv.config import (Glm4vConfig, GlmOcrConfig, GlmOcrTextConfig, GlmOcrVisionConfig, MoeConfig, TextConfig,
                         VisionConfig)
from glmv.weights import build_on_meta

# The GLM special tokens in the order of the real vocabulary (ids 151329.. there; here they follow the small BPE).
SPECIAL_TOKENS = [
    "<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>", "<|assistant|>",
    "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>", "<|begin_of_video|>", "<|end_of_video|>",
    "<|image|>", "<|video|>",
]
# Added but not special: GLM-4.1V keeps <think> etc. when decoding with skip_special_tokens=True.
MARKUP_TOKENS = ["<think>", "</think>", "<answer>", "</answer>", "<|begin_of_box|>", "<|end_of_box|>", "/nothink"]

# GLM-4's pre-tokenizer split (from its tiktoken-style tokenizer), then byte-level BPE.
SPLIT_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_TRAINING_TEXT = """\
Describe this image in detail. What is shown in the picture? Read all the text in the image.
A photo of a cat sitting on a red sofa next to a window. The sky is blue and there are white clouds.
Transcribe the document. Give the bounding box of the dog. Summarise the video. What happens at 3 seconds?
The man in the video walks across the street, then a bus passes by. Numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000.
Let me think step by step about the question. The answer is yes. The answer is no. First, second, third.
Colour, color, shape, size, left, right, top, bottom, center, background, foreground, person, people, car.
"""

PRESETS = {
    # GQA, partial rotary 0.5 (like the real models), 2 text layers, 2 vision blocks
    "gqa": Glm4vConfig(
        text=TextConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, partial_rotary_factor=0.5, mrope_section=(2, 3, 3),
                        max_position_embeddings=8192),
        vision=VisionConfig(hidden_size=64, depth=2, num_heads=2, intermediate_size=192, out_hidden_size=128),
    ),
    # plain multi-head, full rotary, other head dims and depths
    "mha": Glm4vConfig(
        text=TextConfig(hidden_size=96, intermediate_size=160, num_hidden_layers=3, num_attention_heads=6,
                        num_key_value_heads=6, partial_rotary_factor=1.0, mrope_section=(2, 3, 3),
                        max_position_embeddings=8192, rope_theta=500000.0),
        vision=VisionConfig(hidden_size=48, depth=3, num_heads=3, intermediate_size=128, out_hidden_size=96),
    ),
    # GLM-OCR: head_dim (48) other than hidden / heads (32) as in the real file (128 vs 96), full rotary
    "ocr": GlmOcrConfig(
        text=GlmOcrTextConfig(hidden_size=128, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                              num_key_value_heads=2, explicit_head_dim=48, mrope_section=(6, 9, 9),
                              max_position_embeddings=8192),
        vision=GlmOcrVisionConfig(hidden_size=64, depth=2, num_heads=2, intermediate_size=160, out_hidden_size=128),
    ),
    # mid-size model with the real architecture's proportions, for benchmarks
    "bench": Glm4vConfig(
        text=TextConfig(hidden_size=1024, intermediate_size=3424, num_hidden_layers=8, num_attention_heads=8,
                        num_key_value_heads=2, partial_rotary_factor=0.5, mrope_section=(8, 12, 12),
                        max_position_embeddings=65536),
        vision=VisionConfig(hidden_size=512, depth=8, num_heads=4, intermediate_size=3424, out_hidden_size=1024),
    ),
}

# GLM-4.5V's shape in small: a dense first layer, then MoE layers with shared experts; head_dim set apart from
# hidden/heads as in the real config (96 heads x 128 on a 4096 stream)
_MOE_TEXT = TextConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                       num_key_value_heads=2, explicit_head_dim=32, partial_rotary_factor=0.5, mrope_section=(2, 3, 3),
                       max_position_embeddings=8192, moe=MoeConfig(moe_intermediate_size=32, n_routed_experts=8,
                                                                   num_experts_per_tok=2))
_MOE_VISION = VisionConfig(hidden_size=32, depth=1, num_heads=2, intermediate_size=128, out_hidden_size=64)
PRESETS["moe"] = Glm4vConfig(text=_MOE_TEXT, vision=_MOE_VISION, model_type="glm4v_moe")
# groups, top-k 3, no normalisation, a routed scaling factor
PRESETS["moe-grouped"] = Glm4vConfig(
    text=replace(_MOE_TEXT, moe=MoeConfig(moe_intermediate_size=32, n_routed_experts=16, num_experts_per_tok=3,
                                          n_group=4, topk_group=2, norm_topk_prob=False, routed_scaling_factor=2.5,
                                          n_shared_experts=2)),
    vision=_MOE_VISION, model_type="glm4v_moe")

PRESETS["bench-longtail"] = PRESETS["bench-reasoning"] = PRESETS["bench"]
# The long-tail preset scales the lm_head rows of two eos tokens (<|endoftext|>, <|user|>) so that greedy rows stop
# at scattered lengths, like real captions. Up to 256 new tokens, 8 images x 3 prompts: bench_generate's workload
# stops at a median of ~27 new tokens (quartiles ~12/130, 3 of 24 at the limit), bench_pipeline's corpus with the
# caption/ocr/reasoning prompts at ~32 (quartiles ~17/117, 2 of 24 past 250). Same weights for every implementation.
# bench-reasoning scales them less, so that rows run long like reasoning traces: bench_pipeline's corpus and prompts,
# up to 384 new tokens, 16 images x 3 tasks: median 208 (quartiles 36/384), 19 of 48 at the limit.
EOS_SCALES = {"bench-longtail": (1.4, 2.0), "bench-reasoning": (1.1, 1.5)}

FAMILIES = {
    "glm41v": dict(template="glm41v_chat_template.jinja", processor="Glm4vProcessor",
                   image_processor="Glm4vImageProcessor", video_processor="Glm4vVideoProcessor"),
    "glm46v": dict(template="glm46v_chat_template.candidate.jinja", processor="Glm46VProcessor",
                   image_processor="Glm46VImageProcessor", video_processor="Glm46VVideoProcessor"),
}


def build_tokenizer():
    """A small byte-level BPE with GLM's pre-tokenizer and every GLM special token. Returns a tokenizers.Tokenizer."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=600, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([_TRAINING_TEXT] * 4, trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    return tok


def make_tiny_checkpoint(out_dir, preset: str = "gqa", family: str | None = None, seed: int = 0,
                         max_shard_bytes: int | None = None, expert_layout: str = "released",
                         mtp_layer: bool = True) -> Path:
    """Write a complete random-weight checkpoint to out_dir and return its path. family: default glm46v for the
    ocr preset (GLM-OCR's processor is that family's), glm41v otherwise.
    MoE presets: expert_layout "released" stores one tensor per expert and projection (the real checkpoints),
    "fused" transformers' stacked gate_up_proj/down_proj. mtp_layer: GLM-OCR and MoE checkpoints get the
    multi-token-prediction layer their released files carry past the last layer (the model skips it)."""
    from glmv.auto import model_class
    from glmv.weights import save_state_dict

    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    family = family or ("glm46v" if PRESETS[preset].model_type == "glm_ocr" else "glm41v")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose from {sorted(FAMILIES)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tok = build_tokenizer()
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS}
    eos = [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]]
    if family == "glm41v":
        eos.append(ids["</answer>"])
    base = PRESETS[preset]
    vocab_size = 64 * math.ceil(tok.get_vocab_size() / 64) + 64  # padding rows past the tokenizer, as in the real model
    config = replace(
        base,
        text=replace(base.text, vocab_size=vocab_size, pad_token_id=ids["<|endoftext|>"], eos_token_id=tuple(eos)),
        image_token_id=ids["<|image|>"], video_token_id=ids["<|video|>"],
        image_start_token_id=ids["<|begin_of_image|>"], image_end_token_id=ids["<|end_of_image|>"],
        video_start_token_id=ids["<|begin_of_video|>"], video_end_token_id=ids["<|end_of_video|>"],
    )
    config.validate()

    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n")
    cls = model_class(config)
    state = random_state_dict(cls, config, seed)
    if mtp_layer and cls.has_mtp_layer:
        state.update(mtp_layer_state(state, config, seed))
    for token, scale in zip(eos, EOS_SCALES.get(preset, ())):
        state["lm_head.weight"][token] *= scale
    if config.text.moe is not None:
        state = _moe_layout(state, expert_layout)
    if max_shard_bytes is None:  # always shard (2+ files), like the real checkpoints
        max_shard_bytes = sum(t.numel() * t.element_size() for t in state.values()) // 2 + 1
    save_state_dict(state, out, max_shard_bytes)
    generation = {"_from_model_config": True, "do_sample": False, "eos_token_id": eos,
                  "pad_token_id": ids["<|endoftext|>"], "max_new_tokens": 64}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    _write_tokenizer_files(out, tok, family)
    _write_preprocessor_files(out, family)
    return out


def random_state_dict(cls, config: Glm4vConfig, seed: int) -> dict[str, torch.Tensor]:
    """Float32 weights with ~unit-gain linear layers, so activations and logits vary from token to token."""
    shapes = {name: t.shape for name, t in build_on_meta(cls, config).state_dict().items()}
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or "norm1" in name or "norm2" in name:
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)  # norms near 1, slightly varied
        elif name.endswith(".bias"):
            t = 0.1 * torch.randn(shape, generator=g)
        elif "embed" in name and len(shape) == 2:
            t = torch.randn(shape, generator=g)  # token embeddings and the position table: unit variance
        else:
            fan_in = shape[-1] if ".experts." in name else math.prod(shape[1:])  # stacked experts: per expert
            t = torch.randn(shape, generator=g) / math.sqrt(fan_in)
        state[name] = t
    return state


def mtp_layer_state(state: dict, config: Glm4vConfig, seed: int) -> dict[str, torch.Tensor]:
    """The multi-token-prediction layer as GLM-OCR's and GLM-4.5V's released checkpoints store it: one more decoder
    layer after the last, with its input projections and norms. Inference never reads it; it is here so that
    loading skips it."""
    g = torch.Generator().manual_seed(seed + 1)
    last, extra = config.text.num_hidden_layers - 1, f"model.language_model.layers.{config.text.num_hidden_layers}."
    prefix = f"model.language_model.layers.{last}."
    out = {extra + name[len(prefix):]: torch.randn(t.shape, generator=g) for name, t in state.items()
           if name.startswith(prefix)}
    d = config.text.hidden_size
    out.update({extra + "eh_proj.weight": torch.randn(d, 2 * d, generator=g), extra + "enorm.weight": torch.ones(d),
                extra + "hnorm.weight": torch.ones(d), extra + "shared_head.norm.weight": torch.ones(d)})
    return out


def _moe_layout(state: dict, layout: str) -> dict:
    """The MoE tensors as a checkpoint stores them: per expert (released) or stacked (fused)."""
    if layout not in ("released", "fused"):
        raise ValueError(f"expert_layout {layout!r}: choose released or fused")
    out = {}
    for name, t in state.items():
        if layout == "released" and name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            prefix, _, kind = name.rpartition(".")
            for e, w in enumerate(t):
                if kind == "down_proj":
                    out[f"{prefix}.{e}.down_proj.weight"] = w.clone()
                else:
                    for part, half in zip(("gate", "up"), w.chunk(2)):
                        out[f"{prefix}.{e}.{part}_proj.weight"] = half.clone()
        else:
            out[name] = t
    return out


def make_fp8_checkpoint(src, out_dir, block: tuple[int, int] = (128, 128)) -> Path:
    """The FP8 release of checkpoint `src`: every 2-D weight of the text decoder's linear layers (not the router,
    norms, embeddings or lm_head; the vision tower left as it is) block-quantized to e4m3 with its
    `weight_scale_inv`, and `quantization_config` in config.json, as GLM-4.5V-FP8 is laid out."""
    import shutil

    from glmv import fp8
    from glmv.weights import SafetensorsFile, checkpoint_files, save_state_dict

    src, out = Path(src), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state, opened = {}, {}
    for name, file in checkpoint_files(src).items():
        t = (opened.get(file) or opened.setdefault(file, SafetensorsFile(file))).tensor(name).clone()
        linear = name.startswith("model.language_model.layers.") and name.endswith("proj.weight") and t.ndim == 2
        if linear:
            state[name], state[name[:-len("weight")] + "weight_scale_inv"] = fp8.quantize(t, block)
        else:
            state[name] = t
    total = sum(t.numel() * t.element_size() for t in state.values())
    save_state_dict(state, out, total // 2 + 1)
    for file in src.iterdir():
        if file.is_file() and not file.name.startswith("model") and file.name != "config.json":
            shutil.copy(file, out / file.name)
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block),
                                     "modules_to_not_convert": ["model.visual", "lm_head"]}
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out


def _write_tokenizer_files(out: Path, tok, family: str) -> None:
    tok.save(str(out / "tokenizer.json"))
    template = resources.files("glmv.templates").joinpath(FAMILIES[family]["template"]).read_text()
    (out / "chat_template.jinja").write_text(template)
    added = {}
    for t in SPECIAL_TOKENS + MARKUP_TOKENS:
        added[str(tok.token_to_id(t))] = {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": t in SPECIAL_TOKENS}
    config = {
        "added_tokens_decoder": added,
        "additional_special_tokens": SPECIAL_TOKENS[1:],
        "clean_up_tokenization_spaces": False,
        "do_lower_case": False,
        "eos_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "model_max_length": 8192,
        "padding_side": "left",
        "remove_space": False,
        "processor_class": FAMILIES[family]["processor"],
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _write_preprocessor_files(out: Path, family: str) -> None:
    names = FAMILIES[family]
    common = {
        "do_rescale": True,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    }
    # Smaller pixel budgets than the real files (9633792 / 47040000) keep tests fast.
    image = {"size": {"shortest_edge": 12544, "longest_edge": 401408}, **common,
             "image_processor_type": names["image_processor"], "processor_class": names["processor"]}
    video = {"size": {"shortest_edge": 12544, "longest_edge": 470400}, **common,
             "video_processor_type": names["video_processor"], "processor_class": names["processor"]}
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=4) + "\n")
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=4) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m glmv.testing")
    sub = parser.add_subparsers(dest="command", required=True)
    make = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint")
    make.add_argument("out")
    make.add_argument("--preset", default="gqa", choices=sorted(PRESETS))
    make.add_argument("--family", default=None, choices=sorted(FAMILIES), help="default: glm46v for ocr, else glm41v")
    make.add_argument("--seed", type=int, default=0)
    make.add_argument("--expert-layout", default="released", choices=("released", "fused"))
    quant = sub.add_parser("make-fp8", help="write the FP8 release of a tiny checkpoint")
    quant.add_argument("src")
    quant.add_argument("out")
    args = parser.parse_args(argv)
    if args.command == "make-fp8":
        print(make_fp8_checkpoint(args.src, args.out))
        return 0
    path = make_tiny_checkpoint(args.out, preset=args.preset, family=args.family, seed=args.seed,
                                expert_layout=args.expert_layout)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
