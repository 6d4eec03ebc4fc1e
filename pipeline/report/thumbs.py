"""Small JPEG data URIs of the sampled media: one thumbnail per image, a strip of a few frames per video.

Only the sampled objects are opened; a video is read through a seekable handle and only the frames near a few
timestamps are decoded. Any failure (the file is gone, corrupt, huge) becomes a note, never an exception.
"""

from __future__ import annotations

import base64
import io
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from pipeline import storage
from pipeline.storage import StorageOptions

IMAGE_BOX = (320, 240)
FRAME_BOX = (160, 120)
STRIP_FRAMES = 4
MAX_PIXELS = 200_000_000      # header-checked before decoding: a thumbnail is not worth a decompression bomb
MAX_DECODED_PER_SEEK = 240    # frames decoded after one seek before giving up on reaching its timestamp


@dataclass
class Thumb:
    frames: list[str] = field(default_factory=list)   # data:image/jpeg;base64,... (a video: several)
    note: str = ""                                    # why there is no picture, or less than asked for


def thumbnails(items: list[tuple[str, str]], opts: StorageOptions, threads: int = 8) -> list[Thumb]:
    """One Thumb per (uri, media_type), in order."""
    with ThreadPoolExecutor(max_workers=threads) as pool:
        return list(pool.map(lambda item: thumbnail(*item, opts), items))


def thumbnail(uri: str, media_type: str, opts: StorageOptions) -> Thumb:
    if media_type not in ("image", "video"):
        return Thumb(note="not an image or video")
    try:
        fs, path = storage.filesystem(uri, opts)
        with storage.with_retries(lambda: fs.open(path, "rb"), uri, opts) as handle:
            if media_type == "image":
                return Thumb([_jpeg(_image(handle))])
            return _video_strip(handle)
    except Exception as e:  # noqa: BLE001 - untrusted media: whatever goes wrong is shown, not raised
        if isinstance(e, FileNotFoundError) and "#" in uri:   # an item inside a tar or Parquet shard
            return Thumb(note=f"no preview: {uri.rsplit('#', 1)[0]} is a shard; its members are not previewed")
        return Thumb(note=f"no preview: {type(e).__name__}: {e}"[:300])


def _jpeg(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.convert("RGB").save(buf, format="JPEG", quality=72, optimize=True)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _image(handle) -> Image.Image:
    img = Image.open(handle)
    if img.width * img.height > MAX_PIXELS:
        raise ValueError(f"{img.width}x{img.height} is too large to preview")
    img.draft("RGB", IMAGE_BOX)   # JPEG: decode at a reduced scale
    img = ImageOps.exif_transpose(img)   # as the model saw it, so that boxes land where they belong
    img.thumbnail(IMAGE_BOX)
    return img


def _video_strip(handle) -> Thumb:
    import av

    if _is_empty(handle):   # av.open would fail with a bare "Invalid argument"
        return Thumb(note="no preview: empty file (0 bytes)")
    frames: list[str] = []
    note = ""
    with av.open(handle, mode="r", metadata_errors="ignore") as container:
        if not container.streams.video:
            held = ", ".join(sorted({s.type for s in container.streams})) or "no stream at all"
            return Thumb(note=f"no preview: no video stream in the file ({held})")
        stream = container.streams.video[0]
        duration = _duration(container, stream)
        for k in range(STRIP_FRAMES):
            t = duration * (k + 0.5) / STRIP_FRAMES if duration else 0.0
            try:
                frame = _frame_at(container, stream, t)
            except av.error.FFmpegError as e:
                note = f"decoding stopped: {e.strerror or e}"
                break
            if frame is None:
                break
            img = frame.to_image()
            img.thumbnail(FRAME_BOX)
            frames.append(_jpeg(img))
            if not duration:   # unknown length: one frame is all that can be placed
                break
    if not frames and not note:
        note = "no frame could be decoded"
    return Thumb(frames, note)


def _is_empty(handle) -> bool:
    try:
        here = handle.tell()
        empty = handle.seek(0, io.SEEK_END) == 0
        handle.seek(here)
        return empty
    except (OSError, AttributeError, ValueError):   # not seekable: av.open says what is wrong
        return False


def _duration(container, stream) -> float:
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    if container.duration:
        return container.duration / 1_000_000
    return 0.0


def _frame_at(container, stream, t: float):
    """The first frame at or after t seconds (or the last one before the stream ends)."""
    if t > 0 and stream.time_base:
        container.seek(int(t / stream.time_base), stream=stream, backward=True, any_frame=False)
    last = None
    for n, frame in enumerate(container.decode(stream)):
        last = frame
        if frame.time is None or frame.time >= t or n >= MAX_DECODED_PER_SEEK:
            break
    return last
