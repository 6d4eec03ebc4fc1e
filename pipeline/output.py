"""Results as Parquet files under the output URI.

A result file appears only whole (staged then renamed, or one object upload), so a reader never sees a partial
one, and what is done is what the files hold (`pipeline.progress` keeps the records that make a restart cheap).
Run state lives under `_state/`, which pandas, duckdb and pyarrow.dataset skip because of the leading underscore.
"""

from __future__ import annotations

import io
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import filestats, storage
from pipeline.config import ConfigError
from pipeline.errors import StorageUnavailable
from pipeline.items import KEPT, key_hash
from pipeline.state import STATE_DIR
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

BOX = pa.struct([("x1", pa.float64()), ("y1", pa.float64()), ("x2", pa.float64()), ("y2", pa.float64())])
SCHEMA = pa.schema([
    ("id", pa.string()),                  # stable item id: sha256 of the URI, 32 hex chars
    ("uri", pa.string()),
    ("media_type", pa.string()),          # image | video | pdf (one page) ('' when the extension is none)
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
    ("page", pa.int32()),                 # PDFs: the page (1-based; uri ends "#page=<n>"), else null
    ("num_pages", pa.int32()),            # PDFs: the document's pages (0: none), else null
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
            "num_frames": item.get("num_frames"), "page": item.get("page"), "num_pages": item.get("num_pages"),
            "model": model, "run_config_hash": config_hash,
            "processed_at": datetime.now(timezone.utc)}


def output_schema(key_column: bool, extra: pa.Schema | None) -> pa.Schema:
    """The result files' columns: the fixed ones, then `key` (tar shards, Parquet inputs), then the columns kept
    from the input (`input.keep_columns`), typed as there."""
    fields = list(SCHEMA)
    if key_column:
        fields.append(pa.field("key", pa.string()))
    for f in extra or []:
        if f.name in {x.name for x in fields}:
            raise ConfigError(f"input.keep_columns: {f.name!r} is already an output column")
        fields.append(f)
    return pa.schema(fields)


NOT_OURS = "not a result file of this pipeline"
FOREIGN_NAME = f"{NOT_OURS} (foreign name)"
RESULT_NAME = re.compile(r"part-\d{8}-\d{6}-[0-9a-f]{8}-\d{6}\.parquet")   # part-<run tag>-<n>.parquet


PARTITION = re.compile(r"([A-Za-z0-9_]+)=([A-Za-z0-9_.-]*)")    # a hive folder: task=caption


def is_ours(name: str) -> bool:
    """Named as a run of ours names its result files (anything else under the prefix is someone else's)."""
    *folders, base = name.split("/")
    return RESULT_NAME.fullmatch(base) is not None and all(PARTITION.fullmatch(f) for f in folders)


def partition_values(name: str) -> dict[str, str]:
    """The hive folders a result file's name is in ({"task": "caption"} for task=caption/part-...)."""
    return dict(m.groups() for m in map(PARTITION.fullmatch, name.split("/")[:-1]) if m)


def partition_folder(table: pa.Table, columns: tuple[str, ...]) -> str:
    """'task=caption/' for rows of one task when partitioned by task ('' when not partitioned)."""
    return "".join(f"{c}={table[c][0].as_py()}/" for c in columns)


def with_partitions(table: pa.Table, name: str) -> pa.Table:
    """A result file's rows with the columns its folders hold (written as folders, not in the file)."""
    for column, value in partition_values(name).items():
        if column not in table.column_names:
            table = table.append_column(column, pa.array([value] * table.num_rows, pa.string()))
    return table


def read_result(fs, root: str, name: str, opts: StorageOptions, columns: list[str] | None = None) -> pa.Table:
    """A result file's rows (these columns), partition columns included; storage errors retried."""
    path = f"{root.rstrip('/')}/{name}"
    held = [c for c in columns if c not in partition_values(name)] if columns is not None else None
    table = storage.with_retries(lambda: pq.read_table(path, columns=held, filesystem=fs), path, opts)
    return with_partitions(table, name)


def read_result_schema(fs, root: str, name: str, opts: StorageOptions) -> pa.Schema:
    path = f"{root.rstrip('/')}/{name}"
    return schema_with_partitions(storage.with_retries(lambda: pq.read_schema(path, filesystem=fs), path, opts), name)


def schema_with_partitions(schema: pa.Schema, name: str) -> pa.Schema:
    """A result file's schema with the columns its folders hold."""
    for column in partition_values(name):
        if schema.get_field_index(column) < 0:
            schema = schema.append(pa.field(column, pa.string()))
    return schema


def schema_mismatch(schema: pa.Schema) -> str:
    """Why a file with this schema is not a result file of ours ('' when it has every output column, typed as
    written): a file of someone else's named like ours must not be read as ours."""
    for f in SCHEMA:
        i = schema.get_field_index(f.name)
        if i < 0:
            return f"no column {f.name!r}"
        if not schema.field(i).type.equals(f.type):
            return f"column {f.name!r} is {schema.field(i).type}, not {f.type}"
    return ""


def result_files(fs, root: str, opts: StorageOptions) -> list[str]:
    """Names of the result files under the output prefix (state and hidden files excluded)."""
    return sorted(listed_files(fs, root, opts))


def listed_files(fs, root: str, opts: StorageOptions) -> dict[str, int]:
    """The result files under the output prefix (directly, or in hive folders `task=caption/`) and their sizes,
    by name relative to the prefix, from one listing per folder (one LIST request per 1,000 files on S3)."""
    def ls(folder: str) -> list[dict]:
        try:
            return fs.ls(folder, detail=True)
        except FileNotFoundError:
            return []

    found, folders = {}, [""]
    while folders:
        folder = folders.pop()
        for info in storage.with_retries(lambda: ls(f"{root.rstrip('/')}/{folder}".rstrip("/")), root, opts):
            base = info["name"].rstrip("/").rsplit("/", 1)[-1]
            if base.startswith(("_", ".")):
                continue
            if info.get("type") == "directory":
                if PARTITION.fullmatch(base):
                    folders.append(f"{folder}{base}/")
            elif base.endswith(".parquet"):
                found[f"{folder}{base}"] = int(info["size"])
    return found


def digest(keys: np.ndarray) -> int:
    """Order-free digest of (id, task) keys: a merge of files has the sum of theirs (mod 2**64)."""
    return int(np.sum(keys, dtype=np.uint64))


def manifest_row(table: pa.Table, size: int, shards: list[str], run: str = "") -> dict:
    """What `pipeline.manifest` keeps of a result file about to be written (its bytes are `size` long), with the
    summary of its rows the run report reads instead of the rows (`pipeline.filestats`; `run`: the writing run)."""
    keys = key_hash(table["id"].to_pylist(), table["task"].to_pylist())
    return {"size": size, "rows": table.num_rows, "digest": digest(keys), "shards": sorted(shards),
            "tasks": sorted(pc.unique(table["task"]).to_pylist()),
            "stats": filestats.dumps(filestats.summarize(table, run))}


def files_with_errors(uri: str, opts: StorageOptions, names: list[str]) -> list[str]:
    """Which of these result files hold error rows (their `error` column read, 16 at a time)."""
    fs, root = storage.filesystem(uri, opts)
    arrow_fs = storage.arrow_filesystem(fs)

    def has_errors(name: str) -> bool:
        path = f"{root.rstrip('/')}/{name}"
        errors = storage.with_retries(lambda: pq.read_table(path, columns=["error"], filesystem=arrow_fs), path,
                                      opts)
        return errors["error"].null_count < len(errors)

    with ThreadPoolExecutor(max_workers=16) as pool:
        return [n for n, has in zip(names, pool.map(has_errors, names)) if has]


def reopen_errors(uri: str, opts: StorageOptions, staging: str, names: list[str] | None = None,
                  before_rewrite=None) -> int:
    """Remove the error rows from these result files (by default: every result file holding any) so those (item,
    task) pairs are pending again; returns how many.

    Each file is replaced whole by its rows without errors (or deleted when nothing is left), so a kill at any
    moment leaves every pair either still recorded (as an error, retried by the next such run) or pending, never
    twice. `before_rewrite(name, kept)` is called before a file changes (kept: its rows left, None when it goes)."""
    fs, root = storage.filesystem(uri, opts)
    reopened, arrow_fs = 0, storage.arrow_filesystem(fs)
    if names is None:
        names = files_with_errors(uri, opts, result_files(fs, root, opts))
    for name in names:
        path = f"{root.rstrip('/')}/{name}"
        table = storage.with_retries(lambda: pq.read_table(path, filesystem=arrow_fs), path, opts)
        kept = table.filter(table["error"].is_null())
        n = len(table) - len(kept)
        if not n:
            continue
        data = None
        if len(kept):
            sink = io.BytesIO()
            pq.write_table(kept, sink, compression="zstd")
            data = sink.getvalue()
        if before_rewrite is not None:
            before_rewrite(name, None if data is None else (with_partitions(kept, name), len(data)))
        if data is not None:
            storage.with_retries(lambda: storage.write_atomic(fs, path, data, staging), path, opts)
        else:
            storage.with_retries(lambda: fs.rm(path), path, opts)
        reopened += n
    return reopened


class ResultWriter:
    """Buffers result blocks and writes them as whole zstd Parquet files; the only writer of a run (it lives in
    the driver), so no two workers ever race on one (item, task).

    Blocks carry a `_shard` column (where each row's item was read from), which is not written: before each file
    `note_file(name, manifest_row)` is called (the ledger's sidecar), after it `committed(name)` and
    `landed({shard: rows})`."""

    def __init__(self, uri: str, opts: StorageOptions, rows_per_file: int, flush_seconds: float,
                 schema: pa.Schema = SCHEMA, note_file=None, landed=None, committed=None,
                 partition_by: tuple[str, ...] = ()):
        self.fs, self.root = storage.filesystem(uri, opts)
        self.uri, self.opts, self.schema = uri, opts, schema
        self.partition_by = tuple(partition_by)
        self.rows_per_file, self.flush_seconds = rows_per_file, flush_seconds
        self.note_file, self.landed, self.committed = note_file, landed, committed
        self.staging = f"{self.root.rstrip('/')}/{STATE_DIR}/staging"
        if storage.is_object_store(self.fs, self.root):
            # makedirs on an object store would create a missing bucket: a typo must not make a new bucket
            bucket = self.root.strip("/").split("/")[0]
            if not storage.bucket_exists(self.fs, bucket, opts):
                raise ConfigError(f"output.uri {uri}: bucket {bucket!r} does not exist or is not accessible")
        else:
            self._check_writable()
        self.run_tag = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        self.buffer: list[pa.Table] = []
        self.buffered = 0
        self.oldest = 0.0
        self.files = 0
        self.rows = 0

    def _check_writable(self) -> None:
        """Make the output folder and write a file in it, before anything starts: a read-only file system or a
        folder of another user's (EACCES) stops the run in one line, not in a traceback from its first write."""
        probe = f"{self.staging}/{uuid.uuid4().hex}.probe"   # the staging folder is emptied at every start

        def write_probe():
            self.fs.makedirs(self.staging, exist_ok=True)
            self.fs.pipe_file(probe, b"")
            self.fs.rm_file(probe)

        try:
            storage.with_retries(write_probe, self.uri, self.opts)
        except (OSError, StorageUnavailable) as e:
            cause = e.cause if isinstance(e, StorageUnavailable) else storage.describe(e)
            raise StorageUnavailable(storage.scrub(self.uri), f"the output folder cannot be created or written "
                                                              f"({cause})") from None

    def _store(self, path: str, data: bytes) -> None:
        try:
            storage.with_retries(lambda: storage.write_atomic(self.fs, path, data, self.staging), path, self.opts)
        except OSError as e:   # denied (EACCES is "about one file" when reading input): here it is the output's
            raise StorageUnavailable(storage.scrub(path), storage.describe(e)) from e

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if not self.buffer:
            self.oldest = time.monotonic()
        self.buffer.append(table)
        self.buffered += table.num_rows
        while self.buffered >= self.rows_per_file:
            rows = pa.concat_tables(self.buffer)
            self._write(rows.slice(0, self.rows_per_file))
            rest = rows.slice(self.rows_per_file)
            self.buffer, self.buffered = ([rest] if rest.num_rows else []), rest.num_rows
            self.oldest = time.monotonic()
        if self.buffer and time.monotonic() - self.oldest >= self.flush_seconds:
            self.flush()

    def flush(self) -> None:
        if self.buffer:
            self._write(pa.concat_tables(self.buffer))
            self.buffer, self.buffered = [], 0

    def _project(self, rows: pa.Table) -> pa.Table:
        """The output columns from a result block: `key` from the item's `_key`, kept ones from "input:<name>"."""
        names = rows.column_names

        def source(name: str) -> str:
            if KEPT + name in names:
                return KEPT + name
            return "_key" if name == "key" and "_key" in names else name

        def column(name: str, type_: pa.DataType):
            values = rows[source(name)].cast(type_)
            # the one place every written row passes: an item URL's password or signature never lands in a file
            return storage.redact_column(values) if name in ("uri", "error") else values

        table = pa.Table.from_arrays([column(f.name, f.type) for f in self.schema], schema=self.schema)
        # pyarrow writes invalid strings (text that is not UTF-8) as they are, and then no reader can open the file;
        # the readers mend input text, so this is a bug: stop before the output is spoiled
        table.validate(full=True)
        return table

    def _write(self, rows: pa.Table) -> None:
        """One file, or with `partition_by` one file per hive folder the rows fall in."""
        shards = rows["_shard"] if "_shard" in rows.column_names else None
        table = self._project(rows)
        if not self.partition_by:
            self._write_file(table, shards)
            return
        for values in table.group_by(list(self.partition_by)).aggregate([]).to_pylist():
            mask = None
            for column, value in values.items():
                equal = pc.equal(table[column], value)
                mask = equal if mask is None else pc.and_(mask, equal)
            self._write_file(table.filter(mask), shards.filter(mask) if shards is not None else None)

    def _write_file(self, table: pa.Table, shards: pa.ChunkedArray | None) -> None:
        """Partition columns are in the folder's name, not in the file (readers add them from the folder, and
        refuse a column that is in both)."""
        sink = io.BytesIO()
        pq.write_table(table.drop_columns(list(self.partition_by)), sink, compression="zstd")
        name = f"{partition_folder(table, self.partition_by)}part-{self.run_tag}-{self.files:06d}.parquet"
        path = f"{self.root.rstrip('/')}/{name}"
        counts = {}
        if shards is not None:
            counts = {c["values"]: c["counts"] for c in pc.value_counts(shards).to_pylist()}
        data = sink.getvalue()
        if self.note_file is not None:
            self.note_file(name, manifest_row(table, len(data), list(counts), self.run_tag))
        self._store(path, data)
        if self.committed is not None:
            self.committed(name)
        self.files += 1
        self.rows += table.num_rows
        if self.landed is not None:
            self.landed(counts)

    def write_run_record(self, record: dict) -> None:
        """Provenance of this run (config without credentials, counts) under _state/runs/."""
        path = f"{self.root.rstrip('/')}/{STATE_DIR}/runs/{self.run_tag}.json"
        self._store(path, json.dumps(record, indent=2, default=str).encode())
