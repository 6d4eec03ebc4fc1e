"""The real checkpoints' configs (from ../shared/reference/GLM_FACTS.md) give exactly transformers' tensor names and
shapes, so a user's real GLM-4.1V / GLM-4.6V-Flash folder loads. Built on the meta device: no memory, no weights."""

import pytest
import torch

import glmv
from glmv.weights import build_on_meta

transformers = pytest.importorskip("transformers")

VISION = {"model_type": "glm4v", "hidden_size": 1536, "depth": 24, "num_heads": 12, "attention_bias": False,
          "intermediate_size": 13696, "hidden_act": "silu", "image_size": 336, "patch_size": 14,
          "out_hidden_size": 4096, "rms_norm_eps": 1e-05, "spatial_merge_size": 2, "temporal_patch_size": 2,
          "in_channels": 3}
TEXT = {"model_type": "glm4v_text", "attention_bias": True, "pad_token_id": 151329, "hidden_act": "silu",
        "hidden_size": 4096, "intermediate_size": 13696, "num_attention_heads": 32, "num_hidden_layers": 40,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-05, "vocab_size": 151552}

# GLM-4.1V-9B-Thinking: the released layout (rope_theta / partial_rotary_factor / rope_scaling in text_config)
GLM41V = {"architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", "image_start_token_id": 151339,
          "image_end_token_id": 151340, "video_start_token_id": 151341, "video_end_token_id": 151342,
          "image_token_id": 151343, "video_token_id": 151344, "tie_word_embeddings": False,
          "text_config": {**TEXT, "eos_token_id": [151329, 151336, 151338, 151348], "max_position_embeddings": 65536,
                          "dtype": "bfloat16", "partial_rotary_factor": 0.5, "rope_theta": 10000,
                          "rope_scaling": {"rope_type": "default", "mrope_section": [8, 12, 12]}},
          "vision_config": VISION}
# GLM-4.6V-Flash: transformers-5 layout (rope_parameters), other token ids, rope_theta and context
GLM46V_FLASH = {"architectures": ["Glm4vForConditionalGeneration"], "model_type": "glm4v", "dtype": "bfloat16",
                "image_start_token_id": 151339, "image_end_token_id": 151340, "image_token_id": 151363,
                "video_start_token_id": 151341, "video_end_token_id": 151342, "video_token_id": 151364,
                "text_config": {**TEXT, "eos_token_id": [151329, 151336, 151338], "max_position_embeddings": 131072,
                                "rope_parameters": {"mrope_section": [8, 12, 12], "partial_rotary_factor": 0.5,
                                                    "rope_theta": 500000, "rope_type": "default"}},
                "vision_config": VISION}


@pytest.mark.parametrize("raw", [GLM41V, GLM46V_FLASH], ids=["glm41v-thinking", "glm46v-flash"])
def test_real_configs_give_transformers_names_and_shapes(raw):
    config = glmv.Glm4vConfig.from_dict(raw)
    ours = {k: tuple(v.shape) for k, v in build_on_meta(glmv.Glm4vForConditionalGeneration, config).state_dict().items()}
    with torch.device("meta"):
        ref_model = transformers.Glm4vForConditionalGeneration(transformers.Glm4vConfig(**raw))
    ref = {k: tuple(v.shape) for k, v in ref_model.state_dict().items()}
    assert ours == ref
    assert len(ours) == 704  # vision 13 + 24 blocks x 7, text 40 layers x 13 + embed, norm, lm_head
    assert ours["model.visual.blocks.0.attn.qkv.weight"] == (4608, 1536)
    assert ours["model.visual.merger.gate_proj.weight"] == (13696, 4096)
    assert ours["model.language_model.layers.0.mlp.gate_up_proj.weight"] == (27392, 4096)
    assert ours["lm_head.weight"] == (151552, 4096)
    params = sum(torch.Size(s).numel() for s in ours.values())
    assert 10.0e9 < params < 10.5e9, params  # the "9B" models hold ~10.3B parameters incl. vision and lm_head

    text, ref_text = config.text, ref_model.config.text_config
    assert text.rotary_dim == 64 and list(text.mrope_section) == ref_text.rope_parameters["mrope_section"]
    assert text.rope_theta == ref_text.rope_parameters["rope_theta"]
    assert text.eos_token_id == tuple(raw["text_config"]["eos_token_id"])
    assert config.image_token_id == raw["image_token_id"] and config.dtype == "bfloat16"
