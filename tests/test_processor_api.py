"""Processor API details: where templates come from, the sandbox, family pinning, config errors, call forms."""

import json
import shutil

import jinja2
import numpy as np
import pytest
import torch
from PIL import Image

from glmv.chat_template import render
from glmv.errors import InputError, ProcessorConfigError
from glmv.processor import Glm4vProcessor, Glm46VProcessor

CONVERSATION = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": [{"type": "image", "url": "a.png"}, {"type": "text", "text": "What?"}]}]


def _copy(src, dst, drop=()):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", *drop))
    return dst


@pytest.mark.parametrize("where", ["tokenizer_config", "chat_template_json"])
def test_template_from_other_files(tiny_gqa, tmp_path, where):
    expected = Glm4vProcessor.from_pretrained(tiny_gqa).apply_chat_template(CONVERSATION, add_generation_prompt=True)
    folder = _copy(tiny_gqa, tmp_path / "ckpt", drop=("chat_template.jinja",))
    template = (tiny_gqa / "chat_template.jinja").read_text()
    if where == "tokenizer_config":
        config = json.loads((folder / "tokenizer_config.json").read_text())
        config["chat_template"] = template
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
    else:
        (folder / "chat_template.json").write_text(json.dumps({"chat_template": template}))
    reloaded = Glm4vProcessor.from_pretrained(folder)
    assert reloaded.apply_chat_template(CONVERSATION, add_generation_prompt=True) == expected


def test_template_is_sandboxed_and_sees_only_plain_data():
    escape = "{{ messages.__class__.__init__.__globals__ }}"
    with pytest.raises(jinja2.exceptions.SecurityError):
        render(escape, [CONVERSATION])
    with pytest.raises(jinja2.exceptions.SecurityError):
        render("{% set ns = namespace(_x=1) %}", [CONVERSATION])
    with pytest.raises(jinja2.exceptions.TemplateError, match="no tools"):
        render("{{ raise_exception('no tools') }}", [CONVERSATION])
    image = Image.new("RGB", (4, 4))
    shown = render("{{ messages[0].content[0].image }}|{{ x | tojson }}", [[{"role": "user", "content": [
        {"type": "image", "image": image}]}]], x={"k": "<é>"})
    assert shown == ['<Image>|{"k": "<é>"}']


def test_family_pinning_and_detection(tiny_gqa, tiny_glm46v):
    assert Glm4vProcessor.from_pretrained(tiny_gqa).family == "glm41v"
    assert Glm4vProcessor.from_pretrained(tiny_glm46v).family == "glm46v"
    assert Glm46VProcessor.from_pretrained(tiny_gqa).family == "glm46v"
    assert Glm4vProcessor.from_pretrained(tiny_glm46v, family="glm41v").video_settings.family == "glm41v"


def test_config_errors_name_the_problem(tiny_gqa, tmp_path):
    with pytest.raises(ProcessorConfigError, match="not a checkpoint folder"):
        Glm4vProcessor.from_pretrained(tmp_path / "missing")
    folder = _copy(tiny_gqa, tmp_path / "no-tok", drop=("tokenizer.json",))
    with pytest.raises(ProcessorConfigError, match="no tokenizer.json"):
        Glm4vProcessor.from_pretrained(folder)
    folder = _copy(tiny_gqa, tmp_path / "bad-pre")
    config = json.loads((folder / "preprocessor_config.json").read_text())
    config["patch_size"] = 0
    (folder / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ProcessorConfigError, match="patch_size must be a positive integer"):
        Glm4vProcessor.from_pretrained(folder)


def test_call_forms_and_placeholder_count_check(tiny_gqa):
    processor = Glm4vProcessor.from_pretrained(tiny_gqa)
    image = np.random.default_rng(0).integers(0, 256, (50, 80, 3), dtype=np.uint8)
    prompt = processor.apply_chat_template(CONVERSATION, add_generation_prompt=True)
    with pytest.raises(ValueError, match="1 <\\|image\\|> placeholders but 0 images"):
        processor(text=prompt)
    out = processor(text=[prompt, "[gMASK]<sop>plain"], images=image, padding=True, return_tensors="pt")
    assert out.input_ids.shape == out.attention_mask.shape == out.mm_token_type_ids.shape
    tokens = int((out.mm_token_type_ids == 1).sum())
    assert tokens == int(out.image_grid_thw.prod()) // 4 == int((out.input_ids == processor.image_token_id).sum())
    assert out.pixel_values.shape == (int(out.image_grid_thw.prod()), 1176)
    unpadded = processor(text=[prompt, "[gMASK]<sop>plain"], images=[image])
    assert isinstance(unpadded["input_ids"], list) and len(unpadded["input_ids"][1]) < len(unpadded["input_ids"][0])
    with pytest.raises(ValueError, match="padding=True"):
        processor(text=[prompt, "short"], images=[image], return_tensors="pt")
    with pytest.raises(ValueError, match="return_assistant_tokens_mask is not supported"):
        processor.apply_chat_template(CONVERSATION, return_assistant_tokens_mask=True)
    frames = [Image.new("RGB", (56, 56))] * 4
    with pytest.raises(InputError, match=r"videos given as decoded frames \(Image\) are not supported"):
        processor(text="<|begin_of_video|><|video|><|end_of_video|>x", videos=[frames])
    ids = processor.apply_chat_template(CONVERSATION[:1], tokenize=True)  # ids only, lists
    assert isinstance(ids, list) and processor.decode(ids[0]).startswith("[gMASK]<sop><|system|>")


def test_batch_decode_accepts_tensors_arrays_and_lists(tiny_gqa):
    processor = Glm4vProcessor.from_pretrained(tiny_gqa)
    ids = processor.tokenizer(["<think>a</think><answer>b</answer><|user|>", "x"], padding=True)["input_ids"]
    expected = processor.batch_decode(torch.tensor(ids), skip_special_tokens=True)
    assert expected[0] == "<think>a</think><answer>b</answer>" and expected[1] == "x"
    assert processor.batch_decode(np.array(ids), skip_special_tokens=True) == expected
    assert processor.batch_decode(ids, skip_special_tokens=True) == expected
    assert processor.post_process_image_text_to_text(torch.tensor(ids)) == expected


def test_encode_rendered_batches_rows_rendered_with_different_template_switches(tiny_glm46v):
    """What the model actor does for a window holding thinking and non-thinking tasks: each row equals the same
    conversation run through apply_chat_template(tokenize=True) with its own switch (ids unpadded, pixels, grids).
    The GLM-4.6V template is the one whose text depends on enable_thinking."""
    processor = Glm46VProcessor.from_pretrained(tiny_glm46v)
    rng = np.random.default_rng(1)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((56, 84), (112, 140))]
    convs = [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}]
             for img in images for text in ("Describe it.", "Think, then answer.")]
    switches = [False, True, True, False]
    prompts = [processor.apply_chat_template(c, add_generation_prompt=True, enable_thinking=t)
               for c, t in zip(convs, switches)]
    # the switch changes the rendered text, so rows rendered apart really differ in more than their prompt
    assert processor.apply_chat_template(convs[0], add_generation_prompt=True, enable_thinking=True) != prompts[0]
    mixed = processor.encode_rendered(prompts, convs, padding=True, return_tensors="pt")
    for row, (conv, thinking) in enumerate(zip(convs, switches)):
        alone = processor.apply_chat_template(conv, add_generation_prompt=True, tokenize=True, return_dict=True,
                                              return_tensors="pt", enable_thinking=thinking)
        n = int(mixed.attention_mask[row].sum())
        assert torch.equal(mixed.input_ids[row, -n:], alone.input_ids[0])
        assert torch.equal(mixed.mm_token_type_ids[row, -n:], alone.mm_token_type_ids[0])
        start = int(mixed.image_grid_thw[:row].prod(-1).sum())
        assert torch.equal(mixed.pixel_values[start:start + len(alone.pixel_values)], alone.pixel_values)
    # the model actor asks for its model's dtype: the same pixels, rounded once
    bf16 = processor.encode_rendered(prompts, convs, padding=True, return_tensors="pt", dtype=torch.bfloat16)
    assert torch.equal(bf16.pixel_values, mixed.pixel_values.to(torch.bfloat16))
    assert torch.equal(bf16.input_ids, mixed.input_ids) and mixed.pixel_values.dtype == torch.float32
    with pytest.raises(ValueError, match="3 prompts for 4 conversations"):
        processor.encode_rendered(prompts[:3], convs)


def test_media_settings_per_call_and_at_load_match_transformers(tiny_gqa, tmp_path):
    """size / fps change the grids as they do in transformers (per call, through processor_kwargs and at load);
    an argument glmv cannot honour is an error, never silently dropped."""
    import transformers

    from test_processor_media import make_video

    ours, ref = Glm4vProcessor.from_pretrained(tiny_gqa), transformers.AutoProcessor.from_pretrained(tiny_gqa)
    image = np.random.default_rng(0).integers(0, 256, (400, 600, 3), dtype=np.uint8)
    text = "<|begin_of_image|><|image|><|end_of_image|>hi"
    small = {"shortest_edge": 12544, "longest_edge": 56 * 56 * 2}  # min above max: max wins, in both
    default_grid = ours(text=text, images=[image])["image_grid_thw"].tolist()
    assert default_grid == ref(text=text, images=[image])["image_grid_thw"].tolist()
    grid = ours(text=text, images=[image], size=small)["image_grid_thw"].tolist()
    assert grid == ref(text=text, images=[image], size=small)["image_grid_thw"].tolist() != default_grid
    conversation = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "hi"}]}]
    inputs = ours.apply_chat_template(conversation, tokenize=True, return_dict=True, return_tensors="pt",
                                      processor_kwargs={"size": small, "padding": True})
    assert inputs["image_grid_thw"].tolist() == grid and isinstance(inputs["input_ids"], torch.Tensor)
    loaded = Glm4vProcessor.from_pretrained(tiny_gqa, size=small, trust_remote_code=True)
    assert loaded(text=text, images=[image])["image_grid_thw"].tolist() == grid

    video = str(make_video(tmp_path / "v.mp4", 60, 10))
    video_text = "<|begin_of_video|><|video|><|end_of_video|>hi"
    frames, metadata = transformers.video_utils.load_video(video, backend="pyav")
    expected = ref(text=video_text, videos=[frames], video_metadata=[metadata], do_sample_frames=True,
                   fps=0.5)["video_grid_thw"].tolist()
    assert ours(text=video_text, videos=[video], fps=0.5)["video_grid_thw"].tolist() == expected
    assert ours(text=video_text, videos=[video])["video_grid_thw"].tolist() != expected

    with pytest.raises(ValueError, match="num_frames=4"):
        ours(text=video_text, videos=[video], num_frames=4)
    with pytest.raises(ValueError, match="truncation=True"):
        ours(text="hi", truncation=True, max_length=4)
    with pytest.raises(ValueError, match="size must be a dict"):
        ours(text=text, images=[image], size=448)
    with pytest.raises(ValueError, match="min_pixel=1"):
        Glm4vProcessor.from_pretrained(tiny_gqa, min_pixel=1)
    assert ours(text="hi", padding_side="left", return_mm_token_type_ids=True)["input_ids"]


def test_tools_given_as_python_functions_are_refused(tiny_glm46v):
    """They reached the template as the string "<function>": the model saw no tool and nobody was told."""
    def get_weather(city: str) -> str:
        """Weather of a city."""
        return city

    processor = Glm46VProcessor.from_pretrained(tiny_glm46v)
    conversation = [{"role": "user", "content": "Weather in Paris?"}]
    with pytest.raises(ValueError, match="tools must be JSON-schema dicts"):
        processor.apply_chat_template(conversation, tools=[get_weather], add_generation_prompt=True)
    schema = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    assert "get_weather" in processor.apply_chat_template(conversation, tools=[schema], add_generation_prompt=True)
