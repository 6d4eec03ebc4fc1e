"""glmv's processor against transformers' GLM-V processors built from the same tiny checkpoints.

Reference side: AutoProcessor with its image processor swapped for the Pillow backend (`Glm4vImageProcessorPil` /
`Glm46VImageProcessorPil`), and videos decoded with `transformers.video_utils.load_video(backend="pyav")` using the
reference processor's own frame sampler (its default decoder, torchcodec, is not installed).
Tolerances: token ids, masks, token types and grids exactly equal; image pixel values within 1e-5 (same Pillow
resize, float rounding only); video pixel values within 1e-5 max abs (both sides run torch's uint8 bicubic kernel),
far inside the 1e-2 mean-abs budget the issue allows.
"""

import json

import numpy as np
import pytest
import torch
from test_processor_media import bursty_pts_ms, make_images, make_video

from glmv.errors import ProcessorConfigError
from glmv.processor import Glm4vProcessor

FAMILY_FIXTURE = {"glm41v": "tiny_gqa", "glm46v": "tiny_glm46v"}


@pytest.fixture(scope="module", params=["glm41v", "glm46v"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def checkpoint(request, family):
    return request.getfixturevalue(FAMILY_FIXTURE[family])


@pytest.fixture(scope="module")
def reference(checkpoint, family):
    from transformers import AutoProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil
    from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

    processor = AutoProcessor.from_pretrained(checkpoint)
    pil_cls = Glm46VImageProcessorPil if family == "glm46v" else Glm4vImageProcessorPil
    processor.image_processor = pil_cls.from_pretrained(checkpoint)
    expected = "Glm46VProcessor" if family == "glm46v" else "Glm4vProcessor"
    assert type(processor).__name__ == expected
    return processor


@pytest.fixture(scope="module")
def ours(checkpoint, family):
    processor = Glm4vProcessor.from_pretrained(checkpoint)
    assert processor.family == family
    return processor


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    videos = {
        "odd_31f_30fps": make_video(folder / "a.mp4", 31, 30),
        "odd_45f_7.5fps": make_video(folder / "b.mp4", 45, 7.5, size=(90, 60)),
        "17f_7.5fps_gop4": make_video(folder / "c.mp4", 17, 7.5, gop=4),
        "3s_30fps_gop10": make_video(folder / "d.mp4", 91, 30, size=(100, 150), gop=10),
        "320s_over_max_duration": make_video(folder / "e.mp4", 640, 2, size=(28, 42), gop=30),
        "variable_frame_rate": make_video(folder / "f.mp4", 40, 10, pts_ms=bursty_pts_ms(40)),
    }
    return make_images(folder), videos


def _reference_inputs(reference, conversations, **template_kwargs):
    from transformers.image_utils import load_image
    from transformers.video_utils import load_video

    text = reference.apply_chat_template(conversations, add_generation_prompt=True, **template_kwargs)
    images, videos, metadata = [], [], []
    for conv in conversations:
        for message in conv:
            for block in message["content"] if isinstance(message["content"], list) else []:
                if block["type"] == "image":
                    images.append(load_image(str(block["path"])))
                elif block["type"] == "video":
                    frames, meta = load_video(str(block["path"]), backend="pyav",
                                              sample_indices_fn=reference.video_processor.sample_frames)
                    videos.append(frames)
                    metadata.append(meta)
    kwargs = dict(video_metadata=metadata, do_sample_frames=False) if videos else {}
    return reference(text=text, images=images or None, videos=videos or None, padding=True, return_tensors="pt",
                     **kwargs)


def _assert_same_inputs(expected, got):
    assert set(got) == set(expected) - {"video_metadata"}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids", "image_grid_thw", "video_grid_thw"):
        if key in expected:
            assert got[key].dtype == expected[key].dtype == torch.long, key
            assert torch.equal(got[key], expected[key]), key
    if "pixel_values" in expected:
        assert got["pixel_values"].dtype == torch.float32
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    if "pixel_values_videos" in expected:
        diff = (got["pixel_values_videos"] - expected["pixel_values_videos"]).abs()
        assert diff.max().item() <= 1e-5 and diff.mean().item() <= 1e-2


def _user(*blocks, text="Describe this."):
    return [{"role": "user", "content": [*blocks, {"type": "text", "text": text}]}]


def test_images_match_reference(reference, ours, media):
    images, _ = media
    assert len(images) >= 10
    conversations = [_user({"type": "image", "path": str(path)}) for path in images.values()]
    expected = _reference_inputs(reference, conversations)
    got = ours.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt", padding=True)
    _assert_same_inputs(expected, got)
    # the set really exercises the size rules and the EXIF rotation
    grid = dict(zip(images, got["image_grid_thw"].tolist()))
    assert grid["tiny_10x10.png"][1] * 14 > 10  # blown up to the minimum size
    large = grid["large_1500x2100.jpg"]
    assert 2 * large[1] * large[2] * 196 <= ours.image_settings.max_pixels < 2 * 1500 * 2100  # cut down
    assert grid["exif_rot6_150x260.jpg"][1] > grid["exif_rot6_150x260.jpg"][2]  # stored landscape, shown portrait


def test_in_memory_arrays_and_tensors_match_reference(reference, ours):
    """uint8 images as numpy arrays or torch tensors, channels last or first, or one channel: the pixels
    transformers' processor makes of the same objects. Floats are refused (0-1 or 0-255 cannot be told apart)."""
    import numpy as np

    import glmv

    hwc = np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)
    cases = {"numpy HWC": hwc, "numpy CHW": hwc.transpose(2, 0, 1).copy(), "numpy HW1": hwc[:, :, :1].copy(),
             "torch CHW": torch.from_numpy(hwc).permute(2, 0, 1).contiguous(),
             "torch HWC": torch.from_numpy(hwc), "numpy (3, 60, 3): channels first, as transformers": hwc[:3].copy()}
    text = "<|begin_of_image|><|image|><|end_of_image|>Describe this."
    for name, image in cases.items():
        expected = reference(text=text, images=[image], return_tensors="pt")
        got = ours(text=text, images=[image], return_tensors="pt")
        assert torch.equal(got["image_grid_thw"], expected["image_grid_thw"]), name
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0, msg=name)
    # a raw base64 string (no data: header), which transformers' load_image also takes
    import base64
    import io
    import zlib

    from PIL import Image
    from transformers.image_utils import load_image

    buf = io.BytesIO()
    Image.fromarray(hwc).save(buf, "PNG")
    encoded = base64.b64encode(buf.getvalue()).decode()
    expected = reference(text=text, images=[load_image(encoded)], return_tensors="pt")
    wrapped = base64.encodebytes(buf.getvalue()).decode()   # a line break every 76 characters, as `base64` writes
    for source in (encoded, wrapped):
        got = ours.apply_chat_template(_user({"type": "image", "image": source}), add_generation_prompt=True,
                                       tokenize=True, return_dict=True, return_tensors="pt")
        torch.testing.assert_close(got["pixel_values"], expected["pixel_values"], atol=1e-5, rtol=0)
    def chunk(kind, data):
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    header = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", (20000).to_bytes(4, "big") * 2 + bytes([8, 2, 0, 0, 0])) + \
        chunk(b"IEND", b"")
    with pytest.raises(glmv.MediaError, match=r"^<base64 image: \d+ chars>: decompression bomb"):
        ours(text=text, images=[base64.b64encode(header).decode()], return_tensors="pt")
    with pytest.raises(glmv.MediaError, match=r"^<base64 image: \d+ chars>: not a decodable image") as info:
        ours(text=text, images=[base64.b64encode(b"\xff\xd8\xff" + bytes(4000)).decode()], return_tensors="pt")
    assert len(str(info.value)) < 200   # never the payload itself
    for missing in ("imagesAndMoreImages/0001", "abcdefghijklmnop"):   # base64 alphabet, not an image: a path
        with pytest.raises(glmv.MediaError, match="file not found"):
            ours(text=text, images=[missing], return_tensors="pt")
    with pytest.raises(glmv.MediaError, match="expected uint8 pixels, got float32"):
        ours(text=text, images=[hwc.astype(np.float32) / 255], return_tensors="pt")
    with pytest.raises(glmv.MediaError, match=r"expected an \(H, W\).* got \(2, 60, 90\)"):
        ours(text=text, images=[hwc[:, :, :2].transpose(2, 0, 1).copy()], return_tensors="pt")


def test_videos_match_reference(reference, ours, media):
    _, videos = media
    conversations = [_user({"type": "video", "path": str(path)}) for path in videos.values()]
    expected = _reference_inputs(reference, conversations)
    got = ours.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt", padding=True)
    _assert_same_inputs(expected, got)
    assert (got["mm_token_type_ids"] == 2).any() and not (got["mm_token_type_ids"] == 1).any()


def test_batched_multi_turn_with_system_prompt_and_two_images(reference, ours, media):
    images, videos = media
    paths = list(images.values())
    conversations = [
        [
            {"role": "system", "content": "You are a careful visual assistant."},
            {"role": "user", "content": [{"type": "image", "path": str(paths[4])},
                                         {"type": "image", "path": str(paths[5])},
                                         {"type": "text", "text": "Compare the two pictures."}]},
            {"role": "assistant", "content": "The first is larger."},
            {"role": "user", "content": [{"type": "text", "text": "And the colours?"}]},
        ],
        [{"role": "user", "content": [{"type": "image", "path": str(paths[9])},
                                      {"type": "video", "path": str(videos["odd_31f_30fps"])},
                                      {"type": "text", "text": "Is the picture in the video?"}]}],
        [{"role": "user", "content": "Just text, no media."}],
    ]
    expected = _reference_inputs(reference, conversations)
    got = ours.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True, return_dict=True,
                                   return_tensors="pt", padding=True)
    _assert_same_inputs(expected, got)
    assert got["attention_mask"][2, 0] == 0 and got["input_ids"][2, 0] == ours.tokenizer.pad_token_id  # left pad


TEMPLATE_CASES = {
    "system_and_string_content": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
    "history_with_reasoning": [
        {"role": "user", "content": [{"type": "image", "url": "x.png"}, {"type": "text", "text": "What is it?"}]},
        {"role": "assistant", "content": "<think>a cat?</think>A cat.", "reasoning_content": None},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
        {"role": "assistant", "content": "Yes.", "reasoning_content": "Looked again."},
        {"role": "user", "content": [{"type": "video", "url": "v.mp4"}, {"type": "image", "url": "y.png"},
                                     {"type": "image", "url": "z.png"}, {"type": "text", "text": "And these?"}]},
    ],
    "openai_image_url": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "a.png"}},
                                                      {"type": "text", "text": "Read it."}]}],
}


@pytest.mark.parametrize("case", sorted(TEMPLATE_CASES))
@pytest.mark.parametrize("template_kwargs", [{}, {"enable_thinking": False}])
def test_chat_template_renders_identically(reference, ours, case, template_kwargs):
    conversation = TEMPLATE_CASES[case]
    expected = reference.apply_chat_template(conversation, add_generation_prompt=True, **template_kwargs)
    assert ours.apply_chat_template(conversation, add_generation_prompt=True, **template_kwargs) == expected
    expected = reference.apply_chat_template([conversation], add_generation_prompt=False, **template_kwargs)
    assert ours.apply_chat_template([conversation], **template_kwargs) == expected


CONTINUE_CASES = {
    "string": ("content", [{"role": "user", "content": "Count the dogs."},
                           {"role": "assistant", "content": "<think>Two dogs.</think><answer>There are "}]),
    "text_blocks": ("content", [{"role": "user", "content": [{"type": "image", "url": "a.png"},
                                                            {"type": "text", "text": "Read it."}]},
                                {"role": "assistant", "content": [{"type": "text", "text": "It says: "}]}]),
    "trailing_space_trimmed": (True, [{"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello there   "}]),
}


@pytest.mark.parametrize("case", sorted(CONTINUE_CASES))
def test_continue_final_message_renders_identically(reference, ours, case):
    """The prompt ends inside the final assistant message, right after its text (prefilling an answer)."""
    field, conversation = CONTINUE_CASES[case]
    try:
        expected = reference.apply_chat_template(conversation, continue_final_message=field)
    except ValueError:   # GLM-4.6V's template drops <think> from history: nothing to continue, both refuse
        with pytest.raises(ValueError, match="drops part of the final message"):
            ours.apply_chat_template(conversation, continue_final_message=field)
        return
    got = ours.apply_chat_template(conversation, continue_final_message=field)
    assert got == expected and not got.endswith("<|user|>")
    assert "CONTINUE_FINAL_MESSAGE_TAG" not in got


def test_continue_final_message_errors(ours):
    with pytest.raises(ValueError, match="cannot be used together"):
        ours.apply_chat_template([{"role": "assistant", "content": "x"}], continue_final_message=True,
                                 add_generation_prompt=True)
    with pytest.raises(ValueError, match="holds no text to continue"):
        ours.apply_chat_template([{"role": "assistant", "content": [{"type": "image", "url": "a.png"}]}],
                                 continue_final_message=True)
    with pytest.raises(ValueError, match="never reads"):
        ours.apply_chat_template([{"role": "assistant", "content": "x", "extra": "y"}], continue_final_message="extra")


def test_tools_render_identically(reference, ours, family):
    parameters = {"type": "object", "properties": {"box": {"type": "array"}}}
    tools = [{"type": "function",
              "function": {"name": "zoom", "description": "Zoom into a region", "parameters": parameters}}]
    conversation = [{"role": "user", "content": "Zoom on the dog, please."},
                    {"role": "assistant", "content": "", "tool_calls": [
                        {"function": {"name": "zoom", "arguments": {"box": [1, 2, 3, 4]}}}]},
                    {"role": "tool", "content": "zoomed: ok"}]
    expected = reference.apply_chat_template(conversation, tools=tools, add_generation_prompt=True)
    assert ours.apply_chat_template(conversation, tools=tools, add_generation_prompt=True) == expected
    if family == "glm46v":
        assert "# Tools" in expected and "<tool_call>zoom" in expected


def test_tokenizer_encode_decode_match_reference(reference, ours):
    texts = ["[gMASK]<sop><|user|>\nHello <|image|><|image|> world<|assistant|>\n",
             "<think>Let me think.</think><answer>The answer is <|begin_of_box|>[[1,2,3,4]]<|end_of_box|></answer>",
             "Ünïcödé 123456 text\twith\nnewlines  and  spaces /nothink", ""]
    expected = reference.tokenizer(texts, padding=True, return_tensors="pt")
    got = ours.tokenizer(texts, padding=True, return_tensors="pt")
    assert torch.equal(got["input_ids"], expected["input_ids"])
    assert torch.equal(got["attention_mask"], expected["attention_mask"])
    for skip in (True, False):
        assert ours.batch_decode(got["input_ids"], skip_special_tokens=skip) == reference.batch_decode(
            expected["input_ids"], skip_special_tokens=skip)
        assert ours.decode(got["input_ids"][1], skip_special_tokens=skip) == reference.decode(
            expected["input_ids"][1], skip_special_tokens=skip)
    # <think> / <answer> are added but not special: they survive skip_special_tokens, <|image|> does not
    decoded = ours.batch_decode(got["input_ids"], skip_special_tokens=True)
    assert decoded[1].startswith("<think>") and "<|image|>" not in decoded[0]


def test_processor_config_layout_from_save_pretrained(reference, ours, media, tmp_path, family):
    """transformers 5 saves one processor_config.json; loading it must give the same processor."""
    reference.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert "image_processor" in saved and not (tmp_path / "preprocessor_config.json").exists()
    reloaded = Glm4vProcessor.from_pretrained(tmp_path)
    assert reloaded.family == family
    assert reloaded.image_settings == ours.image_settings
    assert reloaded.video_settings.max_pixels == ours.video_settings.max_pixels
    images, videos = media
    conversation = _user({"type": "image", "path": str(images["odd_333x517.png"])},
                         {"type": "video", "path": str(videos["odd_45f_7.5fps"])})
    a = ours.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                 return_tensors="pt")
    b = reloaded.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                     return_tensors="pt")
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def _processor_files_only(checkpoint, folder, **edits):
    """The checkpoint's processor and tokenizer files in `folder`, with `edits`: file name -> dict (written) or
    None (removed)."""
    import shutil

    shutil.copytree(checkpoint, folder, ignore=shutil.ignore_patterns("*.safetensors*"))
    for name, content in edits.items():
        if content is None:
            (folder / name).unlink()
        else:
            (folder / name).write_text(json.dumps(content))
    return folder


def test_settings_files_are_looked_up_in_the_reference_order(reference, checkpoint, media, tmp_path, family):
    """A video processor without video_preprocessor_config.json takes preprocessor_config.json's settings (not
    the class defaults: a 5x larger pixel budget), and processor_config.json's nested settings win over both."""
    from transformers import AutoProcessor

    image_config = json.loads((checkpoint / "preprocessor_config.json").read_text())
    image_config["size"] = {"shortest_edge": 12544, "longest_edge": 200704}   # unlike the video file's
    only_image = _processor_files_only(checkpoint, tmp_path / "only_image", **{
        "preprocessor_config.json": image_config, "video_preprocessor_config.json": None})
    expected_ref = AutoProcessor.from_pretrained(only_image)
    expected_ref.image_processor = type(reference.image_processor).from_pretrained(only_image)
    ours = Glm4vProcessor.from_pretrained(only_image)
    assert ours.video_settings.max_pixels == expected_ref.video_processor.size["longest_edge"] == 200704
    _, videos = media
    conversation = [_user({"type": "video", "path": str(videos["3s_30fps_gop10"])})]
    _assert_same_inputs(_reference_inputs(expected_ref, conversation), ours.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"))

    nested = {"image_processor": {**image_config, "size": {"shortest_edge": 12544, "longest_edge": 100352}}}
    both = _processor_files_only(checkpoint, tmp_path / "both", **{
        "preprocessor_config.json": image_config, "processor_config.json": nested})
    assert AutoProcessor.from_pretrained(both).image_processor.size["longest_edge"] == 100352
    assert Glm4vProcessor.from_pretrained(both).image_settings.max_pixels == 100352


@pytest.mark.parametrize("name, content", [("preprocessor_config.json", []),
                                           ("processor_config.json", {"video_processor": "x"})])
def test_settings_that_are_not_json_objects_are_refused(checkpoint, tmp_path, name, content):
    folder = _processor_files_only(checkpoint, tmp_path / "bad", **{name: content})
    with pytest.raises(ProcessorConfigError, match="expected a JSON object"):
        Glm4vProcessor.from_pretrained(folder)


def test_video_timestamps_in_prompt(ours, media, family):
    _, videos = media
    text = ours.apply_chat_template(_user({"type": "video", "path": str(videos["3s_30fps_gop10"])}),
                                    add_generation_prompt=True, tokenize=True, return_dict=True)
    decoded = ours.decode(text["input_ids"][0]).replace("<|image|>", "")
    if family == "glm41v":  # 3 s at 2 fps -> 6 frames -> 3 temporal patches at 0, 1, 2 s
        assert "<|begin_of_image|><|end_of_image|>0<|begin_of_image|><|end_of_image|>1" in decoded
    else:  # 3 fps -> 18 frames -> 9 patches, one every 2/3 s
        assert "<|end_of_image|>0.0 seconds<|begin_of_image|>" in decoded and "0.7 seconds" in decoded


def test_call_with_preloaded_media_and_device(ours, media):
    """The split API: load on a CPU worker, ship the uint8 objects, build tensors elsewhere."""
    images, videos = media
    image = ours.load_image(images["rgba_200x300.png"])
    video = ours.load_video(videos["odd_31f_30fps"])
    assert image.pixels.dtype == np.uint8 and video.frames.dtype == np.uint8
    prompt = ours.apply_chat_template(_user({"type": "image", "image": image}, {"type": "video", "video": video}),
                                      add_generation_prompt=True)
    assert "<LoadedImage>" not in prompt and prompt.count("<|image|>") == 1
    direct = ours(text=prompt, images=[images["rgba_200x300.png"]], videos=[videos["odd_31f_30fps"]],
                  return_tensors="pt")
    split = ours(text=[prompt], images=[[image]], videos=[[video]], return_tensors="pt", device="cpu")
    assert set(direct) == set(split) and all(torch.equal(direct[k], split[k]) for k in direct)
    moved = split.to(torch.bfloat16)
    assert moved.pixel_values.dtype == torch.bfloat16 and moved.input_ids.dtype == torch.long
