"""Helpers for the pipeline tests: an S3 endpoint (moto's server on 127.0.0.1), corpora with every kind of bad
file, configs, and readers of the output."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads

from pipeline.corpus import image_bytes, video_bytes

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing-secret-value",
          "AWS_DEFAULT_REGION": "us-east-1"}


_S3_WRITES = threading.Lock()


def _atomic_conditional_writes() -> None:
    """S3 evaluates If-None-Match / If-Match and applies the write as one step; moto's threaded server checks, then
    writes, so two PUTs with If-None-Match: * that arrive together can both succeed (seen as two holders of the output
    lease under load). Serialising moto's object writes and deletes gives the tests the store S3 is."""
    from moto.s3.responses import S3Response

    for name in ("put_object", "delete_object"):
        method = getattr(S3Response, name)
        if getattr(method, "_serialised", False):
            continue

        def serialised(self, *args, _method=method, **kwargs):
            with _S3_WRITES:
                return _method(self, *args, **kwargs)

        serialised._serialised = True
        setattr(S3Response, name, serialised)


@contextlib.contextmanager
def moto_s3():
    """An S3 endpoint URL served by moto in this process; credentials are fake and come from the environment."""
    from moto.server import ThreadedMotoServer

    _atomic_conditional_writes()
    os.environ.update(S3_ENV)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def s3fs_for(endpoint: str):
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, use_listings_cache=False)


def good_media(num_images: int = 20, num_videos: int = 3) -> dict[str, bytes]:
    """Relative path -> bytes: small images in every format, short videos in several containers."""
    files = {}
    exts = ["jpg", "png", "webp", "bmp", "gif", "tiff", "jpeg"]
    for i in range(num_images):
        ext = exts[i % len(exts)]
        fmt_ext = "jpg" if ext == "jpeg" else ext
        files[f"images/{'sub/' if i % 3 == 0 else ''}img_{i:02d}.{ext}"] = image_bytes(
            60 + 13 * (i % 6), 48 + 11 * (i % 5), seed=i, ext=fmt_ext)
    containers = ["mp4", "webm", "mkv"]
    for i in range(num_videos):
        files[f"videos/clip_{i}.{containers[i % 3]}"] = video_bytes(8 + 4 * i, fps=4, width=64, height=48,
                                                                    seed=50 + i, container=containers[i % 3])
    return files


def bad_media() -> dict[str, tuple[bytes, str]]:
    """Relative path -> (bytes, a word the error message must contain)."""
    good_video = video_bytes(24, fps=4, width=64, height=48, seed=7, container="webm")
    return {
        "bad/corrupt.jpg": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2, "image"),
        "bad/empty.png": (b"", "empty"),
        "bad/truncated.webm": (good_video[: len(good_video) * 6 // 10], "truncated"),
        "bad/liar.png": (b"this is a text file, not a png\n" * 20, "image"),
        "bad/huge.png": (image_bytes(300, 300, seed=3, ext="png"), "pixel"),   # over batching.max_input_pixels
    }


def write_local(root: Path, files: dict) -> None:
    for rel, data in files.items():
        if isinstance(data, tuple):
            data = data[0]
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)


def read_output(uri: str, endpoint: str | None = None):
    """The output as pyarrow.dataset sees it when pointed at the prefix (state folders skipped)."""
    if uri.startswith("s3://"):
        fs = s3fs_for(endpoint)
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        return pads.dataset(uri[len("s3://"):], format="parquet", filesystem=PyFileSystem(FSSpecHandler(fs))).to_table()
    return pads.dataset(uri, format="parquet").to_table()


def config_text(input_uri: str, output_uri: str, model_path: str, *, endpoint: str = "", tasks=("caption",),
                extra: str = "", run: dict | None = None, batching: dict | None = None) -> str:
    """A small run's config. `run`, `batching`: settings over these sections' (a TOML table may appear only once, so
    they are not for `extra`). One model call per block (block_items 0): tests time their faults by blocks."""
    run = {"tasks": list(tasks), "batch_size": 4, "max_new_tokens": 6, **(run or {})}
    batching = {"max_input_pixels": 80000, "block_items": 0, **(batching or {})}
    # a Ray of its own: "" would join any Ray already running on this machine (another test run's, say)
    ray_section = "" if "[ray]" in extra else '[ray]\naddress = "local"'
    return f"""
[input]
uri = "{input_uri}"
[output]
uri = "{output_uri}"
rows_per_file = 8
flush_seconds = 2.0
[model]
path = "{model_path}"
[run]
{_toml(run)}[batching]
{_toml(batching)}[storage]
endpoint_url = "{endpoint}"
retries = 2
retry_backoff_s = 0.05
{extra}
{ray_section}
"""


def _toml(settings: dict) -> str:
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in settings.items())   # JSON's scalars are TOML's


def run_job(config_path: Path, *overrides: str, timeout: float = 300, env: dict | None = None):
    cmd = [PY, str(REPO / "jobs" / "caption.py"), "--config", str(config_path)]
    for o in overrides:
        cmd += ["--set", o]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def kill_mid_run(cmd: list[str], out: Path, log_path: Path, files: int = 2) -> None:
    """Start the job in a session of its own, wait until `files` result files are under `out`, then kill -9 the
    driver and its whole local Ray; fails if the run ended first."""
    log = open(log_path, "w")
    first = subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        assert wait_for(lambda: len(list(out.glob("*.parquet"))) >= files or first.poll() is not None, timeout=240)
        assert first.poll() is None, log_path.read_text()[-3000:]
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        log.close()


def wait_for(predicate, timeout: float, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return False


def unchecked_strings(values: list[bytes]) -> pa.Array:
    """A string array of the bytes as they are, not UTF-8 ones included, as a writer that does not check makes."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    buffers = [None, pa.py_buffer(offsets), pa.py_buffer(b"".join(values))]
    return pa.Array.from_buffers(pa.string(), len(values), buffers)
