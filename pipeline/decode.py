"""CPU stage: fetch each item's bytes (concurrently: fetching is I/O, it must not hold a CPU per object; videos
through a seekable handle so only the sampled frames' byte ranges are read), decode and resize with glmv's CPU
step, and ship compact uint8 frames to the model actors. A bad item becomes an item with `error` set; the run
goes on.
"""

from __future__ import annotations

import functools
import io
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from pipeline import items as items_mod
from pipeline import pdf, storage
from pipeline.errors import StorageUnavailable
from pipeline.items import Item
from pipeline.media import MediaLoader
from pipeline.poison import CrashGuard, crash_message, inject_crash
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)
FETCH_THREADS = 16


@dataclass(frozen=True)
class DecodeSettings:
    """What the decode stage needs from the config; picklable."""
    model_path: str
    max_pixels: int
    max_video_pixels: int
    max_frames: int
    max_input_pixels: int
    opts: StorageOptions
    run_tag: str = ""           # keys the crash notes of this run (pipeline.poison)
    pdf_dpi: float = 0.0        # input.pdf_dpi (0: the model's pixel budget decides)

    @classmethod
    def from_config(cls, cfg, run_tag: str = "") -> "DecodeSettings":
        b = cfg.batching
        return cls(cfg.model.path, b.max_pixels, b.max_video_pixels, b.max_frames, b.max_input_pixels,
                   StorageOptions.from_config(cfg.storage), run_tag, cfg.input.pdf_dpi)


@functools.lru_cache(maxsize=4)
def _loader(model_path: str, max_pixels: int, max_video_pixels: int, max_frames: int,
            max_input_pixels: int) -> MediaLoader:
    # one per worker process: decode tasks reuse their worker, so the processor is loaded once
    return MediaLoader(model_path, max_pixels, max_video_pixels, max_frames, max_input_pixels)


@functools.lru_cache(maxsize=1)
def _fetch_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=FETCH_THREADS, thread_name_prefix="fetch")


def describe_error(uri: str, exc: BaseException, listed: bool) -> str:
    """One readable line naming the input and the cause; storage errors never carry credentials. `listed`: the
    item was found by listing, so a missing object was deleted since (a manifest may name one that never was)."""
    uri = storage.redact(uri)
    cause = getattr(exc, "cause", None)
    if cause:   # glmv.MediaError: its own source is '<bytes>', ours is the URI
        return f"{uri}: {storage.scrub(cause)}"
    if isinstance(exc, FileNotFoundError):
        return f"{uri}: object not found" + (" (deleted after listing?)" if listed else "")
    if isinstance(exc, PermissionError):
        return f"{uri}: permission denied"
    if storage.is_transient(exc):
        return f"{uri}: storage error after retries ({storage.describe(exc)})"
    return f"{uri}: {storage.describe(exc)}"


def _source(item: Item, opts: StorageOptions):
    """What the loader reads: bytes, or for a video a seekable handle opener (embedded bytes as a buffer)."""
    if item.data is not None:
        return io.BytesIO(item.data) if item.media_type == "video" else item.data
    if item.media_type == "video":
        return None   # opened when decoded, so the handle lives only as long as the decode
    return storage.read_bytes(item.uri, opts)


def _fetch(item: Item, opts: StorageOptions):
    """(source, None) or (None, the exception)."""
    try:
        return _source(item, opts), None
    except Exception as e:  # noqa: BLE001 - one object's failure is that item's error row (or an outage)
        return None, e


def fail(item: Item, exc: BaseException) -> Item:
    """Record why the item failed; a storage outage is flagged so that it is never recorded as done."""
    item.error, item.data = describe_error(item.uri, exc, item.listed()), None
    item.outage = isinstance(exc, StorageUnavailable) or storage.classify(exc) is storage.Fault.OUTAGE
    return item


def decode_one(item: Item, loader: MediaLoader, opts: StorageOptions, source=None,
               pages: pdf.Pages | None = None) -> Item:
    """Fill the media fields of one item (or its error), and drop its embedded bytes. `pages`: renders PDF pages."""
    data, item.data = item.data, None
    if item.error is not None:
        return item
    if item.media_type not in ("image", "video", "pdf"):
        item.error = f"{item.uri}: unsupported file type (extensions: images, videos and PDFs only)"
        return item
    try:
        if item.media_type == "pdf":
            loaded = loader.load("image", pages.image(item.uri, item.page, data))
        else:
            loaded = _load(item, loader, opts, source)
    except Exception as e:  # noqa: BLE001 - every failure of one item becomes that item's error row
        return fail(item, e)
    frames = np.ascontiguousarray(loaded.frames)
    item.width, item.height, item.duration_s, item.num_frames = (loaded.width, loaded.height, loaded.duration_s,
                                                                 loaded.num_frames)
    item.frames, item.frames_shape, item.meta = frames.tobytes(), list(frames.shape), json.dumps(loaded.meta)
    return item


def _load(item: Item, loader: MediaLoader, opts: StorageOptions, source):
    if source is not None:
        return loader.load(item.media_type, source)
    if item.media_type == "video":
        fs, path = storage.filesystem(item.uri, opts)

        def load_video():
            with fs.open(path, "rb") as f:
                return loader.load("video", f)

        return storage.fetch_with_retries(load_video, item.uri, opts)
    return loader.load(item.media_type, storage.read_bytes(item.uri, opts))


def decode_batch(batch: pa.Table, settings: DecodeSettings) -> pa.Table:
    s = settings
    loader = _loader(s.model_path, s.max_pixels, s.max_video_pixels, s.max_frames, s.max_input_pixels)
    todo = items_mod.from_table(batch)
    guard = CrashGuard(s.run_tag, "decode", [it.id for it in todo])
    image = loader.processor.image_settings   # its max_pixels counts an image as temporal_patch_size frames
    pages = pdf.Pages(s.opts, s.pdf_dpi, image.max_pixels // image.temporal_patch_size, s.max_input_pixels)
    # fetch every object of the block at once, then decode one by one as their bytes arrive
    fetched = list(_fetch_pool().map(
        lambda it: _fetch(it, s.opts) if it.error is None and it.media_type in ("image", "video") else (None, None),
        todo))
    with pages:
        for i, (item, (source, error)) in enumerate(zip(todo, fetched)):
            if error is not None:
                fail(item, error)
            elif guard.gave_up(str(i)):
                item.error, item.data = crash_message(item.uri, "decoding", guard.poisoned(str(i))), None
            else:
                guard.at(str(i))
                inject_crash("decode", item.uri)
                decode_one(item, loader, s.opts, source, pages)
    guard.finished()
    return items_mod.to_table(todo, items_mod.extra_columns(batch))
