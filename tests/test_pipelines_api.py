"""glmv.pipeline("image-text-to-text") returns what transformers' pipeline returns for the same conversations."""

import numpy as np
import pytest
import torch
from PIL import Image

import glmv

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
    folder = tmp_path_factory.mktemp("media")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (100, 150, 3), dtype=np.uint8)).save(folder / "a.png")
    Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / "b.jpg")
    return [
        [{"role": "user", "content": [{"type": "text", "text": "Describe this image."}]}],
        [{"role": "user", "content": [{"type": "image", "url": str(folder / "a.png")},
                                      {"type": "text", "text": "What is it?"}]}],
        [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": [{"type": "image", "path": str(folder / "b.jpg")},
                                      {"type": "text", "text": "Caption."}]}],
    ]


def test_pipeline_matches_transformers_pipeline(tiny_gqa, conversations):
    ours = glmv.pipeline("image-text-to-text", model=tiny_gqa, batch_size=2)
    ref = transformers.pipeline("image-text-to-text", model=str(tiny_gqa), dtype=torch.float32)
    got = ours(text=conversations, max_new_tokens=16, return_full_text=False)
    expected = ref(text=conversations, max_new_tokens=16, return_full_text=False)
    assert got == expected
    assert all(isinstance(r[0]["generated_text"], str) and r[0]["generated_text"] for r in got)


def test_single_conversation_and_full_text(tiny_gqa, conversations):
    pipe = glmv.pipeline("image-text-to-text", model=tiny_gqa)
    out = pipe(text=conversations[1], max_new_tokens=8)
    assert len(out) == 1
    full = out[0]["generated_text"]
    assert full[:-1] == conversations[1] and full[-1]["role"] == "assistant"
    short = pipe(text=conversations[1], max_new_tokens=8, return_full_text=False)[0]["generated_text"]
    assert full[-1]["content"] == short


def test_pipeline_rejects_other_tasks_and_bad_input(tiny_gqa):
    with pytest.raises(ValueError, match="task 'text-generation' is not supported"):
        glmv.pipeline("text-generation", model=tiny_gqa)
    pipe = glmv.pipeline("image-text-to-text", model=tiny_gqa)
    with pytest.raises(ValueError, match="text must be a conversation"):
        pipe(text="just a string")


def test_pipeline_takes_transformers_spellings_or_refuses_them(tiny_gqa):
    """torch_dtype and a one-device device_map work as in transformers; what glmv cannot honour is an error, never
    silently dropped (they used to fall through to the processor and vanish)."""
    pipe = glmv.pipeline("image-text-to-text", model=tiny_gqa, torch_dtype=torch.float64, device_map="cpu")
    assert pipe.model.dtype == torch.float64 and pipe.model.device.type == "cpu"
    with pytest.raises(ValueError, match="device_map='auto'"):
        glmv.pipeline("image-text-to-text", model=tiny_gqa, device_map="auto")
    with pytest.raises(ValueError, match="model_kwargs"):
        glmv.pipeline("image-text-to-text", model=tiny_gqa, model_kwargs={"attn_implementation": "sdpa"})
    with pytest.raises(ValueError, match="unsupported argument"):
        glmv.pipeline("image-text-to-text", model=tiny_gqa, use_cache=True)
