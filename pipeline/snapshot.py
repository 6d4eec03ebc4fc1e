"""An output's result files as one consistent snapshot, for readers that must see every row exactly once while a
run or a compaction is changing the output.

A glob (`OUT/**/*.parquet`) is exact once a run has ended; during a merge it can see the merged file beside its
sources for a moment (pipeline.compact). The manifest (`_state/files.pq.state`) switches from sources to merged
files in one write, so a list taken from it never holds a row twice; files landed since the manifest's last fold
are named by their sidecars. Pass the list to any reader:

    files = snapshot.files("s3://bucket/out/", opts)
    duckdb.sql(f"select task, count(*) from read_parquet({files!r}) group by task")
    polars.scan_parquet(files) ; pyarrow.dataset.dataset(files, filesystem=...)

A file of the list can be deleted by a merge before a slow reader opens it: `read_table` takes a new snapshot
then; other readers retry the same way.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as pads

from pipeline import manifest, output, progress, storage
from pipeline.state import StateDir
from pipeline.storage import StorageOptions


def files(uri: str, opts: StorageOptions | None = None) -> list[str]:
    """Full paths (URIs off the local disk) of the output's result files, each row in exactly one of them."""
    state = StateDir(uri, opts or StorageOptions())
    # sidecars before the manifest: a file folded in between is then in the manifest (a merge never takes files
    # that are only in sidecars)
    sidecars = [state.read_json(f"{progress.INFLIGHT}/{n}") for n in state.list(progress.INFLIGHT)
                if n.endswith(".json")]
    known = manifest.read(state)
    listed = output.listed_files(state.fs, state.root, state.opts)
    if known is None:   # an output of an earlier version: no merge ever ran on it
        names = set(listed)
    else:
        names = set(known) | {s["file"] for s in sidecars if s is not None and s["file"] in listed}
    return [storage.full_uri(state.fs, f"{state.root}/{n}") for n in sorted(names)]


def read_table(uri: str, opts: StorageOptions | None = None, columns: list[str] | None = None,
               attempts: int = 5) -> pa.Table:
    """Every result row of the output, read from one snapshot (a new one when a merge deleted a file of it)."""
    opts = opts or StorageOptions()
    fsspec_fs, root = storage.filesystem(uri, opts)
    fs = storage.arrow_filesystem(fsspec_fs)
    for attempt in range(attempts):
        paths = [p.split("://", 1)[-1] for p in files(uri, opts)]
        if not paths:
            return output.SCHEMA.empty_table().select(columns or output.SCHEMA.names)
        try:
            # output.partition_by: `task` from the hive folders (string, as in unpartitioned files)
            partitioning = pads.partitioning(pa.schema([("task", pa.string())]), flavor="hive")
            dataset = pads.dataset(paths, format="parquet", filesystem=fs, partitioning=partitioning,
                                   partition_base_dir=root.rstrip("/"))
            return dataset.to_table(columns=columns)
        except FileNotFoundError:
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
