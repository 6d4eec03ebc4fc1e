"""Glm4vProcessor: chat messages + media -> model inputs, with the API of transformers' GLM-V processors.

    processor = Glm4vProcessor.from_pretrained(path)
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt", padding=True)
    texts = processor.batch_decode(generated_ids, skip_special_tokens=True)

Each `<|image|>` placeholder becomes one `<|image|>` per merged patch; each `<|video|>` becomes, per temporal patch,
`<|begin_of_image|>` + `<|image|>` x N + `<|end_of_image|>` + a timestamp. For pipelines the work splits in two:
`load_image` / `load_video` (CPU: decode + resize to compact uint8) and `__call__` on the loaded objects (expand
placeholders, tokenize, normalise + patchify, optionally on a GPU).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from glmv.chat_template import render as render_template
from glmv.errors import InputError, ProcessorConfigError
from glmv.image import DEFAULT_MAX_IMAGE_PIXELS, LoadedImage, PatchSettings, images_to_patches, load_image
from glmv.tokenizer import GlmTokenizer, config_object, read_config_json
from glmv.video import LoadedVideo, VideoSettings, load_video, videos_to_patches

IMAGE_TOKEN, VIDEO_TOKEN = "<|image|>", "<|video|>"
IMAGE_START, IMAGE_END = "<|begin_of_image|>", "<|end_of_image|>"
VIDEO_START, VIDEO_END = "<|begin_of_video|>", "<|end_of_video|>"
IMAGE_KEYS, VIDEO_KEYS = ("image", "url", "path", "base64"), ("video", "url", "path")
MEDIA_SETTINGS = ("size", "min_pixels", "max_pixels", "fps")  # per call or at load: see PatchSettings.overridden
# transformers' call arguments that change nothing here, with the values that keep it so (None: any value)
NO_EFFECT = {"return_mm_token_type_ids": None, "return_attention_mask": (None, True), "padding_side": (None, "left"),
             "truncation": (None, False), "max_length": (None,), "do_sample_frames": (None, True)}
# from_pretrained arguments about fetching from the Hub: a local folder needs none of them
HUB_ARGUMENTS = ("trust_remote_code", "use_fast", "revision", "cache_dir", "local_files_only", "token",
                 "force_download")


class BatchFeature(dict):
    """A dict of model inputs with attribute access and `.to(device)` / `.to(dtype)` (dtype casts float tensors)."""

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, *args, **kwargs) -> "BatchFeature":
        dtype = kwargs.pop("dtype", None)
        device = kwargs.pop("device", None)
        for arg in args:
            if isinstance(arg, torch.dtype):
                dtype = arg
            else:
                device = arg
        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device=device, dtype=dtype if value.is_floating_point() else None)
        return self


def _find_chat_template(path: Path, tokenizer_config: dict, processor_config: dict) -> str | None:
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    for source in (read_config_json(path / "chat_template.json") or {}, processor_config, tokenizer_config):
        template = source.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {t["name"]: t["template"] for t in template}.get("default")
        if template:
            return template
    return None


def _family_of(*configs: dict) -> str | None:
    for config in configs:
        for key in ("processor_class", "image_processor_type", "video_processor_type"):
            name = str(config.get(key) or "")
            if name.startswith("Glm46V"):
                return "glm46v"
            if name.startswith("Glm4v"):
                return "glm41v"
    return None


def _flatten(items) -> list:
    """Media may be given flat or nested per sample (as apply_chat_template passes them)."""
    if items is None:
        return []
    if not isinstance(items, (list, tuple)):
        return [items]
    flat = []
    for item in items:
        flat.extend(_flatten(item) if isinstance(item, (list, tuple)) else [item])
    return flat


class Glm4vProcessor:
    default_family = "glm41v"  # when the checkpoint's configs do not name a processor class
    forced_family: str | None = None  # a subclass pinned to one family ignores the configs

    def __init__(
        self,
        tokenizer: GlmTokenizer,
        image_settings: PatchSettings | None = None,
        video_settings: VideoSettings | None = None,
        chat_template: str | None = None,
        *,
        family: str | None = None,
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
        storage_options: dict | None = None,
    ):
        self.tokenizer = tokenizer
        self.family = family or (video_settings.family if video_settings else self.default_family)
        self.image_settings = image_settings or PatchSettings()
        self.video_settings = video_settings or VideoSettings(family=self.family)
        self.video_settings.family = self.family
        self.video_settings.validate()
        self.chat_template = chat_template
        self.max_image_pixels = max_image_pixels
        self.storage_options = storage_options
        self.image_token, self.video_token = IMAGE_TOKEN, VIDEO_TOKEN
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (IMAGE_TOKEN, VIDEO_TOKEN, VIDEO_START, VIDEO_END)}
        missing = [t for t, i in ids.items() if i is None]
        if missing:
            raise ProcessorConfigError(f"the tokenizer lacks the GLM-V tokens {missing}")
        self.image_token_id, self.video_token_id = ids[IMAGE_TOKEN], ids[VIDEO_TOKEN]
        self.video_start_id, self.video_end_id = ids[VIDEO_START], ids[VIDEO_END]

    @classmethod
    def from_pretrained(cls, path: str | Path, *, family: str | None = None, chat_template: str | None = None,
                        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, storage_options: dict | None = None,
                        **settings: Any) -> "Glm4vProcessor":
        """Load from a checkpoint folder holding either preprocessor_config.json + video_preprocessor_config.json
        (released checkpoints) or one processor_config.json (what transformers 5's save_pretrained writes).
        `size` / `min_pixels` / `max_pixels` (images and videos) and `fps` (videos) override the checkpoint's."""
        overrides = _media_settings(settings, "Glm4vProcessor.from_pretrained", allowed=HUB_ARGUMENTS)
        path = Path(path)
        if not path.is_dir():
            raise ProcessorConfigError(f"{path}: not a checkpoint folder")
        tokenizer = GlmTokenizer.from_pretrained(path)
        processor_config = read_config_json(path / "processor_config.json") or {}
        nested = {key: config_object(processor_config.get(key), f"{path / 'processor_config.json'}: {key}")
                  for key in ("image_processor", "video_processor")}
        # transformers' order: processor_config.json's nested settings, then the older separate files; a video
        # processor without its own file takes the image processor's (GLM-4.1V-9B-Base ships only that one)
        image_config = nested["image_processor"] or read_config_json(path / "preprocessor_config.json")
        video_config = nested["video_processor"] or read_config_json(path / "video_preprocessor_config.json") \
            or read_config_json(path / "preprocessor_config.json")
        if image_config is None:
            raise ProcessorConfigError(f"{path}: no preprocessor_config.json or processor_config.json")
        family = family or cls.forced_family or _family_of(
            processor_config, image_config, video_config or {}, tokenizer.config) or cls.default_family
        image_settings = PatchSettings.from_dict(image_config).overridden(overrides)
        video_settings = VideoSettings.from_dict(video_config or {}, family=family).overridden(overrides)
        template = chat_template or _find_chat_template(path, tokenizer.config, processor_config)
        return cls(tokenizer, image_settings, video_settings, template, family=family,
                   max_image_pixels=max_image_pixels, storage_options=storage_options)

    # ---- CPU step: media -> compact uint8 -------------------------------------------------------------------

    def check_model(self, config) -> None:
        """Raise ProcessorConfigError where this processor's patches cannot feed a model of `config` (a
        Glm4vConfig): every item would fail at the vision tower otherwise."""
        v = config.vision
        model = (v.patch_size, v.temporal_patch_size, v.spatial_merge_size)
        for kind, s in (("image", self.image_settings), ("video", self.video_settings)):
            if (s.patch_size, s.temporal_patch_size, s.merge_size) != model:
                raise ProcessorConfigError(
                    f"the {kind} processor's patch_size, temporal_patch_size, merge_size "
                    f"{s.patch_size, s.temporal_patch_size, s.merge_size} are not the model's {model} (config.json "
                    f"vision_config patch_size, temporal_patch_size, spatial_merge_size)")

    def load_image(self, source, settings: PatchSettings | None = None) -> LoadedImage:
        """Decode + resize one image (path, URL, bytes, file object, PIL image, uint8 array). Raises MediaError."""
        if isinstance(source, LoadedImage):
            return source
        return load_image(source, settings or self.image_settings, max_image_pixels=self.max_image_pixels,
                          storage_options=self.storage_options)

    def load_video(self, source, settings: VideoSettings | None = None) -> LoadedVideo:
        """Sample, decode and resize one video (path, URL, bytes, seekable file object). Raises MediaError."""
        if isinstance(source, LoadedVideo):
            return source
        return load_video(source, settings or self.video_settings, storage_options=self.storage_options)

    def load_media(self, conversation: list[dict]) -> tuple[list[LoadedImage], list[LoadedVideo]]:
        """Load every image and video of one conversation, in prompt order."""
        images, videos = _media_of(conversation)
        return [self.load_image(i) for i in images], [self.load_video(v) for v in videos]

    # ---- prompt expansion -------------------------------------------------------------------------------------

    def image_placeholder(self, image: LoadedImage) -> str:
        p, m = self.image_settings.patch_size, self.image_settings.merge_size
        return IMAGE_TOKEN * ((image.height // p) * (image.width // p) // (m * m))

    def video_placeholder(self, video: LoadedVideo) -> str:
        settings = self.video_settings
        p, m = settings.patch_size, settings.merge_size
        per_frame = IMAGE_TOKEN * ((video.frames.shape[1] // p) * (video.frames.shape[2] // p) // (m * m))
        parts = []
        for seconds in video.group_timestamps(settings.temporal_patch_size):
            stamp = f"{seconds:.1f} seconds" if self.family == "glm46v" else str(int(seconds))
            parts.append(f"{IMAGE_START}{per_frame}{IMAGE_END}{stamp}")
        return "".join(parts)

    def expand_placeholders(self, texts: list[str], images: Sequence[LoadedImage],
                            videos: Sequence[LoadedVideo]) -> list[str]:
        """Replace the n-th `<|image|>` / `<|video|>` across the batch by the n-th item's token run."""
        image_iter = iter([self.image_placeholder(i) for i in images])
        video_iter = iter([self.video_placeholder(v) for v in videos])
        pattern = "|".join(re.escape(t) for t, items in ((IMAGE_TOKEN, images), (VIDEO_TOKEN, videos)) if items)
        if not pattern:
            return list(texts)
        regex = re.compile(pattern)
        return [regex.sub(lambda mt: next(image_iter if mt.group() == IMAGE_TOKEN else video_iter), t) for t in texts]

    def create_mm_token_type_ids(self, input_ids: list[list[int]]) -> list[list[int]]:
        """0 text, 1 image patch, 2 video patch (image tokens between begin/end_of_video)."""
        out = []
        for row in input_ids:
            ids = np.asarray(row, dtype=np.int64)
            in_video = np.cumsum(ids == self.video_start_id) > np.cumsum(ids == self.video_end_id)
            is_patch = ids == self.image_token_id
            out.append((is_patch & ~in_video).astype(np.int64) + 2 * (is_patch & in_video).astype(np.int64))
        return [row.tolist() for row in out]

    # ---- the processor call ---------------------------------------------------------------------------------

    def __call__(
        self,
        text: str | Sequence[str] | None = None,
        images=None,
        videos=None,
        *,
        padding: bool | str = False,
        return_tensors: str | None = None,
        add_special_tokens: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        **settings: Any,
    ) -> BatchFeature:
        """Like transformers' processor call. `images` / `videos` may be sources or already loaded objects,
        flat or nested per sample. Pixel patches are computed on `device` (default CPU) in float32 and stored in
        `dtype` (pass the model's to skip a float32 copy); the same loaded object given twice is patchified once.
        `size` / `min_pixels` / `max_pixels` / `fps` apply to the media this call loads (not to loaded objects)."""
        overrides = _media_settings(settings, "processor call")
        if text is None and images is None and videos is None:
            raise ValueError("pass at least one of text, images, videos")
        images, videos = _flatten(images), _flatten(videos)
        frames = next((v for v in videos if isinstance(v, (Image.Image, np.ndarray, torch.Tensor))), None)
        if frames is not None:
            raise InputError(f"videos given as decoded frames ({type(frames).__name__}) are not supported: pass each "
                             f"video as a path, URL, bytes or file object (or a glmv.LoadedVideo)")
        texts = [text] if isinstance(text, str) else (None if text is None else list(text))
        if texts is not None:
            if not all(isinstance(t, str) for t in texts):
                raise ValueError("text must be a string or a list of strings")
            for token, items, kind in ((IMAGE_TOKEN, images, "images"), (VIDEO_TOKEN, videos, "videos")):
                found = sum(t.count(token) for t in texts)
                if found != len(items):
                    raise InputError(
                        f"the prompts hold {found} {token} placeholders but {len(items)} {kind} were given")
        image_settings = self.image_settings.overridden(overrides)
        loaded_images = [self.load_image(i, image_settings) for i in images]
        video_settings = self.video_settings.overridden(overrides)
        loaded_videos = [self.load_video(v, video_settings) for v in videos]
        data = BatchFeature()
        if texts is not None:
            texts = self.expand_placeholders(texts, loaded_images, loaded_videos)
            encoded = self.tokenizer(texts, add_special_tokens=add_special_tokens, padding=padding)
            for row, t in zip(encoded["input_ids"], texts):
                if row.count(self.image_token_id) != t.count(IMAGE_TOKEN):
                    raise InputError("the tokenizer merged image/video placeholder tokens with neighbouring text")
            data["input_ids"] = encoded["input_ids"]
            data["attention_mask"] = encoded["attention_mask"]
            data["mm_token_type_ids"] = self.create_mm_token_type_ids(encoded["input_ids"])
            if return_tensors == "pt":
                if len({len(r) for r in data["input_ids"]}) > 1:
                    raise ValueError("prompts have different lengths: pass padding=True to batch them into tensors")
                for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
                    data[key] = torch.tensor(data[key], dtype=torch.long, device=device)
            elif return_tensors is not None:
                raise ValueError(f"return_tensors must be 'pt' or None, got {return_tensors!r}")
        if loaded_images:
            data["pixel_values"], data["image_grid_thw"] = images_to_patches(loaded_images, image_settings,
                                                                               device, dtype)
        if loaded_videos:
            data["pixel_values_videos"], data["video_grid_thw"] = videos_to_patches(
                loaded_videos, video_settings, device, dtype)
        return data

    # ---- chat template ----------------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        conversation: list[dict] | list[list[dict]],
        chat_template: str | None = None,
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        return_dict: bool = False,
        return_tensors: str | None = None,
        padding: bool | str = False,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
        processor_kwargs: dict | None = None,
        **template_kwargs: Any,
    ):
        """Render one conversation or a batch with the checkpoint's template; with tokenize=True also load the
        media and return model inputs (a BatchFeature when return_dict=True, else input_ids).
        Extra keyword arguments (e.g. enable_thinking=False) are passed to the template."""
        for unsupported in ("return_assistant_tokens_mask", "sanitize_control_tokens"):
            if template_kwargs.pop(unsupported, False):
                raise ValueError(f"apply_chat_template: {unsupported} is not supported by glmv")
        template = chat_template or self.chat_template
        if not template:
            raise ProcessorConfigError("this processor has no chat template (chat_template.jinja missing)")
        conversations, batched = _normalize_conversations(conversation)
        prompts = render_template(
            template, conversations, add_generation_prompt=add_generation_prompt, tools=tools, documents=documents,
            **{**self.tokenizer.special_tokens_map, **template_kwargs},
        )
        if not tokenize:
            return prompts if batched else prompts[0]
        out = self.encode_rendered(prompts, conversations, padding=padding, return_tensors=return_tensors,
                                   device=device, dtype=dtype, processor_kwargs=processor_kwargs)
        return out if return_dict else out["input_ids"]

    def encode_rendered(self, prompts: list[str], conversations: list[list[dict]], *, padding: bool | str = False,
                        return_tensors: str | None = None, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32, processor_kwargs: dict | None = None) -> BatchFeature:
        """Model inputs for prompts already rendered from these conversations (the second half of
        `apply_chat_template(tokenize=True)`). Lets one batch hold rows rendered with different template switches,
        e.g. `enable_thinking` on for some rows and off for others."""
        if len(prompts) != len(conversations):
            raise ValueError(f"{len(prompts)} prompts for {len(conversations)} conversations")
        images, videos = [], []
        for conv in conversations:
            conv_images, conv_videos = _media_of(conv)
            images.append(conv_images)
            videos.append(conv_videos)
        bos = self.tokenizer.bos_token
        # transformers takes the processor call's arguments here too (padding, return_tensors ...): they win
        kwargs = {"padding": padding, "return_tensors": return_tensors, "device": device, "dtype": dtype,
                  "add_special_tokens": not (bos and prompts[0].startswith(bos)), **(processor_kwargs or {})}
        return self(text=prompts, images=images if any(images) else None, videos=videos if any(videos) else None,
                    **kwargs)

    # ---- decoding ---------------------------------------------------------------------------------------------

    def decode(self, ids, skip_special_tokens: bool = False, **_ignored: Any) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def batch_decode(self, sequences, skip_special_tokens: bool = False, **_ignored: Any) -> list[str]:
        return self.tokenizer.batch_decode(sequences, skip_special_tokens=skip_special_tokens)

    def post_process_image_text_to_text(self, generated, skip_special_tokens: bool = True, **_ignored: Any):
        return self.batch_decode(generated, skip_special_tokens=skip_special_tokens)


class Glm46VProcessor(Glm4vProcessor):
    """The GLM-4.6V(-Flash) family: dynamic-fps frame sampling, "{t:.1f} seconds" timestamps."""

    default_family = forced_family = "glm46v"


def _normalize_conversations(conversation) -> tuple[list[list[dict]], bool]:
    if not conversation:
        raise ValueError("empty conversation")
    batched = isinstance(conversation[0], (list, tuple))
    conversations = conversation if batched else [conversation]
    out = []
    for conv in conversations:
        messages = []
        for message in conv:
            if not isinstance(message, dict):
                raise TypeError(f"chat messages must be dicts with 'role' and 'content', got {type(message).__name__}")
            message = {k: v for k, v in message.items() if v is not None}
            content = message.get("content")
            if isinstance(content, list):  # OpenAI {"type": "image_url", "image_url": {"url": ...}} -> image block
                message["content"] = [
                    {"type": "image", "url": b["image_url"].get("url", "") if isinstance(b["image_url"], dict)
                     else b["image_url"]}
                    if isinstance(b, dict) and b.get("type") == "image_url" and "image_url" in b else b
                    for b in content
                ]
            messages.append(message)
        out.append(messages)
    return out, batched


def _media_of(conversation: list[dict]) -> tuple[list, list]:
    """Image and video sources of one conversation, in order."""
    images, videos = [], []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for block in content:
            if not isinstance(block, dict):
                continue
            if block.get("type") == "image":
                images.extend(_decode_base64(block[k]) if k == "base64" else block[k] for k in IMAGE_KEYS if k in block)
            elif block.get("type") == "video":
                videos.extend(block[k] for k in VIDEO_KEYS if k in block)
    return images, videos


def _decode_base64(payload: str) -> str:
    return payload if payload.startswith("data:") else "data:;base64," + payload


def _media_settings(arguments: dict[str, Any], where: str, allowed: Sequence[str] = ()) -> dict[str, Any]:
    """The media settings among a caller's extra arguments; one that would be silently dropped is an error."""
    unknown = []
    for name, value in arguments.items():
        if name in MEDIA_SETTINGS or name in allowed:
            continue
        if name in NO_EFFECT and (NO_EFFECT[name] is None or value in NO_EFFECT[name]):
            continue
        unknown.append(f"{name}={value!r}")
    if unknown:
        raise ValueError(f"{where}: unsupported argument(s) {', '.join(unknown)}; glmv's processor takes "
                         f"{', '.join(MEDIA_SETTINGS)} (left padding, no truncation: it would cut media placeholders)")
    return {name: value for name, value in arguments.items() if name in MEDIA_SETTINGS}
