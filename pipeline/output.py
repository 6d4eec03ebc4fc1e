"""Results as Parquet files under the output URI, and the done-set a resumed run starts from.

Exactly-once without a separate commit log: a result file appears only whole (staged then renamed, or one object
upload), so the result files themselves are the record of what is done. Run state (staging files, run records)
lives under `_state/`, which pandas, duckdb and pyarrow.dataset skip because of the leading underscore.
"""

from __future__ import annotations

import io
import json
import logging
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.listing import key_hash
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

STATE_DIR = "_state"
BOX = pa.struct([("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()), ("y2", pa.float64())])
SCHEMA = pa.schema([
    ("id", pa.string()),                  # stable item id: sha256 of the URI, 32 hex chars
    ("uri", pa.string()),
    ("media_type", pa.string()),          # image | video ('' when the extension is neither)
    ("task", pa.string()),
    ("prompt", pa.string()),              # the user prompt sent with the media
    ("text", pa.string()),                # generated text, special tokens removed
    ("thinking", pa.string()),            # <think> ... </think> part, '' if none
    ("answer", pa.string()),              # the answer part (<answer> ... </answer>, or the text after </think>)
    ("boxes", pa.list_(BOX)),             # grounding boxes on the model's 0-1000 scale
    ("error", pa.string()),               # null when the row succeeded; else what went wrong with which input
    ("num_input_tokens", pa.int32()),
    ("num_output_tokens", pa.int32()),
    ("finish_reason", pa.string()),       # eos | length | error
    ("width", pa.int32()),                # original media size
    ("height", pa.int32()),
    ("duration_s", pa.float64()),         # videos only
    ("num_frames", pa.int32()),           # frames given to the model (1 for images)
    ("model", pa.string()),
    ("run_config_hash", pa.string()),
    ("processed_at", pa.timestamp("us", tz="UTC")),
])


def error_row(item: dict, task: str, prompt: str, message: str, model: str, config_hash: str) -> dict:
    """The output row for an (item, task) that could not be processed."""
    return {"id": item["id"], "uri": item["uri"], "media_type": item.get("media_type", ""), "task": task,
            "prompt": prompt, "text": "", "thinking": "", "answer": "", "boxes": [], "error": message,
            "num_input_tokens": 0, "num_output_tokens": 0, "finish_reason": "error",
            "width": item.get("width"), "height": item.get("height"), "duration_s": item.get("duration_s"),
            "num_frames": item.get("num_frames"), "model": model, "run_config_hash": config_hash,
            "processed_at": datetime.now(timezone.utc)}


def _result_files(fs, root: str) -> list[str]:
    """Result files directly under the output prefix (state and hidden files excluded)."""
    if not fs.exists(root):
        return []
    return sorted(p for p in fs.ls(root, detail=False)
                  if p.endswith(".parquet") and not p.rsplit("/", 1)[-1].startswith(("_", ".")))


def reopen_errors(uri: str, opts: StorageOptions, staging: str) -> int:
    """Remove the error rows from the result files so those (item, task) pairs are pending again; returns how many.

    Each file is replaced whole by its rows without errors (or deleted when nothing is left), so a kill at any
    moment leaves every pair either still recorded (as an error, retried by the next such run) or pending, never
    twice."""
    fs, root = storage.filesystem(uri, opts)
    reopened = 0
    for path in _result_files(fs, root):
        errors = storage.with_retries(lambda: pq.read_table(path, columns=["error"], filesystem=fs), path, opts)
        n = len(errors) - errors["error"].null_count
        if not n:
            continue
        table = storage.with_retries(lambda: pq.read_table(path, filesystem=fs), path, opts)
        kept = table.filter(table["error"].is_null())
        if len(kept):
            sink = io.BytesIO()
            pq.write_table(kept.cast(SCHEMA), sink, compression="zstd")
            data = sink.getvalue()
            storage.with_retries(lambda: storage.write_atomic(fs, path, data, staging), path, opts)
        else:
            storage.with_retries(lambda: fs.rm(path), path, opts)
        reopened += n
    return reopened


def load_done(uri: str, opts: StorageOptions) -> np.ndarray:
    """Sorted uint64 keys of every (id, task) already in the output."""
    fs, root = storage.filesystem(uri, opts)

    def keys_of(path: str) -> np.ndarray:
        table = storage.with_retries(lambda: pq.read_table(path, columns=["id", "task"], filesystem=fs), path,
                                     opts)
        return key_hash(table["id"].to_pylist(), table["task"].to_pylist())

    # files are read concurrently: on an object store a resumed run may have 1e5 files, each one round trip
    with ThreadPoolExecutor(max_workers=16) as pool:
        keys = list(pool.map(keys_of, _result_files(fs, root)))
    return np.unique(np.concatenate(keys)) if keys else np.zeros(0, np.uint64)


class ResultWriter:
    """Buffers rows and writes them as whole zstd Parquet files; the only writer of a run (it lives in the
    driver), so no two workers ever race on one (item, task)."""

    def __init__(self, uri: str, opts: StorageOptions, rows_per_file: int, flush_seconds: float):
        self.fs, self.root = storage.filesystem(uri, opts)
        self.uri, self.opts = uri, opts
        self.rows_per_file, self.flush_seconds = rows_per_file, flush_seconds
        if storage.is_object_store(self.fs, self.root):
            # makedirs on an object store would create a missing bucket: a typo must not make a new bucket
            bucket = self.root.strip("/").split("/")[0]
            if not storage.with_retries(lambda: self.fs.exists(bucket), uri, opts):
                raise ConfigError(f"output.uri {uri}: bucket {bucket!r} does not exist or is not accessible")
        else:
            self.fs.makedirs(self.root, exist_ok=True)
        self.staging = f"{self.root.rstrip('/')}/{STATE_DIR}/staging"
        self.run_tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.buffer: list[dict] = []
        self.oldest = 0.0
        self.files = 0
        self.rows = 0
        self.written: set[int] = set()   # keys written by this run: a row delivered twice is written once

    def add(self, rows: list[dict]) -> None:
        if not rows:
            return
        keys = key_hash([r["id"] for r in rows], [r["task"] for r in rows])
        fresh = [r for r, k in zip(rows, keys.tolist()) if k not in self.written]
        self.written.update(keys.tolist())
        if fresh and not self.buffer:
            self.oldest = time.monotonic()
        self.buffer.extend(fresh)
        while len(self.buffer) >= self.rows_per_file:
            self._write(self.buffer[: self.rows_per_file])
            self.buffer = self.buffer[self.rows_per_file:]
            self.oldest = time.monotonic()
        if self.buffer and time.monotonic() - self.oldest >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self._write(self.buffer)
            self.buffer = []

    def _write(self, rows: list[dict]) -> None:
        table = pa.Table.from_pylist(rows, schema=SCHEMA)
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        path = f"{self.root.rstrip('/')}/part-{self.run_tag}-{self.files:06d}.parquet"
        data = sink.getvalue()
        storage.with_retries(lambda: storage.write_atomic(self.fs, path, data, self.staging), path, self.opts)
        self.files += 1
        self.rows += len(rows)

    def write_run_record(self, record: dict) -> None:
        """Provenance of this run (config without credentials, counts) under _state/runs/."""
        path = f"{self.root.rstrip('/')}/{STATE_DIR}/runs/{self.run_tag}.json"
        data = json.dumps(record, indent=2, default=str).encode()
        storage.with_retries(lambda: storage.write_atomic(self.fs, path, data, self.staging), path, self.opts)
