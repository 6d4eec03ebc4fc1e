"""glmv's model against transformers' Glm4vForConditionalGeneration on the same tiny checkpoints.

Tolerances (max abs difference over all non-padding positions):
- float64 on both sides: 1e-6. Two correct implementations agree to ~1e-12 here; a wrong norm epsilon, rope
  section or scatter order shows up far above 1e-6.
- float32 on both sides: 5e-4 (transformers' own float32 error against float64 is ~1e-4 on these models).
Inputs come from transformers' own processor, so only the model is under test here.
"""

import av
import numpy as np
import pytest
import torch
from PIL import Image

import glmv

transformers = pytest.importorskip("transformers")
from transformers.video_utils import load_video  # noqa: E402

TOLERANCE = {torch.float64: 1e-6, torch.float32: 5e-4}


def write_video(path, frames=20, fps=8, size=(84, 56), seed=0):
    rng = np.random.default_rng(seed)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("mpeg4", rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], "yuv420p"
        for _ in range(frames):
            pixels = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def random_image(h, w, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("media") / "clip.mp4")


def mixed_batch(checkpoint, video_path):
    """Left-padded batch: a two-image prompt, a one-image prompt, a video prompt and a text-only prompt."""
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    conversations = [
        [{"role": "system", "content": "You are a careful observer."},
         {"role": "user", "content": [{"type": "image"}, {"type": "image"},
                                      {"type": "text", "text": "Compare the two pictures."}]}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "What happens in the video?"}]}],
        [{"role": "user", "content": "Say something long enough to be the longest row of the whole batch."}],
    ]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    images = [random_image(60, 90, 1), random_image(112, 56, 2), random_image(84, 84, 3)]
    frames, metadata = load_video(str(video_path), backend="pyav")
    processor.tokenizer.padding_side = "left"
    return processor(text=texts, images=images, videos=[frames], video_metadata=[metadata],
                     return_tensors="pt", padding=True)


@torch.no_grad()
def reference_logits(ref, inputs):
    """transformers' forward for a batch mixing images and videos, assembled from its own parts.

    transformers' `forward` cannot take images and videos in one batch (both use the image token id, and its
    placeholder check counts video frames as images), so we call its vision tower, its rope index and its text
    model, and place the features by mm_token_type_ids (1 image, 2 video) as its processor marks them.
    """
    m = ref.model
    embeds = m.get_input_embeddings()(inputs["input_ids"])
    types = inputs["mm_token_type_ids"]
    for kind, feats in ((1, m.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])),
                        (2, m.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"]))):
        features = torch.cat(list(feats.pooler_output)).to(embeds.dtype)
        embeds = embeds.masked_scatter((types == kind)[..., None], features)
    position_ids, _ = m.get_rope_index(inputs["input_ids"], types, inputs["image_grid_thw"],
                                       inputs["video_grid_thw"], attention_mask=inputs["attention_mask"])
    hidden = m.language_model(inputs_embeds=embeds, position_ids=position_ids,
                              attention_mask=inputs["attention_mask"]).last_hidden_state
    return ref.lm_head(hidden)


def load_both(checkpoint, dtype):
    """transformers' and glmv's model of the class the checkpoint's model_type names (GLM-4.1V or GLM-OCR)."""
    ref = transformers.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype,
                                                                   attn_implementation="sdpa").eval()
    ours = glmv.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=dtype)
    assert type(ours).__name__ == type(ref).__name__
    return ref, ours


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("preset", ["tiny_gqa", "tiny_mha"])
def test_logits_match_reference_on_mixed_left_padded_batch(preset, dtype, video_path, request):
    checkpoint = request.getfixturevalue(preset)
    inputs = mixed_batch(checkpoint, video_path)
    ref, ours = load_both(checkpoint, dtype)
    expected = reference_logits(ref, inputs)
    with torch.no_grad():
        got = ours(**inputs).logits
    valid = inputs["attention_mask"].bool()
    assert (~valid).any(), "the batch should be left-padded"
    diff = (got - expected)[valid].abs().max().item()
    spread = expected[valid].std().item()
    print(f"{preset} {dtype}: max |logits diff| = {diff:.3e} (logit std {spread:.3f})")
    assert spread > 0.3, "random weights should give logits that vary"
    assert diff <= TOLERANCE[dtype]


@pytest.mark.parametrize("preset", ["tiny_gqa", "tiny_mha"])
def test_image_batch_matches_reference_forward_end_to_end(preset, request):
    """Without any test-side glue: transformers' own forward on an image + text-only batch."""
    checkpoint = request.getfixturevalue(preset)
    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    conversations = [
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe this image."}]}],
        [{"role": "user", "content": "A text-only row."}],
        [{"role": "user", "content": [{"type": "image"}, {"type": "image"}, {"type": "text", "text": "Two?"}]}],
    ]
    texts = [processor.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
    images = [random_image(140, 70, 4), random_image(30, 200, 5), random_image(56, 56, 6)]
    inputs = processor(text=texts, images=images, return_tensors="pt", padding=True)
    ref, ours = load_both(checkpoint, torch.float64)
    with torch.no_grad():
        expected, got = ref(**inputs).logits, ours(**inputs).logits
    valid = inputs["attention_mask"].bool()
    diff = (got - expected)[valid].abs().max().item()
    print(f"{preset} float64 end-to-end: max |logits diff| = {diff:.3e}")
    assert diff <= TOLERANCE[torch.float64]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("preset", ["tiny_gqa", "tiny_mha"])
def test_vision_tower_matches_reference_on_packed_images_and_video(preset, dtype, video_path, request):
    checkpoint = request.getfixturevalue(preset)
    inputs = mixed_batch(checkpoint, video_path)
    ref, ours = load_both(checkpoint, dtype)
    patches = torch.cat([inputs["pixel_values"], inputs["pixel_values_videos"]]).to(dtype)
    video_grid = inputs["video_grid_thw"]
    # transformers' tower indexes its position table per frame, so it takes a video as (1, h, w) frames
    frames_grid = torch.repeat_interleave(video_grid, video_grid[:, 0], dim=0)
    frames_grid[:, 0] = 1
    with torch.no_grad():
        expected = ref.model.visual(patches, grid_thw=torch.cat([inputs["image_grid_thw"], frames_grid])).pooler_output
        got = ours.model.visual(patches, torch.cat([inputs["image_grid_thw"], video_grid]))
    assert got.shape == expected.shape
    assert len(inputs["image_grid_thw"]) == 3 and int(video_grid[0, 0]) > 1
    diff = (got - expected).abs().max().item()
    print(f"{preset} {dtype} vision tower: max |diff| = {diff:.3e} over {tuple(got.shape)}")
    assert diff <= TOLERANCE[dtype]


def test_images_never_attend_across_each_other(tiny_gqa):
    """Packing changes nothing: an image's features are the same alone or beside others."""
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, dtype=torch.float64)
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(16, 1176, generator=rng, dtype=torch.float64), torch.randn(32, 1176, generator=rng,
                                                                                 dtype=torch.float64)
    grid_a, grid_b = torch.tensor([[1, 4, 4]]), torch.tensor([[2, 4, 4]])
    with torch.no_grad():
        alone = model.model.visual(a, grid_a)
        packed = model.model.visual(torch.cat([a, b]), torch.cat([grid_a, grid_b]))
    assert torch.allclose(packed[: alone.shape[0]], alone, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_rms_norm_gives_the_reference_formulas_bits(dtype):
    """glmv's RMSNorm runs F.rms_norm (one op; decode steps run many norms on few rows): it must stay bit for bit
    the reference's float32 x * rsqrt(mean(x^2) + eps), so a torch that computes it otherwise fails here."""
    from glmv.layers import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(1024, 1e-5)
    norm.weight.data = torch.randn(1024).to(dtype)
    for shape in [(8, 1, 1024), (1, 522, 1024), (3, 1024)]:
        x = (torch.randn(shape, dtype=torch.float64) * 3).to(dtype)
        as_float = x.float()
        expected = norm.weight * (as_float * torch.rsqrt(as_float.pow(2).mean(-1, keepdim=True) + 1e-5)).to(dtype)
        assert torch.equal(norm(x), expected), (dtype, shape)
