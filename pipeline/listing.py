"""What to process: media listed under a prefix, or rows of a manifest, streamed in blocks.

Listing runs inside a Ray read task (never in the driver) and yields blocks as it goes, so the corpus is never
held in one place. Each item gets a stable id derived from its URI, and only the (item, task) pairs that are not
in the done-set of earlier runs go on.
"""

from __future__ import annotations

import csv
import fnmatch
import hashlib
import io
import json
import os
from dataclasses import dataclass
from typing import Iterable, Iterator
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.config import IMAGE_EXTENSIONS, VIDEO_EXTENSIONS, Config, ConfigError
from pipeline.storage import StorageOptions

BLOCK_ROWS = 256
ITEM_SCHEMA = pa.schema([("id", pa.string()), ("uri", pa.string()), ("media_type", pa.string()),
                         ("prompt", pa.string()), ("tasks", pa.list_(pa.string()))])


def item_id(uri: str) -> str:
    """Stable id of an item: the same URI always gives the same id, on any machine and in any run."""
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def key_hash(ids: Iterable[str], task: Iterable[str]) -> np.ndarray:
    """uint64 key per (id, task) pair: the done-set holds these, 8 bytes a pair."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{i}\0{t}".encode(), digest_size=8).digest(), "little")
                        for i, t in zip(ids, task)), dtype=np.uint64)


def media_type_of(uri: str) -> str | None:
    """'image', 'video' or None, from the file extension (a lying extension is caught later, when decoding)."""
    name = urlsplit(uri).path.rsplit("/", 1)[-1] if "://" in uri else uri.rsplit("/", 1)[-1]  # no ?query
    ext = name.rsplit(".", 1)[-1].lower() if "." in name else ""
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


@dataclass(frozen=True)
class Source:
    """Everything a read task needs; picklable."""
    uri: str
    manifest: str
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    tasks: tuple[str, ...]
    manifest_prompt_task: str
    max_items: int
    opts: StorageOptions

    @classmethod
    def from_config(cls, cfg: Config) -> "Source":
        return cls(cfg.input.uri, cfg.input.manifest, tuple(cfg.input.include), tuple(cfg.input.exclude),
                   tuple(cfg.run.tasks), cfg.input.manifest_prompt_task, cfg.input.max_items,
                   StorageOptions.from_config(cfg.storage))


# --- listing a prefix ----------------------------------------------------------------------------------------


def _selected(rel: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return (any(fnmatch.fnmatch(rel, p) for p in include)
            and not any(fnmatch.fnmatch(rel, p) for p in exclude))


def _walk_local(root: str) -> Iterator[str]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            yield os.path.join(dirpath, name)


def _walk_s3(fs, root: str, page_size: int, opts: StorageOptions) -> Iterator[str]:
    """One page at a time, so a prefix of millions of objects is never listed in full."""
    bucket, _, key = root.partition("/")
    prefix = key.rstrip("/") + "/" if key else ""
    kwargs = {"Bucket": bucket, "Prefix": prefix, "MaxKeys": page_size}
    while True:
        page = storage.with_retries(lambda: fs.call_s3("list_objects_v2", **kwargs), f"s3://{root}", opts)
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield f"{bucket}/{obj['Key']}"
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _walk_fsspec(fs, root: str) -> Iterator[str]:
    for dirpath, _dirs, files in fs.walk(root):   # one directory at a time
        for name in sorted(files):
            yield f"{dirpath.rstrip('/')}/{name}"


def list_prefix(uri: str, opts: StorageOptions, page_size: int = 1000) -> Iterator[tuple[str, str]]:
    """(full URI, path relative to the prefix) of every object under a prefix."""
    fs, root = storage.filesystem(uri, opts)
    if storage.is_local(fs):
        if not os.path.isdir(root):
            raise ConfigError(f"input.uri: {uri} is not a folder")
        walk = _walk_local(root)
    elif storage.protocol_of(uri) in ("s3", "s3a"):
        walk = _walk_s3(fs, root, page_size, opts)
    else:
        walk = _walk_fsspec(fs, root)
    base = root.rstrip("/") + "/"
    for path in walk:
        yield storage.full_uri(fs, path), path[len(base):] if path.startswith(base) else path


# --- manifests -----------------------------------------------------------------------------------------------


def _manifest_format(uri: str) -> str:
    name = uri.lower().rsplit("/", 1)[-1]
    for ext, fmt in ((".parquet", "parquet"), (".csv", "csv"), (".jsonl", "jsonl"), (".json", "jsonl"),
                     (".ndjson", "jsonl")):
        if name.endswith(ext):
            return fmt
    raise ConfigError(f"input.manifest: {uri} must end in .parquet, .csv or .jsonl")


def _manifest_rows(uri: str, opts: StorageOptions) -> Iterator[dict]:
    fmt = _manifest_format(uri)
    fs, path = storage.filesystem(uri, opts)
    with fs.open(path, "rb") as f:
        if fmt == "parquet":
            pf = pq.ParquetFile(f)
            for batch in pf.iter_batches(batch_size=BLOCK_ROWS):
                yield from batch.to_pylist()
        elif fmt == "csv":
            yield from csv.DictReader(io.TextIOWrapper(f, encoding="utf-8", newline=""))
        else:
            for n, line in enumerate(io.TextIOWrapper(f, encoding="utf-8"), 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as e:
                        raise ConfigError(f"input.manifest: {uri} line {n} is not JSON: {e}") from None


def check_manifest(uri: str, opts: StorageOptions) -> None:
    """Fail early, in the driver, when a manifest is missing or has no `uri` column."""
    try:
        first = next(_manifest_rows(uri, opts), None)
    except FileNotFoundError:
        raise ConfigError(f"input.manifest: {uri} does not exist") from None
    if first is None:
        return
    if not isinstance(first, dict) or "uri" not in first:
        raise ConfigError(f"input.manifest: {uri} has no 'uri' column (first row: {first!r})")


def _resolve(uri: str, manifest: str) -> str:
    """Manifest URIs may be relative to the manifest's own folder."""
    if "://" in uri or os.path.isabs(uri) or "://" in manifest:
        return uri if ("://" in uri or os.path.isabs(uri)) else manifest.rsplit("/", 1)[0] + "/" + uri
    return os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(manifest)), uri))


# --- items with their pending tasks --------------------------------------------------------------------------


def iter_items(src: Source) -> Iterator[dict]:
    """Every item of the input: id, uri, media_type ('' when the extension is not a media type), prompt."""
    count = 0
    if src.manifest:
        for row in _manifest_rows(src.manifest, src.opts):
            raw = str(row.get("uri") or "").strip()
            if not raw:
                continue
            uri = _resolve(raw, src.manifest)
            prompt = row.get("prompt")
            yield {"id": item_id(uri), "uri": uri, "media_type": media_type_of(uri) or "",
                   "prompt": prompt if isinstance(prompt, str) else ""}
            count += 1
            if src.max_items and count >= src.max_items:
                return
    else:
        for uri, rel in list_prefix(src.uri, src.opts):
            kind = media_type_of(uri)
            if kind is None or not _selected(rel, src.include, src.exclude):
                continue   # a listing only picks media files; manifests say explicitly what they want
            yield {"id": item_id(uri), "uri": uri, "media_type": kind, "prompt": ""}
            count += 1
            if src.max_items and count >= src.max_items:
                return


def pending_blocks(src: Source, done: np.ndarray, tally=None) -> Iterator[pa.Table]:
    """Blocks of items with the tasks still to do; `done` is a sorted uint64 array of finished (id, task) keys."""
    rows: list[dict] = []
    skipped = 0

    def flush():
        nonlocal rows, skipped
        if tally is not None and skipped:
            tally.add.remote("skipped", skipped)
        skipped = 0
        if rows:
            block, rows = pa.Table.from_pylist(rows, schema=ITEM_SCHEMA), []
            return block
        return None

    for item in iter_items(src):
        tasks = list(src.tasks)
        if item["prompt"]:
            tasks.append(src.manifest_prompt_task)
        keys = key_hash([item["id"]] * len(tasks), tasks)
        pos = np.searchsorted(done, keys)
        is_done = (pos < len(done)) & (done[np.minimum(pos, len(done) - 1)] == keys) if len(done) else \
            np.zeros(len(tasks), bool)
        skipped += int(is_done.sum())
        todo = [t for t, d in zip(tasks, is_done) if not d]
        if todo:
            rows.append({**item, "tasks": todo})
        if len(rows) >= BLOCK_ROWS:
            yield flush()
    block = flush()
    if block is not None:
        yield block
