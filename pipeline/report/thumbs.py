"""Small JPEG data URIs of the sampled media: one thumbnail per image, a strip of a few frames per video.

Only the sampled objects are opened; a video is read through a seekable handle and only the frames near a few
timestamps are decoded. Any failure (the file is gone, corrupt, huge) becomes a note, never an exception.

The media are users' files and their decoders native code: thumbnails() never decodes in the calling process (the
run's driver). A child process (`python -m pipeline.report.thumbs`) decodes them, a few at a time, and says when it
starts and finishes each one. When it dies (a decoder's segfault, an abort, the out-of-memory killer) or makes no
progress for `timeout` seconds, what it finished is kept, the items it had started are tried again one per child
(so that only the culprit is lost: its card says why), and the rest go to a new child.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageOps

from pipeline import storage
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

IMAGE_BOX = (320, 240)
FRAME_BOX = (160, 120)
STRIP_FRAMES = 4
MAX_PIXELS = 200_000_000      # header-checked before decoding: a thumbnail is not worth a decompression bomb
MAX_DECODED_PER_SEEK = 240    # frames decoded after one seek before giving up on reaching its timestamp
TIMEOUT_S = 60.0              # a child that finishes nothing for this long is stopped
MEDIA = ("image", "video", "pdf")
# A test hook, read only by the child: an item whose URI contains this text kills the child with SIGSEGV, as a
# crashing native decoder would.
FAULT_ENV = "GLMV_REPORT_THUMB_FAULT"


@dataclass
class Thumb:
    frames: list[str] = field(default_factory=list)   # data:image/jpeg;base64,... (a video: several)
    note: str = ""                                    # why there is no picture, or less than asked for


def thumbnails(items: list[tuple[str, str]], opts: StorageOptions, threads: int = 8,
               timeout: float = TIMEOUT_S) -> list[Thumb]:
    """One Thumb per (uri, media_type), in order, decoded in child processes (see the module's docstring)."""
    done: dict[int, Thumb] = {}
    pending = [i for i, (_, media) in enumerate(items) if media in MEDIA]
    for i, (_, media) in enumerate(items):
        if i not in pending:
            done[i] = Thumb(note="not an image or video")
    while pending:
        finished, failure, started = _child([(i, *items[i]) for i in pending], opts, threads, timeout)
        done.update(finished)
        if failure is None:
            break
        suspects = [i for i in pending if i in started and i not in done]
        if not finished and not suspects:   # the child failed before it started anything: it never will
            log.warning("report: thumbnails not made: %s", failure)
            done.update({i: Thumb(note=f"no preview: {failure}") for i in pending if i not in done})
            break
        for i in suspects:   # one per child: the one that fails again is the culprit
            alone, why, _ = _child([(i, *items[i])], opts, 1, timeout)
            if i not in alone:
                log.warning("report: no thumbnail of %s: %s", storage.redact(items[i][0]), why)
            done[i] = alone.get(i) or Thumb(note=f"no preview: {why or 'the preview process gave no answer'}")
        pending = [i for i in pending if i not in done]
    return [done.get(i, Thumb(note="no preview")) for i in range(len(items))]


def _child(batch: list[tuple[int, str, str]], opts: StorageOptions, threads: int,
           timeout: float) -> tuple[dict[int, Thumb], str | None, set[int]]:
    """Decode `batch` in a child process: (the thumbs it made, why it failed or None, the items it started)."""
    root = str(Path(__file__).resolve().parents[2])   # the folder holding the `pipeline` package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    request = json.dumps({"opts": dataclasses.asdict(opts), "threads": threads, "items": batch}).encode()
    done: dict[int, Thumb] = {}
    started: set[int] = set()
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline.report.thumbs"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=errors, env=env, cwd=root)
        try:
            proc.stdin.write(request)
            proc.stdin.close()
        except OSError:   # died at once: its exit status says why
            pass
        fd, buffer, last = proc.stdout.fileno(), b"", time.monotonic()
        failure = None
        while True:
            ready, _, _ = select.select([fd], [], [], max(0.0, last + timeout - time.monotonic()))
            if not ready:
                failure = f"no thumbnail made for {timeout:.0f}s: stopped"
                proc.kill()
                break
            chunk = os.read(fd, 1 << 16)
            if not chunk:
                break
            buffer += chunk
            *lines, buffer = buffer.split(b"\n")
            for line in lines:
                try:
                    message = json.loads(line)
                except ValueError:
                    continue
                if "start" in message:
                    started.add(message["start"])
                else:
                    done[message["done"]] = Thumb(message["frames"], message["note"])
                    last = time.monotonic()
        proc.stdout.close()
        code = proc.wait()
        if failure is None and (code != 0 or len(done) < len(batch)):
            failure = _why(code, errors)
    return done, failure, started


def _why(code: int, errors) -> str:
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"the decoder crashed ({name})"
    errors.seek(0)
    lines = errors.read().decode(errors="replace").strip().splitlines()
    return f"the preview process failed (exit {code}{': ' + lines[-1][:200] if lines else ''})"


def _serve() -> None:
    """The child: a request on stdin, one JSON line per item started and per item done on stdout."""
    request = json.loads(sys.stdin.buffer.read())
    opts = StorageOptions(**request["opts"])
    fault = os.environ.get(FAULT_ENV)
    lock = threading.Lock()
    answers = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)   # what a library prints goes to stderr, not into the answers

    def say(message: dict) -> None:
        with lock:
            answers.write(json.dumps(message) + "\n")
            answers.flush()

    def one(item) -> None:
        i, uri, media_type = item
        say({"start": i})
        if fault and fault in uri:
            os.kill(os.getpid(), signal.SIGSEGV)
        thumb = thumbnail(uri, media_type, opts)
        say({"done": i, "frames": thumb.frames, "note": thumb.note})

    with ThreadPoolExecutor(max_workers=max(1, request["threads"])) as pool:
        list(pool.map(one, request["items"]))
    answers.flush()
    os._exit(0)   # no interpreter teardown to wait for (native decoders' libraries take a while)


def thumbnail(uri: str, media_type: str, opts: StorageOptions) -> Thumb:
    if media_type not in MEDIA:
        return Thumb(note="not an image or video")
    if media_type == "pdf":
        return _pdf_page(uri, opts)
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


def _pdf_page(uri: str, opts: StorageOptions) -> Thumb:
    """The page a page item names, drawn to fit IMAGE_BOX (a document's error row: its first page, if any opens)."""
    from pipeline import pdf

    document, page = pdf.document_uri(uri), pdf.page_of(uri) or 1
    if "#" in document:   # a PDF inside a tar or Parquet shard
        return Thumb(note=f"no preview: {document.rsplit('#', 1)[0]} is a shard; its members are not previewed")
    try:
        with pdf.opened(document, None, opts) as doc:
            img = pdf.render_page(doc, page - 1, lambda w, h: min(IMAGE_BOX[0] / w, IMAGE_BOX[1] / h))
        return Thumb([_jpeg(img)])
    except Exception as e:  # noqa: BLE001 - untrusted documents: whatever goes wrong is shown, not raised
        return Thumb(note=f"no preview: {getattr(e, 'cause', None) or f'{type(e).__name__}: {e}'}"[:300])


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


if __name__ == "__main__":
    _serve()
