"""The item record: one typed row per media item, from the input readers through decoding to the model actors.

Readers fill the identity fields (and `data` when the media is embedded in the input: tar shards, Parquet
bytes); the decode stage fills the media fields and drops `data`; the model actor turns an item into one output
row per task. Columns the user keeps from the input (`input.keep_columns`) ride along after these fields, typed
as in the input. Ids are stable: the same URI gives the same id on any machine and in any run.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import posixpath
from dataclasses import dataclass, field
from typing import Iterable
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import pyarrow as pa

from pipeline.config import IMAGE_EXTENSIONS, PDF_EXTENSIONS, VIDEO_EXTENSIONS

ITEM_SCHEMA = pa.schema([
    ("id", pa.string()),                # first 32 hex digits of the SHA-256 of the canonical URI
    ("uri", pa.string()),
    ("media_type", pa.string()),        # image | video | pdf (one page) | '' (none: becomes an error row)
    ("prompt", pa.string()),            # a manifest row's own prompt, or ''
    ("tasks", pa.list_(pa.string())),   # the tasks still to run for this item
    ("shard", pa.string()),             # the unit of resume the item was read from
    ("key", pa.string()),               # sample key (webdataset, Parquet with embedded bytes), else null
    ("data", pa.large_binary()),        # embedded media bytes, or null: the decode stage fetches `uri`
    ("error", pa.string()),             # set when the item cannot be processed: "<uri>: <cause>"
    ("outage", pa.bool_()),             # the error is not about this item (storage down): never recorded as done
    ("width", pa.int32()),              # original media size
    ("height", pa.int32()),
    ("duration_s", pa.float64()),
    ("num_frames", pa.int32()),
    ("frames", pa.large_binary()),      # (T, H, W, 3) uint8, decoded and resized to the model's grid
    ("frames_shape", pa.list_(pa.int32())),
    ("meta", pa.string()),              # JSON of the media loader's metadata (timestamps, fps, ...)
    ("page", pa.int32()),               # a PDF page's number (1-based; its uri ends "#page=<n>"), else null
    ("num_pages", pa.int32()),          # pages of that PDF (0: it has none), else null
])
FIELDS = tuple(ITEM_SCHEMA.names)
KEPT = "input:"   # kept input columns travel as "input:<name>", so no input column can shadow an item field
LISTED = "listing:"   # the shards of a listed prefix start so (readers.Unit.id), those of a named file never


@dataclass
class Item:
    id: str
    uri: str
    media_type: str
    prompt: str = ""
    tasks: list[str] = field(default_factory=list)
    shard: str = ""
    key: str | None = None
    data: bytes | None = None
    error: str | None = None
    outage: bool = False
    width: int | None = None
    height: int | None = None
    duration_s: float | None = None
    num_frames: int | None = None
    frames: bytes | None = None
    frames_shape: list[int] | None = None
    meta: str | None = None
    page: int | None = None
    num_pages: int | None = None

    def listed(self) -> bool:
        """Found by listing a prefix, rather than named by a manifest or held in a shard."""
        return self.shard.startswith(LISTED)

    def frames_array(self) -> np.ndarray:
        """The (T, H, W, 3) uint8 frames of a decoded item."""
        # a private, writable copy: torch refuses to wrap read-only Arrow buffers without a warning
        return np.frombuffer(self.frames, dtype=np.uint8).reshape(self.frames_shape).copy()


# from_table builds items by position: the block's columns and the dataclass's fields are one list
assert FIELDS == tuple(f.name for f in dataclasses.fields(Item)), "ITEM_SCHEMA and Item name other fields"


def from_table(table: pa.Table) -> list[Item]:
    # a column at a time and positional: twice as fast as a dict per row (a model actor's share of the machinery)
    return [Item(*values) for values in zip(*(table[name].to_pylist() for name in FIELDS))]


def to_table(items: list[Item], extra: pa.Table | None = None) -> pa.Table:
    """Items as a block; `extra` holds the kept input columns, one row per item."""
    table = pa.Table.from_pylist([dataclasses.asdict(i) for i in items], schema=ITEM_SCHEMA)
    if extra is not None:
        for name in extra.column_names:
            table = table.append_column(extra.schema.field(name), extra[name])
    return table


def extra_columns(table: pa.Table) -> pa.Table | None:
    """The kept input columns of a block ("input:<name>")."""
    names = [n for n in table.column_names if n.startswith(KEPT)]
    return table.select(names) if names else None


# --- identity ------------------------------------------------------------------------------------------------


def canonical_uri(uri: str) -> str:
    """One spelling per object: local paths absolute and normalised (`file://` stripped, `..` resolved), URL
    paths with `.`/`..` segments resolved. The item id is derived from this, so two spellings of one file are
    one item."""
    if uri.startswith("file://"):
        uri = urlsplit(uri).path or "/"
    if "://" not in uri:
        return os.path.abspath(uri)
    parts = urlsplit(uri)
    path = parts.path
    if path and ("/." in path):
        normal = posixpath.normpath(path)
        path = normal + "/" if path.endswith("/") and normal != "/" else normal
    return urlunsplit(parts._replace(path=path))


def item_id(uri: str) -> str:
    """Stable id of an item: the first 32 hex digits of the SHA-256 of its (canonical) URI."""
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def key_hash(ids: Iterable[str], tasks: Iterable[str]) -> np.ndarray:
    """uint64 key per (id, task) pair: done-sets hold these, 8 bytes a pair."""
    return np.fromiter((int.from_bytes(hashlib.blake2b(f"{i}\0{t}".encode(), digest_size=8).digest(), "little")
                        for i, t in zip(ids, tasks)), dtype=np.uint64)


def media_type_of(name: str) -> str | None:
    """'image', 'video', 'pdf' or None, from a file name's extension (a lying extension is caught when decoding)."""
    base = urlsplit(name).path if "://" in name else name   # no ?query of a presigned URL
    base = base.rsplit("/", 1)[-1]
    ext = base.rsplit(".", 1)[-1].lower() if "." in base else ""
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    if ext in PDF_EXTENSIONS:
        return "pdf"
    return None


def sniff_media_type(data: bytes) -> str:
    """'image', 'video' or 'pdf' from the first bytes of embedded media with no file name; unknown bytes are tried as an
    image, whose decoder then says what is wrong with them."""
    head = data[:16]
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head[4:8] == b"ftyp" or head[:4] == b"\x1a\x45\xdf\xa3" or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):
        return "video"
    return "image"
