"""The sampled items' rows, all columns, read from only the result files that hold them (those the sample was drawn
from, and the files written just before and after each by the same run, where an item's other rows may be: a block
of results is cut into files at output.rows_per_file wherever its rows fall)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import output, storage
from pipeline.report.scan import neighbours
from pipeline.storage import StorageOptions


def fetch_rows(fs, root: str, opts: StorageOptions, ids: list[str], holders: dict[str, list[str]],
               listed: set[str], read: set[str], threads: int = 8) -> dict[str, list[dict]]:
    """id -> its rows (every task found), for the sampled ids; rows keep every column, extra ones included.
    `holders`: the files the sample saw each id in; `listed`: the result files; `read`: the files the sample read
    whole (their neighbours are not looked at again)."""
    if not ids:
        return {}
    files: set[str] = set()
    folders = tuple(sorted({n.rpartition("/")[0] + "/" if "/" in n else "" for n in listed}))
    for i in ids:
        for name in holders.get(i, ()):
            files.add(name)
            files.update(n for n in neighbours(name, folders) if n in listed and n not in read)
    id_set = pa.array(ids, pa.string())
    arrow_fs = storage.arrow_filesystem(fs)

    def rows_of(name: str) -> list[dict]:
        path = f"{root}/{name}"
        try:
            return storage.with_retries(lambda: _matching(pq.ParquetFile(path, filesystem=arrow_fs), id_set, name),
                                        path, opts)
        except (OSError, pa.ArrowException):   # replaced or removed since the listing
            return []

    by_id: dict[str, list[dict]] = {i: [] for i in ids}
    seen = set()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for rows in pool.map(rows_of, sorted(files)):
            for row in rows:
                key = (row["id"], row.get("task"))
                if row["id"] in by_id and key not in seen:   # an (item, task) pair written twice shows once
                    seen.add(key)
                    by_id[row["id"]].append(row)
    for rows in by_id.values():
        rows.sort(key=lambda r: str(r.get("task")))
    return {i: rows for i, rows in by_id.items() if rows}


def _matching(pf: pq.ParquetFile, id_set: pa.Array, name: str) -> list[dict]:
    """The rows whose id is in id_set: the id column is read first, then only the row groups that hold such ids
    (most neighbouring files hold none)."""
    out = []
    for k in range(pf.metadata.num_row_groups):
        ids = pc.cast(pf.read_row_group(k, columns=["id"])["id"], pa.string())
        hits = np.flatnonzero(pc.is_in(ids, value_set=id_set).fill_null(False).to_numpy(zero_copy_only=False))
        if len(hits):
            out += output.with_partitions(pf.read_row_group(k).take(pa.array(hits)), name).to_pylist()
    return out
