"""CPU stage: read each item (images whole, videos through a seekable handle; transient storage errors retried),
decode and resize it with glmv's CPU step, and ship compact uint8 frames to the model actors. A bad item becomes
a row with `error` set; the run goes on.
"""

from __future__ import annotations

import functools
import json
import logging

import numpy as np
import pyarrow as pa

from pipeline import storage
from pipeline.config import Config
from pipeline.media import MediaLoader
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

DECODED_SCHEMA = pa.schema([
    ("id", pa.string()), ("uri", pa.string()), ("media_type", pa.string()), ("prompt", pa.string()),
    ("tasks", pa.list_(pa.string())), ("error", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("duration_s", pa.float64()), ("num_frames", pa.int32()),
    ("frames", pa.large_binary()),          # (T, H, W, 3) uint8, already resized to the model's grid
    ("frames_shape", pa.list_(pa.int32())),
    ("meta", pa.string()),                  # JSON of the loader's metadata (timestamps, fps, ...)
])


@functools.lru_cache(maxsize=4)
def _loader(model_path: str, max_pixels: int, max_video_pixels: int, max_frames: int,
            max_input_pixels: int) -> MediaLoader:
    # one per worker process: decode tasks reuse their worker, so the processor is loaded once
    return MediaLoader(model_path, max_pixels, max_video_pixels, max_frames, max_input_pixels)


def describe_error(uri: str, exc: BaseException) -> str:
    """One readable line naming the input and the cause; storage errors never carry credentials."""
    cause = getattr(exc, "cause", None)
    if cause:   # glmv.MediaError: its own source is '<bytes>', ours is the URI
        return f"{uri}: {cause}"
    if isinstance(exc, FileNotFoundError):
        return f"{uri}: object not found (deleted after listing?)"
    if isinstance(exc, PermissionError):
        return f"{uri}: permission denied"
    if storage.is_transient(exc):
        return f"{uri}: storage error after retries ({type(exc).__name__}: {exc})"
    return f"{uri}: {type(exc).__name__}: {exc}"


def decode_one(item: dict, loader: MediaLoader, opts: StorageOptions) -> dict:
    row = {**item, "error": None, "width": None, "height": None, "duration_s": None, "num_frames": None,
           "frames": None, "frames_shape": None, "meta": None}
    uri = item["uri"]
    if item["media_type"] not in ("image", "video"):
        row["error"] = f"{uri}: unsupported file type (extensions: images and videos only)"
        return row
    try:
        loaded = _load(item["media_type"], uri, loader, opts)
    except Exception as e:  # noqa: BLE001 - every failure of one item becomes that item's error row
        row["error"] = describe_error(uri, e)
        return row
    frames = np.ascontiguousarray(loaded.frames)
    row.update(width=loaded.width, height=loaded.height, duration_s=loaded.duration_s,
               num_frames=loaded.num_frames, frames=frames.tobytes(), frames_shape=list(frames.shape),
               meta=json.dumps(loaded.meta))
    return row


def _load(kind: str, uri: str, loader: MediaLoader, opts: StorageOptions):
    if kind == "video":
        # a seekable handle: only the byte ranges of the sampled frames are read, never a whole multi-GB file
        fs, path = storage.filesystem(uri, opts)

        def load_video():
            with fs.open(path, "rb") as f:
                return loader.load(kind, f)

        return storage.with_retries(load_video, uri, opts)
    return loader.load(kind, storage.read_bytes(uri, opts))


def decode_batch(batch: pa.Table, cfg: Config) -> pa.Table:
    b = cfg.batching
    loader = _loader(cfg.model.path, b.max_pixels, b.max_video_pixels, b.max_frames, b.max_input_pixels)
    opts = StorageOptions.from_config(cfg.storage)
    rows = [decode_one(item, loader, opts) for item in batch.to_pylist()]
    return pa.Table.from_pylist(rows, schema=DECODED_SCHEMA)


def frames_of(row: dict) -> np.ndarray:
    """The (T, H, W, 3) uint8 frames of a decoded row."""
    # a private, writable copy: torch refuses to wrap read-only Arrow buffers without a warning
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"]).copy()

