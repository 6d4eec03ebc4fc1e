"""Run state under the output's `_state/` folder: small JSON and Parquet files, each written whole (staged and
renamed, or one object upload) with storage retries. pandas, pyarrow.dataset and Spark skip the folder because of
its leading underscore; globs such as duckdb's and polars' `OUT/**/*.parquet` do not, so no state file is named
`*.parquet`: state tables are Parquet named `*.pq.state` (TABLE), and those an earlier version named `*.parquet`
are read where the new name is missing and renamed when next written."""

from __future__ import annotations

import glob as globlib
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.storage import StorageOptions

STATE_DIR = "_state"
TABLE = ".pq.state"        # the suffix of state tables
OLD_TABLE = ".parquet"     # theirs before: taken for result files by readers globbing OUT/**/*.parquet
# what of a file's listing entry changes whenever it is written again: locally its inode (a staged file renamed over
# it) and mtime, on S3 its ETag and time, on GCS its generation
VERSION_KEYS = ("size", "ino", "mtime", "ETag", "etag", "LastModified", "VersionId", "generation", "md5Hash")


class StateDir:
    """`<output>/_state/`; picklable, so read tasks on any node can write listing snapshots there."""

    def __init__(self, output_uri: str, opts: StorageOptions):
        self.output_uri, self.opts = output_uri, opts
        self.fs, root = storage.filesystem(output_uri, opts)
        self.root = root.rstrip("/")
        self.path = f"{self.root}/{STATE_DIR}"
        self.staging = f"{self.path}/staging"
        self.old_tables: set[str] = set()   # tables read from an earlier version's name: removed when rewritten

    def __getstate__(self):
        return {"output_uri": self.output_uri, "opts": self.opts}

    def __setstate__(self, state):
        self.__init__(state["output_uri"], state["opts"])

    def _call(self, fn, rel: str):
        return storage.with_retries(fn, f"{self.output_uri.rstrip('/')}/{STATE_DIR}/{rel}", self.opts)

    def full(self, rel: str) -> str:
        return f"{self.path}/{rel}"

    def write_bytes(self, rel: str, data: bytes) -> None:
        self._call(lambda: storage.write_atomic(self.fs, self.full(rel), data, self.staging), rel)

    def read_bytes(self, rel: str) -> bytes | None:
        """The file's bytes, or None when it does not exist."""
        try:
            return self._call(lambda: self.fs.cat_file(self.full(rel)), rel)
        except FileNotFoundError:
            return None

    def write_json(self, rel: str, value) -> None:
        self.write_bytes(rel, json.dumps(value, default=str).encode())

    def read_json(self, rel: str):
        data = self.read_bytes(rel)
        return None if data is None else json.loads(data)

    def write_table(self, stem: str, table: pa.Table) -> None:
        """`<stem>.pq.state`; an earlier version's `<stem>.parquet`, when it was read, goes once the new file is
        whole (only then: a delete per write would double a listing snapshot's requests on S3)."""
        sink = io.BytesIO()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(stem + TABLE, sink.getvalue())
        if stem in self.old_tables:
            self.remove(stem + OLD_TABLE)
            self.old_tables.discard(stem)

    def read_table(self, stem: str) -> pa.Table | None:
        """The table at `stem` (an earlier version's file where there is no new one), None when there is none."""
        data = self.read_bytes(stem + TABLE)
        if data is None:
            data = self.read_bytes(stem + OLD_TABLE)
            if data is not None:
                self.old_tables.add(stem)
        return None if data is None else pq.read_table(io.BytesIO(data))

    def rename_old_table(self, stem: str) -> None:
        """An earlier version's `<stem>.parquet` to `<stem>.pq.state`, as it is (for tables never written again)."""
        data = self.read_bytes(stem + OLD_TABLE)
        if data is not None:
            self.write_bytes(stem + TABLE, data)
            self.remove(stem + OLD_TABLE)

    def remove_table(self, stem: str) -> None:
        self.remove(stem + TABLE)
        self.remove(stem + OLD_TABLE)

    def version(self, rel: str) -> dict[str, str] | None:
        """What identifies this state file as written (one HEAD on a store), None when it does not exist."""
        try:
            info = self._call(lambda: self.fs.info(self.full(rel)), rel)
        except FileNotFoundError:
            return None
        return {k: str(info[k]) for k in VERSION_KEYS if info.get(k) is not None}

    def list(self, rel: str) -> list[str]:
        """Names of the files directly in a state folder (sorted; [] when it does not exist)."""
        folder = self.full(rel).rstrip("/")

        def ls():
            try:
                return self.fs.ls(folder, detail=False)
            except FileNotFoundError:
                return []

        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self._call(ls, rel))

    def remove(self, rel: str, recursive: bool = False) -> None:
        target = self.full(rel)
        if not recursive:
            self._call(lambda: self._remove_files([target]), rel)
        elif storage.is_local(self.fs):
            self._call(lambda: _missing_ok(self.fs.rm, target, recursive=True), rel)
        else:
            # The files are listed, then deleted in batches, each request retried on its own: s3fs's recursive rm is
            # a listing, a HEAD and the deletes in one call, which a retry has to pass all at once (at 30% faulty
            # requests it took 11 retries and half a minute of back-off).
            self.remove_paths(self._call(lambda: self.fs.find(target), rel))

    def remove_paths(self, paths: list[str]) -> None:
        """Delete these full paths (any under the output), in batches of 1000, each batch retried on its own."""
        for start in range(0, len(paths), 1000):
            self._call(lambda: self._remove_files(paths[start:start + 1000]), "..")

    def _remove_files(self, paths: list[str]) -> None:
        """Delete these files, taken literally: fsspec's rm globs, so on a store the state of an output named
        `exp[1]` would delete `exp1`'s files of the same names. Names with glob characters go one request each."""
        literal = [p for p in paths if not globlib.has_magic(p)]
        if literal and not storage.is_local(self.fs):
            _missing_ok(self.fs.rm, literal)   # one request per 1000 keys on S3
        for path in paths:
            # locally, fsspec's rm of a list stops at the first file missing: one at a time
            if globlib.has_magic(path) or storage.is_local(self.fs):
                _missing_ok(self.fs.rm_file, path)


def _missing_ok(fn, *args, **kwargs) -> None:
    try:
        fn(*args, **kwargs)
    except FileNotFoundError:
        pass
