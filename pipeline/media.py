"""The seam between the pipeline and glmv's two-step media API.

CPU side (`MediaLoader.load`): bytes -> glmv `LoadedImage` / `LoadedVideo` (decoded, resized uint8 frames plus
metadata) with the checkpoint's own preprocessing settings, flattened into frames + JSON metadata. Actor side
(`restore`): frames + metadata -> the same glmv object, so nothing is decoded twice and only uint8 crosses
processes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

# glmv (and torch with it) is imported where media are handled, in decode tasks and model actors, never by merely
# importing this module: the driver imports it and needs no torch (~3.5 s and ~630 MiB saved at every start).
if TYPE_CHECKING:
    from glmv.video import LoadedVideo

_ARRAY_FIELD = {"image": "pixels", "video": "frames"}


@dataclass
class Loaded:
    frames: np.ndarray           # (T, H, W, 3) uint8
    width: int                   # original size
    height: int
    duration_s: float | None = None
    num_frames: int = 1          # frames the model sees (a video's sampled frames, the last maybe repeated)
    meta: dict = field(default_factory=dict)


class MediaLoader:
    """Decode + resize exactly as the checkpoint's processor does, optionally capped by the run config."""

    def __init__(self, model_path: str, max_pixels: int = 0, max_video_pixels: int = 0, max_frames: int = 0,
                 max_input_pixels: int = 100_000_000):
        from glmv.processor import Glm4vProcessor

        self.processor = Glm4vProcessor.from_pretrained(model_path, max_image_pixels=max_input_pixels)
        image, video = self.processor.image_settings, self.processor.video_settings
        if max_pixels:
            # smart_resize counts an image as temporal_patch_size frames
            image.max_pixels = max(image.min_pixels, min(image.max_pixels, max_pixels * image.temporal_patch_size))
        if max_video_pixels:
            video.max_pixels = max(video.min_pixels, min(video.max_pixels, max_video_pixels))
        self.max_frames = max_frames - max_frames % 2   # frames pair up into temporal patches

    def load(self, kind: str, data) -> Loaded:
        """data: the encoded bytes, or (videos) a seekable binary file."""
        if kind == "image":
            img = self.processor.load_image(data)
            return Loaded(img.pixels[None], img.orig_width, img.orig_height, None, 1, _meta(img, "image"))
        video = self.processor.load_video(data)
        if self.max_frames and len(video.frame_indices) > self.max_frames:
            video = _fewer_frames(video, self.max_frames)
        return Loaded(video.frames, video.orig_width, video.orig_height, float(video.duration),
                      len(video.frame_indices), _meta(video, "video"))


def _fewer_frames(video: LoadedVideo, count: int) -> LoadedVideo:
    """Keep `count` evenly spaced sampled frames (the clip's ends included)."""
    picks = np.linspace(0, len(video.frame_indices) - 1, count).round().astype(int)
    rows = np.minimum(picks, len(video.frames) - 1)   # the last index may repeat without its own frame row
    return dataclasses.replace(video, frames=video.frames[rows], frame_indices=[video.frame_indices[p] for p in picks])


def _meta(obj, kind: str) -> dict:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj) if f.name != _ARRAY_FIELD[kind]}


def model_kind(media_type: str) -> str:
    """What the model is given: a PDF page is rendered to an image."""
    return "video" if media_type == "video" else "image"


def restore(media_type: str, frames: np.ndarray, meta: dict):
    """Rebuild the glmv media object from shipped frames (actor side)."""
    from glmv.image import LoadedImage
    from glmv.video import LoadedVideo

    media_type = model_kind(media_type)
    pixels = frames[0] if media_type == "image" else frames
    cls = LoadedImage if media_type == "image" else LoadedVideo
    return cls(**{_ARRAY_FIELD[media_type]: pixels}, **meta)
