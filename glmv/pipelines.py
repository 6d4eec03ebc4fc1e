"""The high-level API from transformers' docs, so switching is one import:

    pipe = glmv.pipeline("image-text-to-text", model="path/to/GLM-4.1V-9B-Thinking", device="cuda", dtype="bfloat16")
    (a GLM-4.5V/4.6V or GLM-OCR folder works the same: the model class follows config.json)
    out = pipe(text=messages, max_new_tokens=512, return_full_text=False)
    out[0]["generated_text"]

`text` is one conversation (a list of messages) or a list of conversations; images and videos are referenced by
url/path inside the messages, as for the processor. Conversations run in static batches of `batch_size`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from glmv.auto import AutoModelForImageTextToText
from glmv.model import Glm4vForConditionalGeneration
from glmv.processor import Glm4vProcessor

TASKS = ("image-text-to-text",)


class ImageTextToTextPipeline:
    def __init__(self, model: Glm4vForConditionalGeneration, processor: Glm4vProcessor, batch_size: int = 8):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        processor.check_model(model.config)
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.processor.tokenizer.padding_side = "left"  # static batches are left-padded for generation

    def __call__(self, text=None, *, max_new_tokens: int | None = None, return_full_text: bool = True,
                 generate_kwargs: dict | None = None, chat_template_kwargs: dict | None = None, **kwargs):
        """Returns, per conversation, [{"input_text": messages, "generated_text": ...}] (a list of those for a
        list of conversations). With return_full_text=False, generated_text is only the new text; otherwise it is
        the conversation with the assistant's reply appended, as transformers returns it."""
        if text is None:
            raise ValueError("pass the conversation(s) as text=[{'role': 'user', 'content': [...]}, ...]")
        if not isinstance(text, (list, tuple)) or not text:
            raise ValueError("text must be a conversation (a list of messages) or a list of conversations")
        batched = isinstance(text[0], (list, tuple))
        conversations = list(text) if batched else [text]
        settings = {**(generate_kwargs or {}), **kwargs}
        for key in ("images", "videos"):
            if key in settings:
                raise ValueError(f"{key}= is not taken here: reference media inside the messages, e.g. "
                                 "{'type': 'image', 'url': ...}")
        settings.pop("return_dict_in_generate", None)  # this API returns text
        seeds = settings.pop("seed", None)
        if isinstance(seeds, (list, tuple)) and len(seeds) != len(conversations):
            raise ValueError(f"seed: got {len(seeds)} seeds for {len(conversations)} conversations")
        if max_new_tokens is not None:
            settings["max_new_tokens"] = max_new_tokens

        results = []
        for start in range(0, len(conversations), self.batch_size):
            chunk = conversations[start:start + self.batch_size]
            inputs = self.processor.apply_chat_template(
                chunk, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt",
                padding=True, device=self.model.device, dtype=self.model.dtype,
                **(chat_template_kwargs or {}))
            seed = seeds[start:start + self.batch_size] if isinstance(seeds, (list, tuple)) else seeds
            sequences = self.model.generate(**inputs, seed=seed, **settings)
            new_tokens = sequences[:, inputs["input_ids"].shape[1]:]
            texts = self.processor.batch_decode(new_tokens, skip_special_tokens=True)
            for conversation, generated in zip(chunk, texts):
                if return_full_text:
                    generated = [*conversation, {"role": "assistant", "content": generated}]
                results.append([{"input_text": conversation, "generated_text": generated}])
        return results if batched else results[0]


def pipeline(task: str, model: str | Path, device: str | torch.device | None = None, dtype=None,
             batch_size: int = 8, *, torch_dtype=None, device_map: str | torch.device | None = None,
             model_kwargs: dict | None = None, **processor_kwargs) -> ImageTextToTextPipeline:
    """Load a checkpoint folder's model and processor for `task` ("image-text-to-text"). transformers' spellings
    `torch_dtype` and a single-device `device_map` ("cuda:0", not "auto") are taken too; `processor_kwargs` go to
    `Glm4vProcessor.from_pretrained` (e.g. size=, fps=)."""
    if task not in TASKS:
        raise ValueError(f"task {task!r} is not supported; glmv runs {TASKS}")
    if model_kwargs:
        raise ValueError(f"model_kwargs {sorted(model_kwargs)}: pass device= and dtype= instead")
    if torch_dtype is not None and dtype is not None and torch_dtype != dtype:
        raise ValueError(f"dtype={dtype!r} and torch_dtype={torch_dtype!r} disagree")
    if device_map is not None:
        if device is not None or isinstance(device_map, dict) or device_map in ("auto", "balanced", "sequential"):
            raise ValueError(f"device_map={device_map!r}: glmv runs on one device; pass device= (e.g. 'cuda:0')")
        device = device_map
    # the class config.json needs (GLM-4.1V/4.6V, GLM-4.5V/4.6V MoE or GLM-OCR); the processor follows its own configs
    loaded = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype if dtype is not None else torch_dtype,
                                                         device=device or "cpu")
    processor = Glm4vProcessor.from_pretrained(model, **processor_kwargs)
    return ImageTextToTextPipeline(loaded, processor, batch_size=batch_size)
