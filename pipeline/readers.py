"""Readers of the input formats. Each turns one read unit (a listing partition, a manifest file, a tar shard, a
Parquet file) into pieces of raw rows, grouped in numbered shards (the unit of resume), in an order that is the
same in every run. What the completion records say (`Known`) decides what is read: a finished shard is not read (its
ids only, for tables, unless they are stored), and a record's extent says how many rows of a shard it covers, so a
manifest that grew is read past them (from where its rows done end, for a text manifest only appended to).

Raw rows: `uri`, `media_type`, `prompt`, `key`, `data` (embedded bytes), `error`, then the kept input columns.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import glob as globlib
import hashlib
import io
import logging
import math
import os
import re
import tarfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from pipeline import listing, pdf, storage
from pipeline.config import ConfigError
from pipeline.decode import describe_error
from pipeline.items import KEPT, LISTED, canonical_uri, media_type_of, sniff_media_type
from pipeline.state import StateDir
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST_SHARD_ROWS = 10_000   # manifest rows per shard
BYTES_SHARD_ROWS = 1_000       # rows of embedded media per shard (Parquet bytes)
BYTES_PIECE_ROWS = 64          # rows of embedded media per piece, so a piece stays a few MB
TAR_PIECE_SAMPLES = 64
RAW_FIELDS = [("uri", pa.string()), ("media_type", pa.string()), ("prompt", pa.string()), ("key", pa.string()),
              ("data", pa.large_binary()), ("error", pa.string())]
MANIFEST_EXTENSIONS = (".parquet", ".csv", ".jsonl", ".json", ".ndjson")
# in a folder, a .json file is usually metadata (img2dataset's *_stats.json); name it or glob it to read it
FOLDER_MANIFEST_EXTENSIONS = (".parquet", ".csv", ".jsonl", ".ndjson")
TABLE_FORMATS = {".parquet": "parquet", ".csv": "csv", ".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl"}
# CSV text is read unchecked, as the Parquet and JSON readers read theirs, and mended row by row (_texts, _utf8):
# checked, one Latin-1 value failed the whole file, or typed its column binary when in the first block
CSV_CONVERT = {"check_utf8": False}
TAIL_BYTES = 4096   # a text manifest's last bytes, digested in its records: rows appended after them leave them be
TAIL_ROWS = 64      # a Parquet manifest's last URIs, likewise (a Parquet file is rewritten whole to add rows)


@dataclass(frozen=True)
class Unit:
    """One read task's worth of input: a listing partition of `uri`, or one file."""
    kind: str                # listing | manifest | webdataset | parquet
    uri: str                 # the file, or the listed prefix
    partition: int = -1      # listing only
    prefix: str = ""
    recursive: bool = True
    stamp: str = field(default="", compare=False)   # a file's "<size>:<version>" when it was found (storage.file_stamp)

    @property
    def id(self) -> str:
        if self.kind == "listing":
            return f"{LISTED}{listing.listing_id(self.uri)}/p{self.partition}"
        return self.uri


@dataclass(frozen=True)
class ReadSpec:
    """What the readers need from the config; picklable."""
    input_uri: str
    format: str                 # files | webdataset | parquet
    manifest: str
    uri_column: str
    bytes_column: str
    key_column: str
    keep_columns: tuple[str, ...]
    include: tuple[str, ...]
    exclude: tuple[str, ...]
    opts: StorageOptions
    state: StateDir
    keep_schema: pa.Schema | None = None   # types of the kept columns (kept_schema)
    started_at: float = 0.0     # this run's start (wall clock): a listing made now is stamped with it
    relist_before: float = 0.0  # the end of the last run that ended: partitions listed before it are listed again
    run_tag: str = ""           # keys the crash notes of this run's read tasks (pipeline.poison: a PDF PDFium dies on)


@dataclass
class Piece:
    shard: int | str
    table: pa.Table | None      # raw rows; for a finished shard only `uri` (tables) or None (not read)
    last: bool                  # the shard's last piece
    finished: bool = False      # the shard's record holds every task (and all its rows)
    start: int = 0              # the row of the read shard (n, or g.n) this piece starts at
    rows: int = -1              # rows of the input the piece stands for (-1: its table's; rows without a URI go)

    @property
    def end(self) -> int:
        """The row of the read shard this piece ends at."""
        return self.start + (self.rows if self.rows >= 0 else (self.table.num_rows if self.table is not None else 0))


def sub_shard(shard, start: float) -> str:
    """The name of a shard's rows from `start` on, when rows were added to it after its record was made: "<n>+<row>"
    (its first rows keep "<n>"). Each has a record of its own, so that rows of it that landed before a kill are found
    in the output, as for any shard without a record."""
    return f"{shard}+{int(start)}" if start else str(shard)


@dataclass
class Known:
    """What the completion records say of one unit, for its reader, and what the reader notes of the file it read.

    A shard's records form a chain: "<n>" covers its first rows, "<n>+<r>" the rows from r on that were added later,
    and so on, each with the rows it covers in its extent; a record without one (an earlier version's) covers the
    rest of the shard. A shard is finished when its chain holds every task and covers all the shard's rows now; one
    whose ids are stored (sources.StoredIds) is skipped unread."""
    records: dict[str, dict[str, int]] = field(default_factory=dict)   # by shard name
    extents: dict[str, dict] = field(default_factory=dict)
    tasks: tuple[str, ...] = ()
    with_ids: frozenset = frozenset()   # shards whose distinct ids are stored
    grown: dict | None = None   # a finished text manifest only appended to since: its record's {"size", "rows"}
    # of the file as read: "of" (storage.file_stamp), "rows", "tail", "groups"
    read: dict = field(default_factory=dict)

    def chain(self, shard) -> list[tuple[str, float, float]]:
        """(name, first row, end row) of the shard's records, in row order."""
        out, start = [], 0
        while (name := sub_shard(shard, start)) in self.records:
            rows = self.extents.get(name, {}).get("rows")
            end = math.inf if rows is None else start + rows
            out.append((name, start, end))
            if not start < end < math.inf:   # the rest of the shard, or an empty record: nothing can follow
                break
            start = end
        return out

    def at(self, shard, row: int) -> tuple[str, float]:
        """(name, end row) of the part of the shard holding `row`: a record of its chain, or the rows past them."""
        for name, start, end in self.chain(shard):
            if start <= row < end:
                return name, end
        return sub_shard(shard, self.covered(shard)), math.inf

    def covered(self, shard) -> float:
        """Rows of the shard its records cover: 0 without one, all with one without an extent."""
        chain = self.chain(shard)
        return chain[-1][2] if chain else 0

    def done(self, name) -> bool:
        """The record of this shard, or part of one, holds every task."""
        counts = self.records.get(str(name))
        return counts is not None and all(t in counts for t in self.tasks)

    def finished(self, shard, rows: float = math.inf) -> bool:
        """`rows`: the shard's rows now, where the reader knows them before reading (Parquet footers, full shards)."""
        chain = self.chain(shard)
        return bool(chain) and chain[-1][2] >= rows and all(self.done(name) for name, _, _ in chain)

    def skip(self, shard, rows: float = math.inf) -> bool:
        return self.finished(shard, rows) and all(name in self.with_ids for name, _, _ in self.chain(shard))

    def unread(self, shard, rows: int) -> Iterator["Piece"]:
        """Pieces for a finished shard skipped unread: one per record of its chain, with the rows it stands for."""
        for name, start, end in self.chain(shard):
            yield Piece(name, None, True, finished=True, start=int(start), rows=int(min(end, rows) - start))


def stamp_size(stamp: str) -> int:
    return int(stamp.split(":", 1)[0])


# --- finding the units ---------------------------------------------------------------------------------------


def split_glob(path: str) -> tuple[str, str]:
    """(the folders before a glob's first part with a wildcard, the pattern from that part on)."""
    parts = path.split("/")
    first = next(n for n, part in enumerate(parts) if globlib.has_magic(part))
    return "/".join(parts[:first]), "/".join(parts[first:])


def expand_files(uri: str, extensions: tuple[str, ...], opts: StorageOptions, what: str,
                 in_folder: tuple[str, ...] | None = None) -> dict[str, str]:
    """A file, every matching file under a folder/prefix (`in_folder` extensions there), or a glob: sorted canonical
    URIs, each with its storage.file_stamp (from the same listing: no request more)."""
    fs, path = storage.filesystem(uri, opts)
    root = path.rstrip("/")
    if globlib.has_magic(path):
        try:
            matches = storage.with_retries(lambda: fs.glob(path, detail=True), uri, opts)
        except ValueError as e:   # fsspec refuses the pattern itself ("'**' can only be an entire path component")
            raise ConfigError(f"{what}: {uri} is not a valid glob ({e})") from None
        # folders matched by name (Spark writes `x.parquet/` folders) are not files to read
        found = {p: info for p, info in matches.items() if info.get("type") != "directory"}
        root = split_glob(path)[0]
    elif storage.with_retries(lambda: fs.isdir(path), uri, opts):
        found = storage.with_retries(lambda: fs.find(path, detail=True), uri, opts)
        extensions = in_folder or extensions
    else:
        info = _info_if_any(fs, path, uri, opts)
        if info is None:
            raise ConfigError(f"{what}: {uri} does not exist")
        found, root = {path: info}, root.rsplit("/", 1)[0]
    files = sorted(p for p in found if p.lower().endswith(extensions) and not _hidden_below(p, root))
    if not files:
        raise ConfigError(f"{what}: no {'/'.join(extensions)} files at {uri}")
    return {canonical_uri(storage.full_uri(fs, p)): storage.file_stamp(found[p]) for p in files}


def _stamp_now(uri: str, opts: StorageOptions) -> str:
    fs, path = storage.filesystem(uri, opts)
    return storage.file_stamp(storage.with_retries(lambda: fs.info(path), uri, opts))


def _info_if_any(fs, path: str, uri: str, opts: StorageOptions) -> dict | None:
    try:
        return storage.with_retries(lambda: fs.info(path), uri, opts)
    except FileNotFoundError:
        return None


def _hidden_below(path: str, root: str) -> bool:
    """Whether a folder or file below the input root starts with '_' or '.': Spark's and img2dataset's side
    files (_SUCCESS, _temporary/), dot-folders, and this pipeline's own _state/ when the output lies inside the
    input, whose Parquet snapshots were read as input."""
    rel = path[len(root):] if path.startswith(root + "/") else path.rsplit("/", 1)[-1]
    return any(part.startswith(("_", ".")) for part in rel.strip("/").split("/"))


def find_units(spec: ReadSpec) -> list[Unit]:
    if spec.manifest:
        found = expand_files(spec.manifest, MANIFEST_EXTENSIONS, spec.opts, "input.manifest",
                             FOLDER_MANIFEST_EXTENSIONS)
        return [Unit("manifest", u, stamp=stamp) for u, stamp in found.items()]
    if spec.format in ("webdataset", "parquet"):
        extension = ".tar" if spec.format == "webdataset" else ".parquet"
        return [Unit(spec.format, u, stamp=stamp)
                for u, stamp in expand_files(spec.input_uri, (extension,), spec.opts, "input.uri").items()]
    snapshot = listing.ListingSnapshot(spec.state, spec.input_uri)
    partitions = snapshot.partitions(spec.opts)
    if spec.relist_before:   # a run ended since: sub-folders made since it was planned become partitions
        partitions = snapshot.extend(spec.opts, spec.relist_before, spec.started_at)
    return [Unit("listing", spec.input_uri, i, p.prefix, p.recursive) for i, p in enumerate(partitions)]


# --- raw rows ------------------------------------------------------------------------------------------------


def raw_table(uris: list[str], media_types: list[str], *, prompts=None, keys=None, data=None, errors=None,
              extra: pa.Table | None = None) -> pa.Table:
    n = len(uris)
    none = [None] * n
    columns = [uris, media_types, prompts or [""] * n, keys or none, data or none, errors or none]
    table = pa.Table.from_arrays([pa.array(c, t) for c, (_, t) in zip(columns, RAW_FIELDS)],
                                 schema=pa.schema(RAW_FIELDS))
    if extra is not None:
        for name in extra.column_names:
            table = table.append_column(extra.schema.field(name), extra[name])
    return table


def _selected(rel: str, include: tuple[str, ...], exclude: tuple[str, ...]) -> bool:
    return (any(fnmatch.fnmatch(rel, p) for p in include)
            and not any(fnmatch.fnmatch(rel, p) for p in exclude))


def read_listing(unit: Unit, spec: ReadSpec, known: Known) -> Iterator[Piece]:
    fs, root = storage.filesystem(spec.input_uri, spec.opts)
    base = root.rstrip("/")
    snapshot = listing.ListingSnapshot(spec.state, spec.input_uri)
    part = listing.Partition(unit.prefix, unit.recursive)
    for number, paths in listing.partition_parts(spec.input_uri, spec.opts, snapshot, unit.partition, part,
                                                 known.finished, spec.relist_before, spec.started_at, known.read):
        if paths is None:
            yield Piece(number, None, True, finished=True)
            continue
        paths = [p for p in paths if _selected(p, spec.include, spec.exclude)]
        uris = [canonical_uri(storage.full_uri(fs, f"{base}/{p}")) for p in paths]
        yield Piece(number, raw_table(uris, [media_type_of(p) for p in paths]), True)


# --- tables: manifests and Parquet with embedded bytes -------------------------------------------------------


def table_format(uri: str) -> str:
    name = uri.lower().rsplit("/", 1)[-1]
    for ext, fmt in TABLE_FORMATS.items():
        if name.endswith(ext):
            return fmt
    raise ConfigError(f"input.manifest: {uri} must end in .parquet, .csv or .jsonl")


def _reread(uri: str, opts: StorageOptions, read: Callable[[object], Iterator[T]], **open_kwargs) -> Iterator[T]:
    """The items of read(file), with storage errors classified as `storage.with_retries` does. `read` must give
    the same items in the same order every time: a transient error re-opens the file after a back-off and skips
    what was already yielded. An outage, or `opts.retries` transient errors without progress, raise
    StorageUnavailable, so that a half-read unit is never taken for a finished (or corrupt) one. Errors about the
    object itself (missing, bad data) are raised as they are."""
    fs, path = storage.filesystem(uri, opts)
    sent, attempt = 0, 0
    while True:
        try:
            with fs.open(path, "rb", **open_kwargs) as f:
                for n, item in enumerate(read(f)):
                    if n >= sent:
                        yield item
                        sent, attempt = sent + 1, 0
            return
        except Exception as e:  # noqa: BLE001 - classified by retry_delay
            delay = storage.retry_delay(e, uri, opts, attempt)
            attempt += 1
            log.warning("re-opening %s in %.2fs after a transient error (%s); retry %d/%d, %d items already read",
                        storage.scrub(uri), delay, storage.describe(e), attempt, opts.retries, sent)
            time.sleep(delay)


def table_schema(uri: str, opts: StorageOptions) -> pa.Schema:
    """The columns of a manifest or Parquet input file (the footer, or the first block of a text file)."""
    fmt = table_format(uri)
    fs, path = storage.filesystem(uri, opts)

    def schema() -> pa.Schema:
        with fs.open(path, "rb") as f:
            if fmt == "parquet":
                return pq.ParquetFile(f).schema_arrow
            if not f.read(1):
                return pa.schema([])   # an empty text file: no rows (pyarrow refuses it)
            f.seek(0)
            if fmt == "csv":
                return pacsv.open_csv(f, convert_options=pacsv.ConvertOptions(**CSV_CONVERT)).schema
            return pajson.open_json(f).schema

    return storage.with_retries(schema, uri, opts)


def kept_schema(units: list[Unit], names: list[str], opts: StorageOptions) -> pa.Schema:
    """The kept columns' types, from every input file's schema (Parquet footers, text files' first block), read
    concurrently: each column takes the type all files' fit (unified_type). A file whose type fits none of the files
    before it keeps theirs, and its items become error rows (_kept); a file without a kept column stops the run now
    rather than hours in. A corrupt or empty file is the readers' to report (an error row, zero rows)."""
    with ThreadPoolExecutor(max_workers=16) as pool:
        schemas = list(pool.map(lambda unit: _schema_if_readable(unit.uri, opts), units))
    types: dict[str, pa.DataType] = {}
    readable = [(unit, schema) for unit, schema in zip(units, schemas) if schema is not None and schema.names]
    for unit, schema in readable:
        missing = [c for c in names if c not in schema.names]
        if missing:
            raise ConfigError(f"input.keep_columns: {unit.uri} has no column(s) {missing} "
                              f"(columns: {', '.join(schema.names[:20])})")
        for name in names:
            found = schema.field(name).type
            unified = unified_type(types.get(name, pa.null()), found)
            if unified is None:
                log.warning("input.keep_columns: column %r is %s in %s, %s in the files before it: its items become "
                            "error rows", name, found, storage.scrub(unit.uri), types[name])
            else:
                types[name] = unified
    if not readable:
        raise ConfigError(f"input.keep_columns: none of the {len(units)} input file(s) could be read for its columns")
    return pa.schema([(name, types[name]) for name in names])


def _schema_if_readable(uri: str, opts: StorageOptions) -> pa.Schema | None:
    try:
        return table_schema(uri, opts)
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError) or storage.classify(e) is not storage.Fault.ITEM:
            raise
        return None


def unified_type(a: pa.DataType, b: pa.DataType) -> pa.DataType | None:
    """The type values of both types fit, by Arrow's permissive promotion: null gives way to the other, integers and
    floats make double, narrower numbers wider ones; None when there is none (string and int64, struct and list).
    Dictionary-encoded columns count as their values (pandas writes categoricals so)."""
    a, b = (t.value_type if pa.types.is_dictionary(t) else t for t in (a, b))
    try:
        merged = pa.unify_schemas([pa.schema([("c", a)]), pa.schema([("c", b)])], promote_options="permissive")
    except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    return merged.field("c").type


def _batches(uri: str, fmt: str, columns: list[str], text: list[str], opts: StorageOptions, *, start: int = 0,
             end: int | None = None, names: list[str] | None = None, windows: list | None = None
             ) -> Iterator[pa.RecordBatch]:
    """`text` columns are read as strings: inferred from the first block, a prompt column empty for its first
    megabyte is typed null, and the first prompt after that fails the whole file. Only bytes [start, end) are read:
    `end` the size the file had when its stamp was taken (rows appended meanwhile are the next run's), `start` past
    rows already done (a CSV's header, `names`, is then not in the bytes read)."""
    types = {c: pa.string() for c in text}

    def read(f) -> Iterator[pa.RecordBatch]:
        window = _Window(f, start, end)
        if windows is not None:
            windows.append(window)
        if fmt == "csv":
            header = pacsv.ReadOptions(column_names=names) if start else None
            yield from pacsv.open_csv(window, read_options=header, convert_options=pacsv.ConvertOptions(
                include_columns=columns, column_types=types, **CSV_CONVERT))
        else:
            for batch in pajson.open_json(window, parse_options=pajson.ParseOptions(explicit_schema=pa.schema(types))):
                yield batch.select(columns)

    return _reread(uri, opts, read)


class _Window(io.RawIOBase):
    """Bytes [start, end) of an open file, as a file of their own; keeps the last TAIL_BYTES it gave (the tail
    digest of a text manifest's records, without reading them again)."""

    def __init__(self, f, start: int, end: int | None):
        if start:
            f.seek(start)
        self.f, self.start, self.left = f, start, math.inf if end is None else max(0, end - start)
        self.kept, self.given = bytearray(), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        data = self.f.read(int(min(len(buffer), self.left)))
        buffer[:len(data)] = data
        self.left -= len(data)
        self.given += len(data)
        self.kept = (self.kept + data[-TAIL_BYTES:])[-TAIL_BYTES:]
        return len(data)

    def whole(self) -> bool:
        """It gave every byte up to its end, and its kept bytes are the file's last TAIL_BYTES before it."""
        return self.left in (0, math.inf) and (self.start == 0 or self.given >= TAIL_BYTES)


def _sharded(batches: Iterator[pa.RecordBatch], shard_rows: int, piece_rows: int,
             known: Callable[[int, int], tuple[str, float]] = lambda shard, row: (str(shard), math.inf),
             row: int = 0) -> Iterator[Piece]:
    """Cut a stream of batches, the file's rows from `row` on, into pieces of whole-file row ranges: shard n holds
    rows [n*S, (n+1)*S). `known(n, row)` names the part of shard n that holds a row and where it ends (Known.at): a
    piece never spans two parts, and the last piece of each part says so."""
    closed = True
    for batch in batches:
        start = 0
        while start < batch.num_rows:
            shard, offset = divmod(row, shard_rows)
            name, part_end = known(shard, offset)
            end = int(min(offset + batch.num_rows - start, shard_rows, offset + piece_rows, part_end))
            closed = end in (shard_rows, part_end)
            yield Piece(name, pa.Table.from_batches([batch.slice(start, end - offset)]), closed, start=offset)
            start, row = start + end - offset, row + end - offset
    if not closed:   # the last, short shard
        shard, offset = divmod(row, shard_rows)
        yield Piece(known(shard, offset - 1)[0], None, True, start=offset, rows=0)


def _parquet_pieces(uri: str, columns: list[str], id_columns: list[str], opts: StorageOptions,
                    shard_rows: int, piece_rows: int, known: Known) -> Iterator[Piece]:
    """Shards are row ranges inside each row group ("<group>.<n>"). A row group whose shards are all finished is
    read for its id columns only, and not at all when their ids are stored. Notes the row groups' sizes."""
    def read(f) -> Iterator[Piece]:
        pf = pq.ParquetFile(f)
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        known.read["groups"] = sizes
        for group, rows in enumerate(sizes):
            shards = {f"{group}.{n}": min(shard_rows, rows - n * shard_rows) for n in range(-(-rows // shard_rows))}
            if all(known.skip(name, size) for name, size in shards.items()):
                for name, size in shards.items():
                    yield from known.unread(name, size)
                continue
            cols = id_columns if all(known.finished(name, size) for name, size in shards.items()) else columns
            batches = pf.iter_batches(batch_size=piece_rows, row_groups=[group], columns=cols)
            yield from _marked(_sharded(batches, shard_rows, piece_rows, lambda n, row: known.at(f"{group}.{n}", row)),
                               known)

    return _reread(uri, opts, read)


def _shard_of(name: str) -> str:
    """The shard a part of it belongs to ("<n>+<row>" -> "<n>")."""
    return str(name).split("+", 1)[0]


def _marked(pieces: Iterator[Piece], known: Known) -> Iterator[Piece]:
    """Pieces with `finished` set from the records: a piece lies in one part of a shard (Known.at), finished when
    that part's record holds every task; where its ids are stored, its rows need not be looked at."""
    for piece in pieces:
        if piece.table is not None and known.done(piece.shard):
            piece.finished = True
            if str(piece.shard) in known.with_ids:
                piece.rows, piece.table = piece.table.num_rows, None
        yield piece


def _resolve(uri: str, manifest: str) -> str:
    """Manifest URIs may be relative to the manifest's own folder."""
    if "://" in uri or os.path.isabs(uri):
        return canonical_uri(uri)
    return canonical_uri(manifest.rsplit("/", 1)[0] + "/" + uri)


def read_manifest(unit: Unit, spec: ReadSpec, known: Known) -> Iterator[Piece]:
    """A manifest pyarrow cannot parse (a kept column whose values change type far into the file, a JSON array)
    stops the run with one line naming the file: its rows cannot be trusted, and the owner has to fix it."""
    try:
        yield from _manifest_pieces(unit, spec, known)
    except pa.ArrowInvalid as e:
        hint = "; a JSON manifest holds one object per line, not an array" if "to array" in str(e) else ""
        # the quoted values of pyarrow's messages are row contents (URLs may hold credentials)
        cause = re.sub(r"'[^']*'", "'...'", storage.scrub(str(e)))
        raise ConfigError(f"input.manifest: {unit.uri} cannot be read ({cause}){hint}") from None


def _manifest_pieces(unit: Unit, spec: ReadSpec, known: Known) -> Iterator[Piece]:
    fmt = table_format(unit.uri)
    # the stamp the file was found with (a unit made up without one asks now); a text manifest is read up to its
    # size, so that rows appended since are the next run's, after the rows its records cover
    if not known.read.get("of"):
        known.read["of"] = _stamp_now(unit.uri, spec.opts)
    schema_names = table_schema(unit.uri, spec.opts).names
    if not schema_names:
        log.warning("input.manifest: %s is empty", unit.uri)
        return
    if spec.uri_column not in schema_names:
        raise ConfigError(f"input.manifest: {unit.uri} has no {spec.uri_column!r} column (columns: "
                          f"{', '.join(schema_names[:20])}); set input.uri_column")
    has_prompt = "prompt" in schema_names
    text = [spec.uri_column] + (["prompt"] if has_prompt else [])
    columns = list(dict.fromkeys(text + list(spec.keep_columns)))   # keeping the uri column itself: read once
    if fmt == "parquet":
        pieces = _parquet_pieces(unit.uri, columns, [spec.uri_column], spec.opts, MANIFEST_SHARD_ROWS,
                                 MANIFEST_SHARD_ROWS, known)
    else:
        pieces = _text_pieces(unit.uri, fmt, columns, text, schema_names, stamp_size(known.read["of"]), spec.opts,
                              known)
    tail = Tail()
    for piece in pieces:
        tail.add(piece, spec.uri_column)
        if piece.table is None:
            yield piece
            continue
        raw, bad = _texts(piece.table[spec.uri_column])
        kept = [i for i, u in enumerate(raw) if u is not None and u.strip()]
        table = piece.table.take(kept) if len(kept) < len(raw) else piece.table
        uris = [_resolve(raw[i].strip(), unit.uri) for i in kept]
        if piece.finished:
            yield Piece(piece.shard, raw_table(uris, [""] * len(uris)), piece.last, True, piece.start,
                        piece.end - piece.start)
            continue
        prompts = None
        if has_prompt:
            table = _utf8(table, ["prompt"], unit)
            prompts = [p if isinstance(p, str) else "" for p in table["prompt"].to_pylist()]
        extra, conflict = _kept(table, spec, unit)
        errors = _errors_with([_not_utf8(u, "URI") if i in bad else None for i, u in zip(kept, uris)], uris, conflict)
        yield Piece(piece.shard, raw_table(uris, [media_type_of(u) or "" for u in uris], prompts=prompts,
                                           errors=errors, extra=extra), piece.last, False, piece.start,
                    piece.end - piece.start)
    if fmt == "parquet" and known.read.get("groups"):
        known.read["tail"] = tail.digest(known.read["groups"]) or parquet_tail(unit.uri, spec.opts, spec.uri_column,
                                                                               known.read["groups"])


def _text_pieces(uri: str, fmt: str, columns: list[str], text: list[str], names: list[str], size: int,
                 opts: StorageOptions, known: Known) -> Iterator[Piece]:
    """A CSV or JSONL manifest's pieces, up to `size` bytes. One only appended to since its records were made
    (`known.grown`, checked by pipeline.changes) is read from where they end, when every shard before that is skipped
    anyway; otherwise every row is parsed (finished shards' rows are dropped unhashed where their ids are stored).
    Notes the rows read."""
    S, grown = MANIFEST_SHARD_ROWS, known.grown
    start = row = 0
    if grown is not None:
        first, offset = divmod(grown["rows"], S)
        if all(known.skip(n, S) for n in range(first)) and (not offset or known.skip(first, offset)):
            for n in range(first + 1):
                yield from known.unread(n, S if n < first else offset)
            start, row = grown["size"], grown["rows"]
    windows: list[_Window] = []
    batches = _batches(uri, fmt, columns, text, opts, start=start, end=size, names=names, windows=windows)
    for piece in _marked(_sharded(batches, S, S, known.at, row=row), known):
        row = int(_shard_of(piece.shard)) * S + piece.end
        yield piece
    known.read["rows"] = row
    last = windows[-1] if windows else None   # the one that read to the end (a retry reads from the start again)
    known.read["tail"] = (_digest(bytes(last.kept)) if last is not None and last.whole() else
                          text_tail(uri, size, opts))


class Tail:
    """The last TAIL_ROWS values of a Parquet manifest's URI column as its pieces go by, for its records' tail
    digest without reading them again."""

    def __init__(self):
        self.values: list = []
        self.group, self.end = None, 0

    def add(self, piece: Piece, column: str) -> None:
        group = str(piece.shard).split(".")[0]
        if piece.table is None:
            if piece.end > piece.start:   # rows not read: the values before them are not the tail
                self.values, self.group = [], None
            return
        if group != self.group:
            self.values, self.group = [], group
        values = piece.table[column]
        self.values = (self.values + _raw(values.slice(max(0, len(values) - TAIL_ROWS))))[-TAIL_ROWS:]

    def digest(self, groups: list[int]) -> str | None:
        last = str(len(groups) - 1)
        if self.group != last or len(self.values) < min(TAIL_ROWS, groups[-1]):
            return None
        return _digest(self.values[-min(TAIL_ROWS, groups[-1]):])


def _digest(values) -> str:
    return hashlib.sha256(repr(values).encode()).hexdigest()[:32]


def _raw(column: pa.Array | pa.ChunkedArray) -> list:
    """A column's values as they are stored: text as bytes, never decoded (it may not be UTF-8)."""
    if _is_text(column.type):
        column = column.cast(pa.large_binary())
    return column.to_pylist()


def text_tail(uri: str, size: int, opts: StorageOptions) -> str:
    """Digest of a text manifest's last TAIL_BYTES before `size`: equal in a copy only appended to since."""
    fs, path = storage.filesystem(uri, opts)
    data = storage.with_retries(lambda: fs.cat_file(path, start=max(0, size - TAIL_BYTES), end=size), uri, opts)
    return _digest(data)


def parquet_tail(uri: str, opts: StorageOptions, column: str, groups: list[int]) -> str:
    """Digest of the last TAIL_ROWS values of `column` in row group len(groups) - 1, up to its groups[-1]-th row:
    equal in a copy rewritten with its rows first, in the same row groups (the last one may have grown)."""
    fs, path = storage.filesystem(uri, opts)

    def read() -> str:
        with fs.open(path, "rb") as f:
            values = pq.ParquetFile(f).read_row_group(len(groups) - 1, columns=[column])[column]
        return _digest(_raw(values.slice(max(0, groups[-1] - TAIL_ROWS), min(TAIL_ROWS, groups[-1]))))

    return storage.with_retries(read, uri, opts)


def _not_utf8(uri: str, what: str) -> str:
    return f"{uri}: the {what} is not UTF-8 (its bad bytes are shown as \\xNN)"


def _texts(column: pa.Array | pa.ChunkedArray) -> tuple[list[str | None], set[int]]:
    """A column's values as text, and the rows whose bytes are not UTF-8 (pyarrow's Parquet and JSON readers do
    not check). Those are decoded with the bad bytes escaped (caf\\xe9.jpg): lossless, readable and the same in
    every run, so that the item keeps one id and its error row lands once."""
    try:   # the common case at memory speed: a binary column is checked by the cast, a string one by validate
        text = column.cast(pa.string())
        text.validate(full=True)
        return text.to_pylist(), set()
    except pa.ArrowInvalid:
        pass
    if not _is_binary(column.type):
        column = column.cast(pa.string()).cast(pa.large_binary())   # the bytes as they are, never checked
    texts, bad = [], set()
    for row, value in enumerate(column.to_pylist()):
        try:
            texts.append(None if value is None else value.decode())
        except UnicodeDecodeError:
            texts.append(value.decode("utf-8", "backslashreplace"))
            bad.add(row)
    return texts, bad


def _kept(table: pa.Table, spec: ReadSpec, unit: Unit) -> tuple[pa.Table | None, str | None]:
    """The kept columns, cast to the types chosen for all input files (kept_schema); and why not, when one of this
    file's cannot be (a string column where the other files hold numbers): then that column is null, and the
    reason becomes the error of every item in the table."""
    if not spec.keep_columns:
        return None, None
    missing = [c for c in spec.keep_columns if c not in table.column_names]
    if missing:
        raise ConfigError(f"input.keep_columns: {unit.uri} has no column(s) {missing}")
    kept, conflict = table.select(list(spec.keep_columns)), None
    for i, target in enumerate(spec.keep_schema or []):
        column = kept.column(i)
        cast = _cast_kept(column, target.type)
        if cast is None:
            conflict = conflict or (f"input.keep_columns: column {target.name!r} is {column.type} in {unit.uri} and "
                                    f"{target.type} in the other input files: no one type holds both")
            cast = pa.nulls(len(kept), target.type)
        kept = kept.set_column(i, target.name, cast)
    kept = _utf8(kept, kept.column_names, unit).rename_columns([KEPT + c for c in kept.column_names])
    return kept, conflict


def _cast_kept(column: pa.ChunkedArray, target: pa.DataType) -> pa.ChunkedArray | None:
    """The column as `target`, if its type promotes to it and its values fit (a uint64 past int64's range does not)."""
    if column.type.equals(target):
        return column
    if unified_type(column.type, target) != target:
        return None
    try:
        return column.cast(target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None


def _errors_with(errors: list[str | None], uris: list[str], conflict: str | None) -> list[str | None]:
    """Each item's error, or the kept columns' conflict (see _kept) for items without one."""
    if conflict is None:
        return errors
    return [error or f"{uri}: {conflict}" for error, uri in zip(errors, uris)]


def _utf8(table: pa.Table, names: list[str], unit: Unit) -> pa.Table:
    """The table with valid text in the named columns. pyarrow's Parquet and JSON readers do not check that
    strings are UTF-8 (a Latin-1 caption), and invalid string data written to the output makes it unreadable, so
    the bad bytes of a string column become U+FFFD: one value is damaged, never the run or the output. Text that
    is not UTF-8 inside another type (a list, a struct) cannot be mended in place: one line refuses the file."""
    for name in [n for n in names if not _valid(table[n])]:
        column = table[name]
        if not _is_text(column.type):
            raise ConfigError(f"input: {unit.uri}: column {name!r} holds text that is not UTF-8 inside "
                              f"{column.type} values (only string columns are mended)")
        binary = pa.large_binary() if pa.types.is_large_string(column.type) else pa.binary()
        values = [None if v is None else v.decode("utf-8", "replace") for v in column.cast(binary).to_pylist()]
        table = table.set_column(table.column_names.index(name), name, pa.array(values, column.type))
        _warn_replaced(unit.uri, name)
    return table


def _valid(column: pa.ChunkedArray) -> bool:
    try:
        column.validate(full=True)   # checks UTF-8, at memory speed
    except pa.ArrowInvalid:
        return False
    return True


@functools.lru_cache(maxsize=1024)   # once per file and column: a Parquet file of media has a piece per 64 rows
def _warn_replaced(uri: str, column: str) -> None:
    log.warning("%s: column %r holds text that is not UTF-8; its bad bytes are written as U+FFFD",
                storage.scrub(uri), column)


def _media_bytes(column: pa.ChunkedArray) -> tuple[list, list]:
    """(bytes, file names) of a binary column or of an HF datasets image struct {bytes, path}."""
    if pa.types.is_struct(column.type):
        names = [f.name for f in column.type]   # has a binary 'bytes' field: _check_bytes_column
        data = column.combine_chunks().field("bytes").to_pylist()
        paths = _texts(column.combine_chunks().field("path"))[0] if "path" in names else [None] * len(data)
        return data, paths
    return column.to_pylist(), [None] * len(column)


def _is_text(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t)


def _is_binary(t: pa.DataType) -> bool:
    return pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)


def _check_bytes_column(uri: str, schema: pa.Schema, column: str) -> None:
    """A column of another type would fail (or be taken for media) row by row; one clear line instead."""
    t = schema.field(column).type
    if _is_binary(t) or (pa.types.is_struct(t) and t.get_field_index("bytes") >= 0
                         and _is_binary(t.field("bytes").type)):
        return
    raise ConfigError(f"input.bytes_column: {uri}: column {column!r} is {t}, not binary or a struct with a binary "
                      f"'bytes' field")


def read_parquet_bytes(unit: Unit, spec: ReadSpec, known: Known) -> Iterator[Piece]:
    """A Parquet file whose data is bad (cut short by a writer that died, corrupt pages) ends with one error row
    naming it, as a corrupt tar does: a rerun would fail on it the same way, so stopping the run helps no one."""
    shard, closed = "error", True
    try:
        for piece in _parquet_bytes(unit, spec, known):
            shard, closed = piece.shard, piece.last
            yield piece
    except (pa.ArrowInvalid, OSError) as e:
        if isinstance(e, FileNotFoundError) or storage.classify(e) is not storage.Fault.ITEM:
            raise
        error = f"{unit.uri}: corrupt Parquet file ({type(e).__name__}: {storage.scrub(str(e))})"
        yield Piece("error" if closed else shard, raw_table([unit.uri], [""], errors=[error],
                                                            extra=_null_kept(spec)), True)


def _null_kept(spec: ReadSpec) -> pa.Table | None:
    """Kept columns for a row that has none, so that it fits the blocks around it."""
    if not spec.keep_columns:
        return None
    types = spec.keep_schema.types if spec.keep_schema is not None else [pa.null()] * len(spec.keep_columns)
    return pa.table({KEPT + c: pa.nulls(1, t) for c, t in zip(spec.keep_columns, types)})


def _parquet_bytes(unit: Unit, spec: ReadSpec, known: Known) -> Iterator[Piece]:
    schema = table_schema(unit.uri, spec.opts)
    names = schema.names
    for col, what in ((spec.bytes_column, "input.bytes_column"), (spec.key_column, "input.key_column")):
        if col and col not in names:
            raise ConfigError(f"{what}: {unit.uri} has no {col!r} column (columns: {', '.join(names[:20])})")
    _check_bytes_column(unit.uri, schema, spec.bytes_column)
    key_cols = [spec.key_column] if spec.key_column else []
    columns = [spec.bytes_column] + key_cols + list(spec.keep_columns)
    # without a key column, an item is named by its row number, which needs no column at all
    id_columns = key_cols
    for piece in _parquet_pieces(unit.uri, columns, id_columns, spec.opts, BYTES_SHARD_ROWS, BYTES_PIECE_ROWS,
                                 known):
        if piece.table is None:
            yield piece
            continue
        n = piece.table.num_rows
        group, number = (int(x) for x in _shard_of(piece.shard).split("."))
        row = sum(known.read["groups"][:group]) + number * BYTES_SHARD_ROWS + piece.start   # the file's row
        keys, bad = [str(row + i) for i in range(n)], set()
        if spec.key_column:
            keys, bad = _keys(piece.table[spec.key_column])
        # a row without a key is still an item, named by its row in a form real keys do not take in practice
        # (keys are not escaped, so nothing is strictly out of reach): keyless rows merged into one "#None" before
        uris = [f"{unit.uri}#{k}" if k is not None else f"{unit.uri}#<row {row + i}>" for i, k in enumerate(keys)]
        if piece.finished:
            yield Piece(piece.shard, raw_table(uris, [""] * n), piece.last, True, piece.start, n)
            continue
        data, paths = _media_bytes(piece.table[spec.bytes_column])
        types, errors = [], []
        for i, (uri, blob, path) in enumerate(zip(uris, data, paths)):
            types.append((path and media_type_of(path)) or (sniff_media_type(blob) if blob else ""))
            error = None if blob else f"{uri}: no media bytes in column {spec.bytes_column!r}"
            errors.append(_not_utf8(uri, "key") if i in bad else error)
        extra, conflict = _kept(piece.table, spec, unit)
        errors = _errors_with(errors, uris, conflict)
        yield Piece(piece.shard, raw_table(uris, types, keys=keys, data=data, errors=errors, extra=extra),
                    piece.last, False, piece.start, n)


def _keys(column: pa.ChunkedArray) -> tuple[list[str | None], set[int]]:
    """Sample keys as text, and the rows whose string key is not UTF-8 (see _texts). Keys of other types keep
    their str(): it names their items in outputs already written."""
    if _is_text(column.type):
        return _texts(column)
    return [None if k is None else str(k) for k in column.to_pylist()], set()


# --- WebDataset tar shards -----------------------------------------------------------------------------------


def _sample_key(name: str) -> tuple[str, str]:
    """WebDataset's convention: the key is the member path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def _samples(stream) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of consecutive members sharing a key, as the tar streams by."""
    key, members = None, {}
    with tarfile.open(fileobj=stream, mode="r|*") as tar:
        for info in tar:
            if not info.isfile():
                continue
            k, ext = _sample_key(info.name)
            if k != key and members:
                yield key, members
                members = {}
            key = k
            members[ext] = tar.extractfile(info).read()
    if members:
        yield key, members


def _sample_row(shard_uri: str, key: str, members: dict[str, bytes]) -> tuple:
    if not listing.is_utf8(key):   # tarfile decodes a name that is not UTF-8 with surrogate escapes: no string holds
        key = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return f"{shard_uri}#{key}", "", key, None, _not_utf8(f"{shard_uri}#{key}", "member name")
    uri = f"{shard_uri}#{key}"
    for ext, blob in members.items():
        kind = media_type_of(f"x.{ext}")
        if kind:
            return uri, kind, key, blob, None
    names = ", ".join(sorted(members)) or "none"
    return uri, "", key, None, f"{uri}: sample has no image, video or PDF member (members: {names})"


def read_tar(unit: Unit, spec: ReadSpec, known: Known) -> Iterator[Piece]:
    """One shard per tar, streamed (never extracted to disk). A corrupt tar ends the shard with one error row naming
    it; a store that fails past its retries stops the run (StorageUnavailable), leaving the shard unfinished."""
    if known.finished(0):
        yield Piece(0, None, True, finished=True)
        return
    sent, rows = 0, []
    try:
        for key, members in _reread(unit.uri, spec.opts, _samples, block_size=8 << 20):
            rows.append(_sample_row(unit.uri, key, members))
            if len(rows) == TAR_PIECE_SAMPLES:
                yield Piece(0, _rows_table(rows), False)
                sent, rows = sent + len(rows), []
    except FileNotFoundError:
        raise
    except (tarfile.TarError, EOFError, OSError, ValueError) as e:
        rows.append((unit.uri, "", None, None, f"{unit.uri}: corrupt tar after {sent + len(rows)} samples "
                                               f"({type(e).__name__}: {e})"))
    yield Piece(0, _rows_table(rows), True)


def _rows_table(rows: list[tuple]) -> pa.Table:
    uris, types, keys, data, errors = (list(c) for c in zip(*rows)) if rows else ([], [], [], [], [])
    return raw_table(uris, types, keys=keys, data=data, errors=errors)


READERS = {"listing": read_listing, "manifest": read_manifest, "webdataset": read_tar,
           "parquet": read_parquet_bytes}


def read_unit(unit: Unit, spec: ReadSpec, known: Known) -> Iterator[Piece]:
    """The unit's pieces, each PDF in them as one row per page (pipeline.pdf); a piece still stands for the rows of
    the input it was read from (its extent)."""
    listed = unit.kind == "listing"
    describe = lambda uri, exc: describe_error(uri, exc, listed)   # noqa: E731
    for piece in READERS[unit.kind](unit, spec, known):
        if piece.table is not None and not piece.finished:
            rows = piece.rows if piece.rows >= 0 else piece.table.num_rows
            piece = dataclasses.replace(piece, table=pdf.expand(piece.table, spec.opts, describe, spec.run_tag),
                                        rows=rows)
        yield piece
