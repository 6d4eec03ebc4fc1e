"""The OCR task presets (`text`, `table`, `formula`: GLM-OCR's own prompts) and their verbatim answers, and a whole
job on a tiny GLM-OCR checkpoint whose texts are transformers' processor + generate on the same images."""

import io

import pandas as pd
import pytest
import torch
from PIL import Image

from glmv.output import parse_output
from pipeline import config
from pipeline.errors import ConfigError
from pipeline.run import run
from tests.pipeline_helpers import config_text, good_media, write_local

OCR_TASKS = {"text": "Text Recognition:", "table": "Table Recognition:", "formula": "Formula Recognition:"}
NEW_TOKENS = 12

# What OCR writes, with what the generic parse would change: leading indentation, a trailing newline, box
# markers, tag-like text inside the page.
PAGES = [
    "    indented code line\n# Title\n\n- item with <|begin_of_box|>[1, 2, 3, 4]<|end_of_box|>\n",
    '<table><tr><td rowspan="2">a</td><td>&lt;b&gt;</td></tr></table>\n',
    "$$\\frac{a}{b} = \\sum_{i=0}^{n} x_i \\quad \\text{</answer> and <think>}$$",
    "The form says: <answer> yes </answer> in the margin.\n\n",
]


def _load(tmp_path, text, *overrides):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return config.load(path, list(overrides))


def test_ocr_presets_validate_with_their_prompts_and_any_override(tmp_path, tiny_gqa):
    extra = '[tasks.table]\nmax_new_tokens = 64\n[tasks.notes]\nprompt = "Read the notes."\nverbatim = true\n'
    cfg = _load(tmp_path, config_text("in/", "out/", str(tiny_gqa), tasks=(*OCR_TASKS, "notes", "caption"),
                                      extra=extra))
    specs = {s.name: s for s in cfg.task_specs()}
    for name, prompt in OCR_TASKS.items():
        assert specs[name].prompt == prompt and specs[name].verbatim and not specs[name].thinking
    assert specs["table"].max_new_tokens == 64   # an override keeps the preset's prompt and verbatim
    assert specs["notes"].verbatim and not specs["caption"].verbatim
    with pytest.raises(ConfigError, match="verbatim"):
        _load(tmp_path, config_text("in/", "out/", str(tiny_gqa), tasks=("text",),
                                    extra='[tasks.text]\nverbatim = "yes"\n'))
    # a task without verbatim hashes as before verbatim existed: earlier outputs' pairs keep their hash
    assert "verbatim" not in cfg.result_settings()["tasks"][-1] and cfg.result_settings()["tasks"][0]["verbatim"]


@pytest.mark.parametrize("page", PAGES)
def test_verbatim_answers_are_the_text_as_generated(page):
    out = parse_output(page, verbatim=True)
    assert (out.answer, out.thinking, out.boxes, out.complete) == (page, "", [], True)
    assert parse_output(page).answer != page, "the generic parse would have changed this page"


@pytest.mark.parametrize("page", PAGES)
def test_verbatim_drops_only_the_models_own_wrappers(page):
    """GLM-4.1V thinks and wraps its answer; the 4.6V family writes a newline after the trace."""
    out = parse_output(f"<think>The page has a table.</think><answer>{page}</answer>", verbatim=True)
    assert (out.thinking, out.answer, out.complete) == ("The page has a table.", page, True)
    assert parse_output(f"<think>x</think>\n{page}", verbatim=True).answer == page
    cut = parse_output(f"<think>x</think><answer>{page}", verbatim=True)
    assert cut.answer == page and not cut.complete


def test_text_task_on_glm_ocr_job_equals_transformers_generate(local_ray, tiny_ocr, tmp_path):
    """The `text` task through the whole job (decode tasks, model actor, engine) on a GLM-OCR checkpoint: each row's
    text is transformers' GlmOcrForConditionalGeneration.generate (greedy) on its processor's input for the same
    image and prompt, and the answer is that text verbatim."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.glm46v.image_processing_pil_glm46v import Glm46VImageProcessorPil

    files = good_media(num_images=4, num_videos=0)
    write_local(tmp_path / "corpus", files)
    text = config_text(str(tmp_path / "corpus"), str(tmp_path / "out"), str(tiny_ocr), tasks=("text",))
    summary = run(_load(tmp_path, text, f"run.max_new_tokens={NEW_TOKENS}"), out=io.StringIO())
    df = pd.read_parquet(tmp_path / "out")
    assert summary.done == len(df) == len(files) and df.error.isna().all()

    processor = transformers.AutoProcessor.from_pretrained(tiny_ocr)
    processor.image_processor = Glm46VImageProcessorPil.from_pretrained(tiny_ocr)   # the processor's Pillow resize
    model = transformers.GlmOcrForConditionalGeneration.from_pretrained(tiny_ocr, dtype=torch.float32).eval()
    for rel, data in files.items():
        row = df[df.uri.str.endswith(rel)].iloc[0]
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Text Recognition:"}]}]
        prompt = processor.apply_chat_template(conversation, add_generation_prompt=True, enable_thinking=False)
        inputs = processor(text=[prompt], images=[Image.open(io.BytesIO(data)).convert("RGB")], return_tensors="pt")
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, do_sample=False)
        expected = processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]
        assert (row.task, row.prompt) == ("text", "Text Recognition:")
        assert row.num_input_tokens == inputs["input_ids"].shape[1]
        assert row.text == expected and row.answer == row.text, rel
    assert df.text.str.len().min() > 0
