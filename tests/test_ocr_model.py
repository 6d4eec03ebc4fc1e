"""GLM-OCR (model_type glm_ocr) against transformers' GlmOcrForConditionalGeneration and its processor.

On the tiny `ocr` checkpoint (tests/conftest.py: head_dim 48 != hidden / heads, an MTP layer in the file), with the
tolerances of tests/test_model_parity.py: logits max abs difference <= 1e-6 in float64 and <= 5e-4 in float32 over
every non-padding position of image, video and text-only rows; greedy tokens identical (static batch, refill,
prefix groups); the processor's ids, masks and grids exactly equal and pixel values within 1e-5 (the 4.6V
family's processor, as GLM-OCR's processor_config.json names it).
"""

import pytest
import torch
from test_generate import greedy_rows_match_transformers, new_tokens_until_eos
from test_model_parity import TOLERANCE, load_both, mixed_batch, random_image, reference_logits, write_video

import glmv
from glmv.weights import CheckpointError, build_on_meta

transformers = pytest.importorskip("transformers")

# zai-org/GLM-OCR's config.json as a public transcript of the file shows it (../shared/reference has none); the
# token ids it cut off are transformers' GlmOcrConfig defaults.
REAL_GLM_OCR = {
    "architectures": ["GlmOcrForConditionalGeneration"], "model_type": "glm_ocr",
    "text_config": {"model_type": "glm_ocr_text", "pad_token_id": 59246, "vocab_size": 59392,
                    "eos_token_id": [59246, 59253], "attention_bias": False, "attention_dropout": 0.0, "head_dim": 128,
                    "hidden_act": "silu", "hidden_size": 1536, "intermediate_size": 4608,
                    "max_position_embeddings": 131072, "num_attention_heads": 16, "num_hidden_layers": 16,
                    "num_nextn_predict_layers": 1, "num_key_value_heads": 8, "rms_norm_eps": 1e-05,
                    "dtype": "bfloat16", "tie_word_embeddings": False, "use_cache": True,
                    "rope_parameters": {"rope_type": "default", "mrope_section": [16, 24, 24],
                                        "partial_rotary_factor": 1.0, "rope_theta": 10000}},
    "vision_config": {"model_type": "glm_ocr_vision", "hidden_size": 1024, "depth": 24, "num_heads": 16,
                      "attention_bias": True, "intermediate_size": 4096, "hidden_act": "silu", "image_size": 336,
                      "patch_size": 14, "out_hidden_size": 1536, "rms_norm_eps": 1e-05, "spatial_merge_size": 2,
                      "temporal_patch_size": 2},
    "image_start_token_id": 59256, "image_end_token_id": 59257, "video_start_token_id": 59258,
}
GROUP_TOKENS = 10   # the prefix-group test runs transformers' generate once per row
OCR_PROMPTS = ["Text Recognition:", "Table Recognition:", "Formula Recognition:"]


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("media") / "clip.mp4", frames=24, fps=8)


def test_real_config_gives_transformers_names_shapes_and_the_files_parameter_count():
    config = glmv.Glm4vConfig.from_dict(REAL_GLM_OCR)
    assert isinstance(config, glmv.GlmOcrConfig) and config.text.head_dim == 128 and not config.text.attention_bias
    ours = build_on_meta(glmv.GlmOcrForConditionalGeneration, config).state_dict()
    with torch.device("meta"):
        ref = transformers.GlmOcrForConditionalGeneration(transformers.GlmOcrConfig(**REAL_GLM_OCR)).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert ours["model.language_model.layers.0.self_attn.q_proj.weight"].shape == (16 * 128, 1536)
    assert "model.visual.blocks.0.attn.q_norm.weight" in ours and "model.visual.embeddings.position_embedding.weight" \
        not in ours and "model.language_model.layers.0.self_attn.q_proj.bias" not in ours
    # The released model.safetensors holds 526 tensors, 1,325,258,240 parameters: these 510 plus the MTP layer's 16
    # (a decoder layer, eh_proj, enorm, hnorm, shared_head.norm/head and its own embed_tokens).
    d, vocab = 1536, 59392
    layer = sum(v.numel() for k, v in ours.items() if k.startswith("model.language_model.layers.0."))
    mtp = layer + d * 2 * d + 3 * d + 2 * vocab * d
    assert len(ours) == 510 and sum(v.numel() for v in ours.values()) + mtp == 1_325_258_240


def test_the_class_follows_model_type_and_the_mtp_layer_is_skipped(tiny_ocr, tiny_gqa):
    model = glmv.AutoModelForImageTextToText.from_pretrained(tiny_ocr)
    assert type(model) is glmv.GlmOcrForConditionalGeneration and model.config.model_type == "glm_ocr"
    assert not any(".layers.2." in k for k in model.state_dict()), "the MTP layer (layer 2 here) is not loaded"
    assert type(glmv.AutoModelForImageTextToText.from_pretrained(tiny_gqa)) is glmv.Glm4vForConditionalGeneration
    with pytest.raises(CheckpointError, match="a glm_ocr checkpoint; load it with GlmOcrForConditionalGeneration"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_ocr)
    with pytest.raises(CheckpointError, match="a glm4v checkpoint; load it with Glm4vForConditionalGeneration"):
        glmv.GlmOcrForConditionalGeneration.from_pretrained(tiny_gqa)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_logits_match_reference_on_image_video_and_text_rows(tiny_ocr, dtype, video_path):
    inputs = mixed_batch(tiny_ocr, video_path)
    ref, ours = load_both(tiny_ocr, dtype)
    assert type(ref).__name__ == "GlmOcrForConditionalGeneration"
    expected = reference_logits(ref, inputs)
    with torch.no_grad():
        got = ours(**inputs).logits
    valid = inputs["attention_mask"].bool()
    diff = (got - expected)[valid].abs().max().item()
    print(f"ocr {dtype}: max |logits diff| = {diff:.3e} (logit std {expected[valid].std().item():.3f})")
    assert expected[valid].std().item() > 0.3, "random weights should give logits that vary"
    assert diff <= TOLERANCE[dtype]


def test_reference_forward_end_to_end_on_images_and_text(tiny_ocr):
    """transformers' own forward, no test-side glue: two image rows and a text-only row, left-padded."""
    processor = transformers.AutoProcessor.from_pretrained(tiny_ocr)
    processor.tokenizer.padding_side = "left"
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": OCR_PROMPTS[0]}]}],
        [{"role": "user", "content": "A text-only row."}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": OCR_PROMPTS[1]}]}],
    ]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    inputs = processor(text=texts, images=[random_image(140, 70, 4), random_image(30, 200, 5)], return_tensors="pt",
                       padding=True)
    ref, ours = load_both(tiny_ocr, torch.float64)
    with torch.no_grad():
        expected, got = ref(**inputs).logits, ours(**inputs).logits
    valid = inputs["attention_mask"].bool()
    diff = (got - expected)[valid].abs().max().item()
    print(f"ocr float64 end-to-end: max |logits diff| = {diff:.3e}")
    assert (~valid).any() and diff <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_vision_tower_matches_reference(tiny_ocr, dtype, video_path):
    inputs = mixed_batch(tiny_ocr, video_path)
    ref, ours = load_both(tiny_ocr, dtype)
    patches = torch.cat([inputs["pixel_values"], inputs["pixel_values_videos"]]).to(dtype)
    grids = torch.cat([inputs["image_grid_thw"], inputs["video_grid_thw"]])
    with torch.no_grad():
        expected = ref.model.visual(patches, grid_thw=grids).pooler_output
        got = ours.model.visual(patches, grids)
    diff = (got - expected).abs().max().item()
    print(f"ocr {dtype} vision tower: max |diff| = {diff:.3e} over {tuple(got.shape)}")
    assert got.shape == expected.shape and diff <= TOLERANCE[dtype]


@pytest.mark.parametrize("mode", ["static", "refill"])
def test_greedy_tokens_match_transformers(tiny_ocr, mode, video_path, monkeypatch):
    """Two images, one image, a video, text only; refill: two slots, rows admitted into freed slots."""
    got = greedy_rows_match_transformers(tiny_ocr, mode, video_path, monkeypatch)
    assert len(got) == 4


def test_compiled_decode_gives_the_same_tokens(tiny_ocr, video_path):
    """The torch.compile'd decode step (CUDA graphs on a GPU; tests/test_gpu.py) keeps GLM-OCR's greedy tokens."""
    inputs = mixed_batch(tiny_ocr, video_path)
    model = glmv.GlmOcrForConditionalGeneration.from_pretrained(tiny_ocr, fast_cpu=False)
    eager = model.generate(**inputs, max_new_tokens=GROUP_TOKENS, max_batch_size=2)
    assert torch.equal(eager, model.generate(**inputs, max_new_tokens=GROUP_TOKENS, max_batch_size=2,
                                             compile_decode=True))


def test_ocr_tasks_of_one_page_share_its_prefix_and_match_transformers_alone(tiny_ocr, monkeypatch):
    """One page under the three OCR prompts and another page (text-only rows: the greedy test above): the engine
    prefills the first page's prefix once (a prefix group) in two refilled slots, and every row's greedy tokens are
    transformers' for the row alone."""
    processor = glmv.Glm4vProcessor.from_pretrained(tiny_ocr)
    page, other = random_image(84, 112, 21), random_image(56, 84, 22)
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": p}]}]
                     for image, p in [(page, q) for q in OCR_PROMPTS] + [(other, OCR_PROMPTS[0])]]
    encode = dict(add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt", padding=True)
    batch = processor.apply_chat_template(conversations, **encode)
    ref = transformers.GlmOcrForConditionalGeneration.from_pretrained(tiny_ocr, dtype=torch.float32)
    eos = set(ref.generation_config.eos_token_id)
    expected = []
    for conversation in conversations:
        alone = processor.apply_chat_template([conversation], **encode)
        out = ref.generate(**alone, max_new_tokens=GROUP_TOKENS, do_sample=False)
        expected += new_tokens_until_eos(out, alone["input_ids"].shape[1], eos)

    ours = glmv.GlmOcrForConditionalGeneration.from_pretrained(tiny_ocr, dtype=torch.float32)
    prefilled = []
    original = ours.prefill
    monkeypatch.setattr(ours, "prefill", lambda x, *a, **k: prefilled.append(x.shape[0]) or original(x, *a, **k))
    out = ours.generate(**batch, max_new_tokens=GROUP_TOKENS, max_batch_size=2, return_dict_in_generate=True)
    T = batch["input_ids"].shape[1]
    assert [out.sequences[i, T:T + r.num_generated_tokens].tolist() for i, r in enumerate(out.rows)] == expected
    page_tokens = int((batch["mm_token_type_ids"][0] == 1).sum())
    assert sum(prefilled) <= sum(r.num_prompt_tokens for r in out.rows) - 2 * page_tokens, \
        "the page's prefix is prefilled once for its three rows"


@pytest.fixture(scope="module")
def processors(tiny_ocr):
    from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

    reference = transformers.AutoProcessor.from_pretrained(tiny_ocr)
    reference.image_processor = Glm46VImageProcessorPil.from_pretrained(tiny_ocr)   # same Pillow resize as ours
    return reference, glmv.Glm4vProcessor.from_pretrained(tiny_ocr)


def test_processor_is_the_glm46v_family_and_matches_reference(processors, tmp_path, video_path):
    from test_processor_parity import _assert_same_inputs, _reference_inputs

    reference, ours = processors
    assert type(reference).__name__ == "Glm46VProcessor" and ours.family == "glm46v"
    page, other = tmp_path / "page.png", tmp_path / "other.png"
    random_image(300, 220, 7).save(page)
    random_image(90, 400, 8).save(other)
    conversations = [
        [{"role": "user", "content": [{"type": "image", "path": page}, {"type": "text", "text": OCR_PROMPTS[0]}]}],
        [{"role": "user", "content": [{"type": "image", "path": other}, {"type": "image", "path": page},
                                      {"type": "text", "text": OCR_PROMPTS[2]}]}],
        [{"role": "user", "content": [{"type": "video", "path": video_path}, {"type": "text", "text": "Read it."}]}],
        [{"role": "user", "content": [{"type": "text", "text": OCR_PROMPTS[1]}]}],
    ]
    for rows in ([0, 1, 3], [2]):   # transformers' processor takes images and videos in separate calls here
        chosen = [conversations[i] for i in rows]
        expected = _reference_inputs(reference, chosen)
        got = ours.apply_chat_template(chosen, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", padding=True)
        _assert_same_inputs(expected, got)
    assert (expected["input_ids"] == reference.tokenizer.convert_tokens_to_ids("<|image|>")).any()
