"""GLM-4.5V/4.6V (mixture of experts) against transformers' Glm4vMoeForConditionalGeneration on tiny checkpoints.

Two router settings: `moe` (8 experts, top 2, one group, normalised weights) and `moe-grouped` (16 experts in 4
groups keeping 2, top 3, unnormalised weights scaled by 2.5, 2 shared experts); both with a random correction bias
that changes which experts are chosen (asserted), a dense first layer and head_dim apart from hidden/heads.

Tolerances (max abs logit difference, as for the dense model in test_model_parity): 1e-6 in float64, 5e-4 in
float32. transformers runs its eager expert loop as the reference (its grouped_mm path takes no float64).
FP8: the tiny FP8 release's logits against its float32 source within FP8_RMS (measured: see the test).
"""

import json
import shutil
from dataclasses import replace

import pytest
import torch

import glmv
from glmv import moe
from glmv.testing import make_fp8_checkpoint, make_tiny_checkpoint
from glmv.weights import CheckpointError
from test_generate import greedy_rows_match_transformers
from test_model_parity import TOLERANCE, mixed_batch, random_image, reference_logits, write_video

transformers = pytest.importorskip("transformers")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-moe"), preset="moe", seed=3)


@pytest.fixture(scope="module")
def tiny_moe_grouped(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny-moe-grouped"), preset="moe-grouped", seed=4)


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("media") / "clip.mp4", frames=24, fps=8)


@pytest.fixture(scope="module")
def fp8_moe(tiny_moe, tmp_path_factory):
    return make_fp8_checkpoint(tiny_moe, tmp_path_factory.mktemp("tiny-moe-fp8"))


def reference(checkpoint, dtype):
    return transformers.Glm4vMoeForConditionalGeneration.from_pretrained(
        checkpoint, dtype=dtype, attn_implementation="sdpa", experts_implementation="eager").eval()


def logits_of(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("preset", ["tiny_moe", "tiny_moe_grouped"])
def test_logits_match_transformers_on_images_video_and_text(preset, dtype, video_path, request):
    checkpoint = request.getfixturevalue(preset)
    inputs = mixed_batch(checkpoint, video_path)  # two images, one image, a video, text only; left-padded
    expected = reference_logits(reference(checkpoint, dtype), inputs)
    got = logits_of(glmv.Glm4vMoeForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype), inputs)
    valid = inputs["attention_mask"].bool()
    diff = (got - expected)[valid].abs().max().item()
    print(f"{preset} {dtype}: max |logits diff| = {diff:.3e}")
    assert expected[valid].std().item() > 0.3, "random weights should give logits that vary"
    assert diff <= TOLERANCE[dtype]


@pytest.mark.parametrize("preset", ["tiny_moe", "tiny_moe_grouped"])
def test_correction_bias_moves_the_choice_of_experts_not_their_weights(preset, request):
    model = glmv.Glm4vMoeForConditionalGeneration.from_pretrained(request.getfixturevalue(preset))
    router = model.model.language_model.layers[1].mlp.gate
    x = torch.randn(256, model.config.text.hidden_size, generator=torch.Generator().manual_seed(0))
    weights, chosen = router(x)
    bias = router.e_score_correction_bias.clone()
    router.e_score_correction_bias.zero_()
    plain_weights, plain = router(x)
    router.e_score_correction_bias.copy_(bias)
    changed = (chosen.sort(-1)[0] != plain.sort(-1)[0]).any(-1)
    assert bias.abs().max() > 0 and 0 < int(changed.sum()) < len(x), "the bias should change some tokens' experts"
    same = ~changed  # where the choice is the same, so are the weights (sorted by expert to compare)
    by_expert = chosen.argsort(-1)
    plain_by_expert = plain.argsort(-1)
    torch.testing.assert_close(weights.gather(1, by_expert)[same], plain_weights.gather(1, plain_by_expert)[same],
                               rtol=0, atol=0)


def test_grouped_matmul_and_expert_loop_agree(tiny_moe_grouped, video_path, monkeypatch):
    """float32 on CPU runs torch._grouped_mm; the loop over experts with tokens (float64's path) gives the same."""
    inputs = mixed_batch(tiny_moe_grouped, video_path)
    model = glmv.Glm4vMoeForConditionalGeneration.from_pretrained(tiny_moe_grouped, dtype=torch.float32)
    experts = model.model.language_model.layers[1].mlp.experts
    assert experts.grouped_ok(torch.zeros(1, model.config.text.hidden_size))
    grouped = logits_of(model, inputs)
    monkeypatch.setattr(moe, "GROUPED_MM", False)
    looped = logits_of(model, inputs)
    assert (grouped - looped).abs().max().item() <= 1e-5


def test_released_and_fused_layouts_load_to_identical_logits(tiny_moe, tmp_path):
    fused = make_tiny_checkpoint(tmp_path / "fused", preset="moe", seed=3, expert_layout="fused", mtp_layer=False)
    keys = set(json.loads((tiny_moe / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.language_model.layers.1.mlp.experts.7.up_proj.weight" in keys
    assert "model.language_model.layers.3.eh_proj.weight" in keys, "the released layout has an MTP layer"
    fused_keys = set(json.loads((fused / "model.safetensors.index.json").read_text())["weight_map"])
    assert "model.language_model.layers.1.mlp.experts.gate_up_proj" in fused_keys
    ids = torch.arange(3, 40).view(1, -1)
    a = logits_of(glmv.Glm4vMoeForConditionalGeneration.from_pretrained(tiny_moe), {"input_ids": ids})
    b = logits_of(glmv.Glm4vMoeForConditionalGeneration.from_pretrained(fused), {"input_ids": ids})
    assert torch.equal(a, b)


def _edit_index(src, dst, edit):
    shutil.copytree(src, dst)
    index = dst / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    edit(data["weight_map"])
    index.write_text(json.dumps(data))
    return dst


def test_a_missing_expert_or_a_stray_key_is_named(tiny_moe, tmp_path):
    missing = _edit_index(tiny_moe, tmp_path / "missing",
                          lambda m: m.pop("model.language_model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing key\(s\): model\.language_model\.layers\.2\.mlp\.experts"
                                              r"\.gate_up_proj"):
        glmv.Glm4vMoeForConditionalGeneration.from_pretrained(missing)
    stray = _edit_index(tiny_moe, tmp_path / "stray", lambda m: m.update(
        {"model.language_model.layers.1.mlp.experts.8.down_proj.weight":
         m["model.language_model.layers.1.mlp.experts.0.down_proj.weight"]}))
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): model\.language_model\.layers\.1\.mlp\.experts"
                                              r"\.8\.down_proj"):
        glmv.Glm4vMoeForConditionalGeneration.from_pretrained(stray)


def test_the_class_comes_from_the_config(tiny_moe, tiny_gqa, tmp_path):
    from glmv.auto import model_class

    sparse, dense = glmv.Glm4vConfig.from_pretrained(tiny_moe), glmv.Glm4vConfig.from_pretrained(tiny_gqa)
    assert model_class(sparse) is glmv.Glm4vMoeForConditionalGeneration
    assert model_class(dense) is glmv.Glm4vForConditionalGeneration
    assert type(glmv.AutoModelForImageTextToText.from_pretrained(tiny_moe)) is glmv.Glm4vMoeForConditionalGeneration
    with pytest.raises(CheckpointError, match="a glm4v_moe mixture-of-experts checkpoint; load it with "
                                              r"Glm4vMoeForConditionalGeneration .* not Glm4vForConditionalGeneration"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_moe)
    with pytest.raises(CheckpointError, match=r"a glm4v checkpoint; load it with Glm4vForConditionalGeneration .* "
                                              "not Glm4vMoeForConditionalGeneration"):
        glmv.Glm4vMoeForConditionalGeneration.from_pretrained(tiny_gqa)
    # GLM-4.6V as transformers also writes it: model_type glm46v around a glm4v_moe_text decoder
    config = json.loads((tiny_moe / "config.json").read_text())
    config["model_type"] = "glm46v"
    parsed = glmv.Glm4vConfig.from_dict(config)
    assert parsed.text.moe == sparse.text.moe and parsed.text.head_dim == 32
    assert model_class(parsed) is glmv.Glm4vMoeForConditionalGeneration
    # the constructors tell a glm46v MoE config from a dense glm46v one, and name the class that runs each
    dense46 = replace(dense, model_type="glm46v")
    with torch.device("meta"):
        assert isinstance(glmv.Glm4vMoeForConditionalGeneration(parsed).model.language_model, moe.MoeTextModel)
        glmv.Glm4vForConditionalGeneration(dense46)
        with pytest.raises(glmv.ConfigError, match="a glm46v mixture-of-experts config is run by "
                                                   "Glm4vMoeForConditionalGeneration, not Glm4vForConditionalGeneration"):
            glmv.Glm4vForConditionalGeneration(parsed)
        with pytest.raises(glmv.ConfigError, match="a glm46v config is run by Glm4vForConditionalGeneration, not "
                                                   "Glm4vMoeForConditionalGeneration"):
            glmv.Glm4vMoeForConditionalGeneration(dense46)
    config["text_config"]["n_group"] = 3
    with pytest.raises(glmv.ConfigError, match="n_routed_experts must be a multiple of n_group"):
        glmv.Glm4vConfig.from_dict(config)


@pytest.mark.parametrize("mode", ["static", "refill"])
def test_greedy_tokens_match_transformers_generate(tiny_moe_grouped, mode, video_path, monkeypatch):
    """test_generate's dense check on the MoE model: static, and refill (two slots for four rows, row 1 stopping at
    9 tokens, so rows 2 and 3 enter freed slots mid-run)."""
    got = greedy_rows_match_transformers(tiny_moe_grouped, mode, video_path, monkeypatch)
    assert max(len(t) for t in got) >= 20


def test_prefix_group_rows_match_transformers_row_by_row(tiny_moe, monkeypatch):
    """Three tasks on one image (a prefix group: the shared prefix prefilled once) and a text row, two slots."""
    processor = glmv.Glm4vProcessor.from_pretrained(tiny_moe)
    image = random_image(84, 112, 11)
    prompts = ["Describe this image.", "Read all the text in the image.", "Give a short caption."]
    conversations = [[{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": p}]}]
                     for p in prompts] + [[{"role": "user", "content": [{"type": "text", "text": "Tell a story."}]}]]
    batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt", padding=True)
    model = glmv.Glm4vMoeForConditionalGeneration.from_pretrained(tiny_moe)
    prefilled = []
    original = model.prefill
    monkeypatch.setattr(model, "prefill", lambda x, *a, **k: prefilled.append(x.shape[0]) or original(x, *a, **k))
    out = model.generate(**batch, max_batch_size=2, max_new_tokens=16, eos_token_id=[], return_dict_in_generate=True)
    T = batch["input_ids"].shape[1]
    ref = reference(tiny_moe, torch.float32)
    for i, row in enumerate(conversations):
        alone = processor.apply_chat_template([row], add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt")
        want = ref.generate(**alone, max_new_tokens=16, do_sample=False, eos_token_id=None, min_new_tokens=16)
        assert out.sequences[i, T:T + 16].tolist() == want[0, alone["input_ids"].shape[1]:].tolist(), f"row {i}"
    image_tokens = int((batch["mm_token_type_ids"][0] == 1).sum())
    lengths = [r.num_prompt_tokens for r in out.rows]
    assert sum(prefilled) <= sum(lengths) - 2 * image_tokens, "the image prefix is prefilled once for its 3 rows"


# FP8 tolerance, measured on these tiny checkpoints (seeds 3, 5, 6): the RMS logit error against the float32 source
# is 0.058-0.072 at logit std ~1.0 (e4m3 keeps 3 mantissa bits: up to 6% per weight, ~3.6% RMS, over 3 layers);
# the max is 0.34-1.08 and the greedy token agrees at 84-95% of positions. So: RMS <= 0.1 x std, and every weight
# within 2^-4 of its block's largest magnitude (a wrong scale, block or gate/up order is off by far more).
FP8_RMS = 0.1


def test_fp8_release_matches_its_source_within_tolerance(tiny_moe, fp8_moe, monkeypatch):
    from glmv.fp8 import FP8, Fp8Linear

    config = json.loads((fp8_moe / "config.json").read_text())
    assert config["quantization_config"]["weight_block_size"] == [128, 128]
    source = glmv.Glm4vMoeForConditionalGeneration.from_pretrained(tiny_moe, fast_cpu=False)
    dequantized = glmv.Glm4vMoeForConditionalGeneration.from_pretrained(fp8_moe, fast_cpu=False)
    quantized = 0
    for name, w in dequantized.state_dict().items():
        error = (w - source.state_dict()[name]).abs().max().item()
        quantized += error > 0
        assert error <= 2 ** -4 * source.state_dict()[name].abs().max().item(), name
    assert quantized >= 3 * 2 + 3 + 2, "the attention and MLP weights of every layer are FP8"
    ids = torch.arange(3, 60).view(1, -1)
    want = logits_of(source, {"input_ids": ids})
    got = logits_of(dequantized, {"input_ids": ids})
    rms = (got - want).pow(2).mean().sqrt().item()
    print(f"FP8 (dequantized at load) vs float32 source: RMS logit error {rms:.3e}, max "
          f"{(got - want).abs().max().item():.3e}, logit std {want.std().item():.3f}")
    assert 0 < rms <= FP8_RMS * want.std().item()
    # kept FP8 (what CUDA with FP8 does), dequantized layer by layer as it runs: the same numbers in float32
    monkeypatch.setenv("GLMV_FP8", "keep")
    kept = glmv.Glm4vMoeForConditionalGeneration.from_pretrained(fp8_moe, fast_cpu=False)
    layer = kept.model.language_model.layers[1]
    assert isinstance(layer.self_attn.q_proj, Fp8Linear) and layer.mlp.experts.gate_up_proj.dtype == FP8
    assert layer.mlp.gate.weight.dtype == torch.float32 and not isinstance(kept.lm_head, Fp8Linear)
    assert (logits_of(kept, {"input_ids": ids}) - got).abs().max().item() <= 1e-5
    settings = dict(max_new_tokens=8, eos_token_id=[])  # and through the engine (prefill, paged decode)
    assert torch.equal(kept.generate(input_ids=ids, **settings), dequantized.generate(input_ids=ids, **settings))


def test_fp8_quantization_round_trip_with_partial_blocks():
    from glmv.fp8 import dequantize, quantize

    w = torch.randn(3, 200, 72, generator=torch.Generator().manual_seed(0))
    q, scale = quantize(w, (128, 64))
    assert q.shape == w.shape and scale.shape == (3, 2, 2)
    error = (dequantize(q, scale, (128, 64)) - w).abs() / w.abs().amax()
    assert error.max() < 2 ** -4  # e4m3: 3 mantissa bits, relative to each block's largest value
    # stacked gate/up of 100 rows each keep their own scale rows (2 + 2 here), not one grid over 200 rows
    gate, up = quantize(w[:, :100], (64, 64)), quantize(w[:, 100:], (64, 64))
    stacked = dequantize(torch.cat([gate[0], up[0]], 1), torch.cat([gate[1], up[1]], 1), (64, 64), (100, 100))
    assert (stacked - w).abs().max() < 2 ** -4 * w.abs().max()


@pytest.mark.gpu
@cuda
def test_moe_and_fp8_on_cuda(tiny_moe, fp8_moe, video_path):
    """bfloat16 on CUDA: grouped_mm (sm90+) against the expert loop, the FP8 release kept in FP8 against its
    source, and generation through the engine."""
    inputs = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in mixed_batch(tiny_moe, video_path).items()}
    model = glmv.Glm4vMoeForConditionalGeneration.from_pretrained(tiny_moe, dtype=torch.bfloat16, device="cuda")
    grouped = logits_of(model, inputs).float()
    moe.GROUPED_MM = False
    try:
        looped = logits_of(model, inputs).float()
    finally:
        moe.GROUPED_MM = True
    spread = grouped.std().item()
    print(f"cuda bf16 grouped vs loop: {(grouped - looped).abs().max().item():.3e} (std {spread:.3f})")
    assert (grouped - looped).abs().max().item() <= 0.1 * spread
    kept = glmv.Glm4vMoeForConditionalGeneration.from_pretrained(fp8_moe, dtype=torch.bfloat16, device="cuda")
    is_fp8 = torch.cuda.get_device_capability() >= (8, 9)
    assert (kept.model.language_model.layers[1].mlp.experts.gate_up_proj.dtype == torch.float8_e4m3fn) == is_fp8
    diff = (logits_of(kept, inputs).float() - grouped).abs().max().item()
    print(f"cuda FP8 kept={is_fp8} vs bf16 source: {diff:.3e}")
    assert diff <= 0.5 * spread  # bf16 rounding on top of FP8's (FP8_RMS): a wrong dequantization is off by ~std
    out = kept.generate(**inputs, max_new_tokens=8, return_dict_in_generate=True)
    assert all(r.num_generated_tokens >= 1 for r in out.rows)


def test_the_job_on_a_moe_checkpoint_writes_transformers_texts(local_ray, tiny_moe, tmp_path):
    """The pipeline end to end (a local Ray, a folder of images, the caption and ocr tasks): every row's text is
    what transformers' processor + generate write for the same image and prompt."""
    import pandas as pd
    from PIL import Image

    from pipeline import config
    from pipeline.run import run
    from tests.pipeline_helpers import config_text

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i, (h, w) in enumerate([(84, 112), (56, 56), (98, 70)]):
        random_image(h, w, 20 + i).save(corpus / f"img{i}.png")
    (tmp_path / "run.toml").write_text(config_text(str(corpus), str(tmp_path / "out"), str(tiny_moe),
                                                   tasks=("caption", "ocr")))
    summary = run(config.load(tmp_path / "run.toml", ["run.max_new_tokens=12"]))
    df = pd.read_parquet(tmp_path / "out")
    assert summary.done == len(df) == 6 and df.error.isna().all()
    processor = transformers.AutoProcessor.from_pretrained(tiny_moe)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(tiny_moe, dtype=torch.float32)
    assert isinstance(ref, transformers.Glm4vMoeForConditionalGeneration)
    for row in df.itertuples():
        image = Image.open(row.uri).convert("RGB")
        conversation = [{"role": "user", "content": [{"type": "image", "image": image},
                                                     {"type": "text", "text": row.prompt}]}]
        inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                               return_dict=True, return_tensors="pt")
        out = ref.generate(**inputs, max_new_tokens=12, do_sample=False)
        assert row.text == processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True), row.uri
    assert df.num_output_tokens.max() >= 6


def test_glm45v_config_builds_the_released_parameter_count():
    """GLM-4.5V's config.json values (GLM_FACTS.md 3.4) give exactly the 107,710,933,120 parameters of its release."""
    from glmv.weights import build_on_meta

    text = {"model_type": "glm4v_moe_text", "hidden_size": 4096, "num_hidden_layers": 46, "num_attention_heads": 96,
            "num_key_value_heads": 8, "head_dim": 128, "attention_bias": True, "intermediate_size": 10944,
            "moe_intermediate_size": 1408, "n_routed_experts": 128, "num_experts_per_tok": 8, "n_shared_experts": 1,
            "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1, "norm_topk_prob": True,
            "routed_scaling_factor": 1.0, "use_qk_norm": False, "max_position_embeddings": 65536, "vocab_size": 151552,
            "rope_parameters": {"mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5, "rope_theta": 10000,
                                "rope_type": "default"}, "eos_token_id": [151329, 151336, 151338],
            "pad_token_id": 151329}
    vision = {"model_type": "glm4v_moe_vision", "hidden_size": 1536, "depth": 24, "num_heads": 12,
              "intermediate_size": 10944, "out_hidden_size": 4096}
    config = glmv.Glm4vConfig.from_dict({"model_type": "glm4v_moe", "text_config": text, "vision_config": vision})
    model = build_on_meta(glmv.Glm4vMoeForConditionalGeneration, config)
    assert sum(t.numel() for t in model.state_dict().values()) == 107_710_933_120
    assert config.text.head_dim == 128 and config.text.rotary_dim == 64
