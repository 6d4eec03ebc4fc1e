"""The sampled items' rows, all columns, read from only the result files that hold them."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline.report.scan import PREFIX, Scan


def fetch_rows(dataset: pads.Dataset, scanned: Scan, ids: list[str], threads: int = 8) -> dict[str, list[dict]]:
    """id -> its rows (every task), for the sampled ids; rows keep every column, extra ones included."""
    if not ids:
        return {}
    wanted = np.asarray([i.encode()[:PREFIX] for i in ids], dtype=f"S{PREFIX}")
    fragments = list(dataset.get_fragments())
    hits = {i: np.flatnonzero(np.isin(keys, wanted)) for i, keys in scanned.keys.items()}
    hits = {i: rows for i, rows in hits.items() if len(rows) and i < len(fragments)}
    id_set = pa.array(ids, pa.string())

    def read(i: int) -> list[dict]:
        try:
            table = fragments[i].take(pa.array(hits[i]))
        except (OSError, pa.ArrowException, IndexError):   # replaced since the scan: read it whole instead
            try:
                table = fragments[i].to_table()
            except (OSError, pa.ArrowException):
                return []
        # a 12-byte prefix can collide, and the file may have been rewritten since the scan: check the full id
        return table.filter(pc.is_in(pc.cast(table["id"], pa.string()), value_set=id_set)).to_pylist()

    by_id: dict[str, list[dict]] = {i: [] for i in ids}
    seen = set()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for rows in pool.map(read, sorted(hits)):
            for row in rows:
                key = (row["id"], row.get("task"))
                if key not in seen:   # an (item, task) pair written twice shows once
                    seen.add(key)
                    by_id[row["id"]].append(row)
    for rows in by_id.values():
        rows.sort(key=lambda r: str(r.get("task")))
    return {i: rows for i, rows in by_id.items() if rows}
