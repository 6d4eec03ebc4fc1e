"""Checkpoint loading: both config layouts in the wild, sharded and single-file weights, and clear load errors."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import glmv
from glmv.config import ConfigError, Glm4vConfig
from glmv.weights import CheckpointError

transformers = pytest.importorskip("transformers")


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids=input_ids).logits


def copy_checkpoint(src, dst, edit_config=None):
    """A copy of a checkpoint folder, with edit_config(config_dict) applied to its config.json."""
    shutil.copytree(src, dst)
    if edit_config is not None:
        config = json.loads((dst / "config.json").read_text())
        edit_config(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def config_only(checkpoint, dst):
    """A new checkpoint folder holding only the config.json of `checkpoint`; weights are up to the test."""
    dst.mkdir()
    shutil.copy(checkpoint / "config.json", dst / "config.json")
    return dst


def all_tensors(checkpoint):
    state = {}
    for shard in checkpoint.glob("model-*.safetensors"):
        state.update(load_file(shard))
    return state


def test_loads_checkpoint_written_by_transformers_save_pretrained(tiny_gqa, tmp_path):
    """transformers 5 writes rope_parameters in text_config and its own shard names; logits must not move."""
    ref = transformers.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, dtype=torch.float64)
    ref.save_pretrained(tmp_path / "hf", max_shard_size="200KB")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert "rope_parameters" in written["text_config"] and "rope_scaling" not in written["text_config"]
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2

    ours = glmv.Glm4vForConditionalGeneration.from_pretrained(tmp_path / "hf", dtype=torch.float64)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        expected = ref(input_ids=ids).logits
    assert (logits(ours, ids) - expected).abs().max().item() <= 1e-9


def test_released_layout_and_single_file_load_the_same_weights(tiny_gqa, tmp_path):
    """The released files keep rope_theta / partial_rotary_factor / rope_scaling.mrope_section and torch_dtype;
    older revisions also repeat text fields at top level. Single model.safetensors instead of shards."""
    raw = json.loads((tiny_gqa / "config.json").read_text())
    assert "rope_scaling" in raw["text_config"]  # our writer uses the released layout
    old = dict(raw)
    old.update({k: v for k, v in raw["text_config"].items() if k != "model_type"})
    old.pop("dtype")
    old["torch_dtype"] = "bfloat16"

    dst = tmp_path / "released"
    dst.mkdir()
    for name in ("generation_config.json",):
        shutil.copy(tiny_gqa / name, dst / name)
    (dst / "config.json").write_text(json.dumps(old))
    save_file(all_tensors(tiny_gqa), dst / "model.safetensors")

    a = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    b = glmv.Glm4vForConditionalGeneration.from_pretrained(dst)
    assert a.config.text == b.config.text and a.config.vision == b.config.vision
    assert b.config.dtype == "bfloat16" and b.dtype == torch.float32  # CPU default is float32
    ids = torch.arange(3, 30)[None]
    assert torch.equal(logits(a, ids), logits(b, ids))
    ref = transformers.Glm4vForConditionalGeneration.from_pretrained(dst, dtype=torch.float32)
    assert ref.config.text_config.rope_parameters["mrope_section"] == list(b.config.text.mrope_section)
    assert ref.config.text_config.rope_parameters["partial_rotary_factor"] == b.config.text.partial_rotary_factor


def test_weights_go_straight_to_the_requested_dtype(tiny_gqa):
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not any(p.is_meta for p in model.parameters())
    assert model.model.language_model.rotary.inv_freq.dtype == torch.float32  # rotary tables stay float32


def test_missing_key_is_an_error_naming_it(tiny_gqa, tmp_path):
    dst = copy_checkpoint(tiny_gqa, tmp_path / "ckpt")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    del index["weight_map"]["model.language_model.layers.1.post_mlp_layernorm.weight"]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): model\.language_model\.layers\.1\.post_mlp_layernorm"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(dst)


def test_unexpected_key_is_an_error_naming_it(tiny_gqa, tmp_path):
    dst = config_only(tiny_gqa, tmp_path / "ckpt")
    state = all_tensors(tiny_gqa)
    state["model.visual.extra_head.weight"] = torch.zeros(2)
    save_file(state, dst / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"unexpected key\(s\): model\.visual\.extra_head\.weight"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(dst)


def test_wrong_shape_is_an_error_naming_key_and_shapes(tiny_gqa, tmp_path):
    dst = copy_checkpoint(tiny_gqa, tmp_path / "ckpt",
                          edit_config=lambda config: config["text_config"].update(intermediate_size=320))
    with pytest.raises(CheckpointError, match=r"'model\.language_model\.layers\.\d\.mlp\.\w+_proj\.weight' has shape "
                                              r"\[\d+, \d+\], the config .* needs \[\d+, \d+\]"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(dst)


def test_unsupported_model_type_is_named(tiny_gqa, tmp_path):
    dst = copy_checkpoint(tiny_gqa, tmp_path / "ckpt", edit_config=lambda config: config.update(model_type="qwen2_vl"))
    with pytest.raises(ConfigError, match=r"model_type 'qwen2_vl' is not supported; expected one of"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(dst)


def test_pickled_checkpoint_is_refused_without_being_opened(tmp_path, tiny_gqa):
    dst = config_only(tiny_gqa, tmp_path / "ckpt")
    (dst / "pytorch_model.bin").write_bytes(b"not even read")
    with pytest.raises(CheckpointError, match=r"pickled weights are refused"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(dst)


@pytest.mark.parametrize("change, message", [
    ({"text_config": {"rope_scaling": {"rope_type": "yarn", "mrope_section": [2, 3, 3]}}}, "rope_type 'yarn'"),
    ({"text_config": {"rope_scaling": {"mrope_section": [4, 4, 4]}}}, "mrope_section"),
    ({"text_config": {"num_hidden_layers": -1}}, "num_hidden_layers must be a non-negative integer"),
    ({"vision_config": {"out_hidden_size": 64}}, "out_hidden_size must equal"),
])
def test_bad_config_values_are_named(tiny_gqa, change, message):
    raw = json.loads((tiny_gqa / "config.json").read_text())
    for section, values in change.items():
        raw[section] = {**raw[section], **values}
    with pytest.raises(ConfigError, match=message):
        Glm4vConfig.from_dict(raw)


def test_unknown_dtype_is_rejected(tiny_gqa):
    with pytest.raises(ConfigError, match="dtype 'float8'"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, dtype="float8")


def test_casting_keeps_rotary_tables_in_float32(tiny_gqa):
    """model.to(bfloat16) must not round the rope frequencies: same logits as loading in bfloat16."""
    cast = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, fast_cpu=False).to(torch.bfloat16)
    assert cast.model.language_model.rotary.inv_freq.dtype == torch.float32
    assert cast.model.visual.inv_freq.dtype == torch.float32
    loaded = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, dtype=torch.bfloat16)
    ids = torch.arange(3, 60)[None]
    assert torch.equal(logits(cast, ids), logits(loaded, ids))


def test_packed_cpu_model_refuses_to_move_with_a_clear_error(tiny_gqa):
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)  # fast_cpu packs float32 linears
    assert model.to("cpu") is model and model.to(torch.float32) is model
    with pytest.raises(ValueError, match="packed for CPU float32 at load"):
        model.to(torch.bfloat16)


def test_index_pointing_at_the_wrong_shard_is_named(tiny_gqa, tmp_path):
    dst = copy_checkpoint(tiny_gqa, tmp_path / "ckpt")
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    key = next(k for k, f in index["weight_map"].items() if f == files[0])
    index["weight_map"][key] = files[1]
    (dst / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=f"places '{key}' in {files[1]}, which does not hold it"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(dst)


def test_tensor_whose_bytes_do_not_match_its_shape_is_named(tmp_path):
    from glmv.weights import SafetensorsFile

    path = tmp_path / "bad.safetensors"
    save_file({"w": torch.zeros(4, 4)}, path)
    raw = bytearray(path.read_bytes())
    header_len = int.from_bytes(raw[:8], "little")
    header = raw[8:8 + header_len].replace(b"[4,4]", b"[4,5]")
    path.write_bytes(raw[:8] + header + raw[8 + header_len:])
    with pytest.raises(CheckpointError, match=r"tensor 'w' holds 64 bytes, its shape \[4, 5\] and dtype F32 need 80"):
        SafetensorsFile(path)


def test_zero_heads_is_a_config_error_not_a_crash(tiny_gqa):
    raw = json.loads((tiny_gqa / "config.json").read_text())
    raw["text_config"]["num_attention_heads"] = 0
    with pytest.raises(ConfigError, match="text_config.num_attention_heads must be > 0"):
        Glm4vConfig.from_dict(raw)


@pytest.mark.parametrize("edit, message", [
    (lambda c: [c], "the file must be a JSON object, got list"),
    (lambda c: {**c, "text_config": [1]}, "text_config must be a JSON object, got list"),
    (lambda c: {**c, "vision_config": "x"}, "vision_config must be a JSON object, got str"),
    (lambda c: {**c, "text_config": {**c["text_config"], "rms_norm_eps": None}}, "rms_norm_eps must be a non-neg"),
    (lambda c: {**c, "text_config": {**c["text_config"], "rope_theta": "big"}}, "rope_theta must be a non-negative"),
    (lambda c: {**c, "text_config": {**c["text_config"], "rope_scaling": [1]}}, "rope_scaling must be a JSON obj"),
    (lambda c: {**c, "text_config": {**c["text_config"], "rope_scaling": {"mrope_section": 8}}}, "mrope_section must"),
    (lambda c: {**c, "text_config": {**c["text_config"], "eos_token_id": {"a": 1}}}, "eos_token_id must be an int"),
])
def test_config_of_the_wrong_json_shape_is_a_config_error(tiny_gqa, edit, message):
    """Not a TypeError or AttributeError from deep inside the parser: callers catch glmv's errors."""
    with pytest.raises(ConfigError, match=message):
        Glm4vConfig.from_dict(edit(json.loads((tiny_gqa / "config.json").read_text())))


def _header_file(path, header: bytes):
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    return path


@pytest.mark.parametrize("header, message", [
    (b"[]", "a JSON list, not an object"),
    (b'{"x": {"dtype": "F32", "shape": [1]}}', "corrupt safetensors header entry for 'x'"),
    (b'{"x": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}', "corrupt safetensors header entry"),
    (b'{"x": "F32"}', "corrupt safetensors header entry"),
])
def test_malformed_safetensors_header_is_a_checkpoint_error(tmp_path, header, message):
    from glmv.weights import SafetensorsFile

    with pytest.raises(CheckpointError, match=message):
        SafetensorsFile(_header_file(tmp_path / "bad.safetensors", header))


@pytest.mark.parametrize("weight_map, message", [
    ([], "weight_map must map tensor names to shard files, got a list"),
    ({"a": 1}, "not file names in the checkpoint folder: 1"),
    ({"a": "../other/model.safetensors"}, "not file names in the checkpoint folder: '../other/model.safetensors'"),
    ({"a": "/etc/passwd"}, "not file names in the checkpoint folder: '/etc/passwd'"),
])
def test_index_naming_odd_shards_is_refused_before_any_file_is_opened(tiny_gqa, tmp_path, weight_map, message):
    dst = config_only(tiny_gqa, tmp_path / "ckpt")
    (dst / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match=message):
        glmv.Glm4vForConditionalGeneration.from_pretrained(dst)


@pytest.mark.parametrize("content, message", [
    ([], "expected a JSON object, got list"),
    ({"eos_token_id": "<|user|>"}, "eos_token_id must be an integer or a list of them, got '<|user|>'"),
    ({"eos_token_id": [1, "2"]}, "eos_token_id must be an integer or a list of them"),
    ({"do_sample": "yes"}, "do_sample must be true or false"),
    ({"temperature": "hot"}, "temperature must be a number"),
    ({"top_k": 2.5}, "top_k must be an integer"),
])
def test_generation_config_of_the_wrong_shape_is_named_at_load(tiny_gqa, tmp_path, content, message):
    dst = copy_checkpoint(tiny_gqa, tmp_path / "ckpt")
    (dst / "generation_config.json").write_text(json.dumps(content))
    with pytest.raises(CheckpointError, match=message):
        glmv.Glm4vForConditionalGeneration.from_pretrained(dst)


def test_processor_patch_size_unlike_the_vision_tower_is_an_input_error(tiny_gqa, tmp_path):
    from PIL import Image

    dst = copy_checkpoint(tiny_gqa, tmp_path / "ckpt")
    config = json.loads((dst / "preprocessor_config.json").read_text())
    (dst / "preprocessor_config.json").write_text(json.dumps({**config, "patch_size": 16}))
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(dst)
    processor = glmv.Glm4vProcessor.from_pretrained(dst)
    inputs = processor(text="<|begin_of_image|><|image|><|end_of_image|>Describe.",
                       images=[Image.new("RGB", (64, 64))], return_tensors="pt")
    with pytest.raises(glmv.InputError, match=r"patch rows of 1536 values, but this vision tower takes 3 x 2 x 14"):
        model.generate(**inputs, max_new_tokens=2)
    # where both are loaded together (glmv.pipeline, the pipeline's model actor) it is said at load, once
    with pytest.raises(glmv.ProcessorConfigError, match=r"image processor's patch_size.* \(16, 2, 2\) are not the "
                                                        r"model's \(14, 2, 2\)"):
        glmv.pipeline("image-text-to-text", model=str(dst))


def test_tokenizer_config_that_is_not_json_is_a_processor_config_error(tiny_gqa, tmp_path):
    dst = copy_checkpoint(tiny_gqa, tmp_path / "ckpt")
    (dst / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(glmv.ProcessorConfigError, match="tokenizer_config.json: invalid JSON"):
        glmv.Glm4vProcessor.from_pretrained(dst)


def test_integer_weights_are_refused_not_cast(tiny_gqa, tmp_path):
    """A quantized or corrupt checkpoint storing a weight as integers or booleans would load as a wrong model."""
    dst = copy_checkpoint(tiny_gqa, tmp_path / "ckpt")
    shard = sorted(dst.glob("model-*.safetensors"))[0]
    tensors = load_file(shard)
    name = next(iter(tensors))
    tensors[name] = tensors[name].to(torch.int32)
    save_file(tensors, shard)
    with pytest.raises(CheckpointError, match=f"tensor '{name}' is stored as I32"):
        glmv.Glm4vForConditionalGeneration.from_pretrained(dst)
