"""The output's statistics from per-file summaries, and a sample of items for the gallery: O(files), not O(rows).

Every result file has a summary of its rows (`pipeline.filestats`), written into its manifest row when the file was
committed (`_state/files.pq.state`; a file landed since the last fold has it in its sidecar under
`_state/inflight/`). The report lists the output once, reads the manifest and merges the summaries of the files
listed at the size the manifest has. Only a file without one (written by an earlier version, re-listed after a
restart without trusted records, someone's own merge, a file since rewritten) is read, its light columns only, and
summarized; at the end of a run (`persist`) the summaries so computed are kept in the manifest, so each file is
read for this once. The output is read as it stands (also a run in progress or a killed one), but only its result
files: those named as a run names them, directly under the prefix; any other Parquet file there is left out and
named (a user's notes file must neither stop the report nor be read as results).

The gallery's sample is drawn from a few files, not from every row: files in an order fixed by a hash of their
names (the same files for the same output), at least one file per (task, media type, ok/error) stratum, more while
a stratum has fewer rows read than the sample asks for, up to MAX_SAMPLE_FILES files and MAX_SAMPLE_ROWS rows. Of
those, only the id, task, media type and error columns are read; per stratum the N smallest ids are the
candidates. An output of at most that many files is read whole this way, and then its item count is exact
(otherwise a HyperLogLog estimate from the summaries: 0.8% standard error).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import re
import zlib
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import filestats, manifest, output, storage
from pipeline.filestats import OTHER, error_kind  # noqa: F401 - part of this module's interface
from pipeline.state import OLD_TABLE, TABLE, StateDir
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

LIGHT = ["id", "task", "media_type", "error"]   # what the sample's files are read for
MAX_SAMPLE_FILES = 64
MAX_SAMPLE_ROWS = 200_000
MAX_KINDS = 40       # kinds shown, most frequent first
INFLIGHT = "inflight"   # pipeline.progress.INFLIGHT, the sidecars' folder (not imported here: it imports Ray)
_RUN_OF_FILE = re.compile(r"part-(.+)-(\d+)\.parquet$")


@dataclass
class Scan:
    rows: int = 0
    strata: Counter = field(default_factory=Counter)         # (task, media_type, "ok"|"error") -> rows
    finish: Counter = field(default_factory=Counter)         # (task, finish_reason) -> rows
    out_tokens: dict = field(default_factory=dict)           # task -> (bin width, token sum, counts per bin)
    in_tokens: dict = field(default_factory=dict)            # media_type -> bincount of floor(log2(tokens))
    pixels: dict = field(default_factory=dict)               # media_type -> bincount of floor(log2(w * h))
    models: Counter = field(default_factory=Counter)         # (model, run_config_hash) -> rows
    errors: dict = field(default_factory=dict)               # kind -> [count, [(uri, message), ...]]
    times: dict = field(default_factory=dict)                # run -> (bin width s, [(bin start s, rows, items)])
    candidates: dict = field(default_factory=dict)           # stratum -> sorted smallest ids of the sample's files
    holders: dict = field(default_factory=dict)              # candidate id -> names of the files read that hold it
    left_out: list = field(default_factory=list)             # (path, why): not result files, or unreadable
    files: int = 0                                           # result files counted (the left out ones are not)
    read: int = 0                                            # of which summarized from their rows, not a summary
    distinct: int = 0                                        # items (distinct ids)
    exact: bool = False                                      # distinct counted, not estimated
    names: list = field(default_factory=list)                # the result files counted
    read_whole: set = field(default_factory=set)             # the files the sample read whole

    def items(self) -> int:
        """Distinct items (by id): counted when the sample read every file, else estimated from the summaries."""
        return self.distinct


def task_colors(scanned: Scan) -> dict[str, int]:
    """A fixed palette index per task, shared by the plots and the gallery."""
    return {task: k for k, task in enumerate(sorted({t for t, _, _ in scanned.strata}))}


def run_of(path: str) -> str:
    """The run tag in a result file's name (`part-<run>-<n>.parquet`), else the file name."""
    name = path.rsplit("/", 1)[-1]
    m = _RUN_OF_FILE.search(name)
    return m.group(1) if m else name


def neighbours(name: str, folders: tuple[str, ...] = ("",)) -> list[str]:
    """The files written just before and after this one by the same run (an item's rows may straddle them), in
    each of `folders` (hive folders `task=NAME/` of output.partition_by: an item's tasks are written as files of
    consecutive numbers, one per folder, so there its own number in the other folders too)."""
    folder, _, base = name.rpartition("/")
    m = _RUN_OF_FILE.fullmatch(base)
    if not m:
        return []
    n, digits = int(m.group(2)), len(m.group(2))
    names = [f"{f}part-{m.group(1)}-{k:0{digits}d}.parquet" for f in folders for k in (n - 1, n, n + 1) if k >= 0]
    return [x for x in names if x != name]


# --- statistics ------------------------------------------------------------------------------------------------


def collect(fs, root: str, state: StateDir, opts: StorageOptions, persist: bool = False, threads: int = 8,
            listed: dict[str, int] | None = None) -> tuple[Scan, dict[str, frozenset], dict[str, int]]:
    """The merged statistics of the output's result files, and (for the sample) which strata each file holds and
    its rows.
    `persist`: keep the summaries computed here in the manifest (only where nothing else writes it).
    `listed`: the result files and sizes where the caller knows them (a run that would seal the output), else the
    output is listed."""
    listed = output.listed_files(fs, root, opts) if listed is None else listed
    scanned = Scan()
    scanned.left_out = [(f"{root}/{n}", output.FOREIGN_NAME) for n in sorted(listed) if not output.is_ours(n)]
    ours = {n: size for n, size in listed.items() if output.is_ours(n)}
    merged = filestats.Merged()
    strata_of: dict[str, frozenset] = {}
    rows_of: dict[str, int] = {}
    interned: dict[frozenset, frozenset] = {}

    def add(name: str, stats: dict) -> bool:
        try:
            merged.add(stats)
        except (ValueError, TypeError, KeyError, zlib.error) as e:   # damaged: the file is read instead
            log.warning("report: the summary of %s is unreadable (%s): reading the file", name, e)
            return False
        rows_of[name] = int(stats["rows"])
        held = frozenset((t, m, s) for t, m, s, _ in stats.get("strata", ()))
        strata_of[name] = interned.setdefault(held, held)
        return True

    in_manifest: set[str] = set()
    for name, size, text in _manifest_rows(state):   # streamed: the summaries are merged, not kept
        if name in ours:
            in_manifest.add(name)
            stats = _loads(text, name) if text and size == ours[name] else None
            if stats is not None:
                add(name, stats)
    if any(n not in in_manifest for n in ours):
        for name, text in _sidecar_summaries(state, ours, in_manifest):
            stats = _loads(text, name)
            if stats is not None:
                add(name, stats)
    missing = sorted(n for n in ours if n not in strata_of)
    computed: dict[str, tuple[int, str]] = {}
    if missing:
        log.info("report: %d result file(s) have no summary yet: reading their rows", len(missing))
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for name, (stats, why) in zip(missing, pool.map(lambda n: _summarize_file(fs, root, n, opts), missing)):
                if stats is None:
                    scanned.left_out.append((f"{root}/{name}", why))
                    continue
                add(name, stats)
                if name in in_manifest:
                    computed[name] = (ours[name], filestats.dumps(stats))
    if persist and computed:
        try:
            kept = manifest.set_stats(state, computed)
            log.info("report: summaries of %d result file(s) kept in the manifest", kept)
        except Exception as e:  # noqa: BLE001 - the next report computes them again
            log.warning("report: could not keep the files' summaries in the manifest: %s: %s", type(e).__name__, e)
    _fill(scanned, merged)
    scanned.files, scanned.read = len(strata_of), len([n for n in missing if n in strata_of])
    scanned.names = sorted(strata_of)
    return scanned, strata_of, rows_of


def _loads(text: str | None, name: str) -> dict | None:
    try:
        return filestats.loads(text)
    except (ValueError, TypeError) as e:   # a damaged summary: the file is read instead
        log.warning("report: the summary of %s is unreadable (%s): reading the file", name, e)
        return None


def _manifest_rows(state: StateDir, batch: int = 1024):
    """(file, size, summary JSON or None) of every manifest row, read a batch at a time (its summaries are not
    all held at once); nothing when the manifest is missing or unreadable."""
    data = state.read_bytes(manifest.MANIFEST + TABLE)
    if data is None:
        data = state.read_bytes(manifest.MANIFEST + OLD_TABLE)
    if data is None:
        return
    try:
        # a buffered stream: a page at a time decompressed, not the whole column of summaries
        pf = pq.ParquetFile(io.BytesIO(data), buffer_size=1 << 20, pre_buffer=False)
        columns = [c for c in ("file", "size", "stats") if c in pf.schema_arrow.names]
        for part in pf.iter_batches(batch_size=batch, columns=columns):
            names, sizes = part.column("file").to_pylist(), part.column("size").to_pylist()
            texts = part.column("stats").to_pylist() if "stats" in columns else [None] * len(names)
            yield from zip(names, sizes, texts)
    except (OSError, pa.ArrowException, KeyError) as e:
        log.warning("report: the manifest is unreadable (%s: %s): its files are read", type(e).__name__, e)


def _sidecar_summaries(state: StateDir, ours: dict[str, int], in_manifest: set[str]):
    """(file, summary JSON) from the sidecars of files landed since the last fold (not in the manifest yet)."""
    for sidecar_name in state.list(INFLIGHT):
        if not sidecar_name.endswith(".json"):
            continue
        try:
            sidecar = state.read_json(f"{INFLIGHT}/{sidecar_name}")
        except (OSError, ValueError):
            continue
        name = sidecar.get("file") if isinstance(sidecar, dict) else None
        if (name in ours and name not in in_manifest and sidecar.get("stats")
                and sidecar.get("size") == ours[name]):
            yield name, sidecar["stats"]


def _summarize_file(fs, root: str, name: str, opts: StorageOptions) -> tuple[dict | None, str]:
    """(its summary, "") for a result file, else (None, why it is left out)."""
    path = f"{root}/{name}"
    arrow_fs = storage.arrow_filesystem(fs)
    try:   # a file replaced or removed since listing (run.retry_errors), or not Parquet: noted, not fatal
        def read():
            pf = pq.ParquetFile(path, filesystem=arrow_fs)
            mismatch = output.schema_mismatch(output.schema_with_partitions(pf.schema_arrow, name))
            if mismatch:
                return None, f"{output.NOT_OURS} ({mismatch})"
            columns = [c for c in filestats.COLUMNS if c in pf.schema_arrow.names]
            return output.with_partitions(pf.read(columns=columns), name), ""
        table, why = storage.with_retries(read, path, opts)
    except (OSError, pa.ArrowException) as e:
        return None, f"{type(e).__name__}: {e}"
    if table is None:
        return None, why
    return filestats.summarize(table, run_of(name)), ""


def _fill(scanned: Scan, merged: filestats.Merged) -> None:
    scanned.rows = merged.rows
    scanned.strata, scanned.finish, scanned.models = merged.strata, merged.finish, merged.models
    scanned.out_tokens = {t: (w, total, counts) for t, (w, total, counts) in merged.out.items()}
    for key, target in (("in", scanned.in_tokens), ("px", scanned.pixels)):
        for media, h in merged.log[key].items():
            used = np.flatnonzero(h)
            target[media] = h[: used[-1] + 1] if len(used) else h[:1]
    scanned.errors = {kind: [n, [("", m) for m in examples]] for kind, (n, examples) in merged.errors.items()}
    scanned.times = {run: (w, sorted((b * w, r, i) for b, (r, i) in bins.items()))
                     for run, (w, bins) in merged.times.items()}
    scanned.distinct = merged.items()


# --- the sample ----------------------------------------------------------------------------------------------------


def _order(names: list[str], seed: int) -> list[str]:
    return sorted(names, key=lambda n: hashlib.sha256(f"{seed}\0{n}".encode()).digest())


def sample_files(scanned: Scan, strata_of: dict[str, frozenset], sample: int, rows_of: dict[str, int],
                 seed: int = 0) -> list[str]:
    """The files whose light columns the sample is drawn from: every file of a small output; else one per stratum
    (the rarest strata first), then more, in an order fixed by `seed` and the names, while a stratum has fewer
    rows read than `sample` asks, up to MAX_SAMPLE_FILES files and MAX_SAMPLE_ROWS rows."""
    names = list(strata_of)
    if len(names) <= MAX_SAMPLE_FILES and sum(rows_of.get(n, 0) for n in names) <= MAX_SAMPLE_ROWS:
        return sorted(names)
    order = _order(names, seed)
    holding = Counter(s for n in names for s in strata_of[n])
    # a stratum's rows per file holding it, on average: files to read for `sample` of its rows
    wanted = {s: max(1, math.ceil(min(sample, n) / max(1.0, n / holding[s]))) for s, n in scanned.strata.items()
              if n}
    chosen: list[str] = []
    taken = Counter()
    budget = MAX_SAMPLE_ROWS

    def take(name: str) -> None:
        nonlocal budget
        chosen.append(name)
        taken.update(strata_of[name])
        budget -= rows_of.get(name, 0)

    for stratum in sorted(wanted, key=lambda s: (scanned.strata[s], s)):
        if not taken[stratum]:
            name = next((n for n in order if stratum in strata_of[n] and n not in chosen), None)
            if name is not None:
                take(name)
    for name in order:
        if len(chosen) >= MAX_SAMPLE_FILES or budget <= 0:
            break
        if name not in chosen and any(taken[s] < wanted.get(s, 0) for s in strata_of[name]):
            take(name)
    return chosen


def read_sample(fs, root: str, opts: StorageOptions, files: list[str], sample: int, seed: int = 0,
                threads: int = 8) -> tuple[dict, dict, set | None]:
    """(stratum -> the `sample` smallest ids in these files, candidate id -> files holding it, every id seen (None
    when a file was read only in part)). A large file (several row groups) is read one row group, chosen by
    `seed`; a file that cannot be read is skipped (the statistics name it if it is damaged)."""
    arrow_fs = storage.arrow_filesystem(fs)

    def read(name: str) -> tuple[pa.Table | None, bool]:
        path = f"{root}/{name}"
        try:
            def go():
                pf = pq.ParquetFile(path, filesystem=arrow_fs)
                columns = [c for c in LIGHT if c in pf.schema_arrow.names]
                groups = pf.metadata.num_row_groups
                if groups <= 1:
                    return output.with_partitions(pf.read(columns=columns), name), True
                k = int.from_bytes(hashlib.sha256(f"{seed}\0{name}".encode()).digest()[:4], "little") % groups
                return output.with_partitions(pf.read_row_group(k, columns=columns), name), False
            return storage.with_retries(go, path, opts)
        except (OSError, pa.ArrowException) as e:
            log.info("report: %s not read for the sample: %s", path, e)
            return None, False

    per_stratum: dict[tuple, set] = {}
    seen_in: dict[str, list[str]] = {}
    whole = True
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for name, (table, complete) in zip(files, pool.map(read, files)):
            whole &= complete
            if table is None or not len(table):
                continue
            ids = _col(table, "id")
            keys = zip(_col(table, "task"), _col(table, "media_type"), _status(table))
            for item_id, stratum in zip(ids, keys):
                per_stratum.setdefault(stratum, set()).add(item_id)
                holders = seen_in.setdefault(item_id, [])
                if not holders or holders[-1] != name:
                    holders.append(name)
    candidates = {s: sorted(ids)[:sample] for s, ids in per_stratum.items()}
    picked = {i for ids in candidates.values() for i in ids}
    holders = {i: seen_in[i] for i in picked}
    return candidates, holders, (set(seen_in) if whole else None)


def _col(table: pa.Table, name: str) -> list[str]:
    if name not in table.column_names:
        return [""] * len(table)
    return pc.cast(table[name], pa.string()).fill_null("").to_pylist()


def _status(table: pa.Table) -> list[str]:
    if "error" not in table.column_names:
        return ["ok"] * len(table)
    return pc.if_else(pc.is_valid(table["error"]), "error", "ok").to_pylist()


def pick_sample(candidates: dict, n: int) -> list[str]:
    """Up to n item ids, taken round-robin over the strata so that every stratum (errors included) shows."""
    order = sorted(candidates)
    picked: dict[str, None] = {}
    for r in range(max((len(v) for v in candidates.values()), default=0)):
        for stratum in order:
            ids = candidates[stratum]
            if len(picked) >= n:
                return list(picked)
            if r < len(ids):
                picked.setdefault(ids[r], None)
    return list(picked)


def throughput(points: list[tuple], width_s: int = 1, max_bins: int = 120) -> tuple[np.ndarray, np.ndarray, float]:
    """(bin start seconds since the run's first row, items/s per bin, bin width) from (second, rows, items) points
    counted in bins of `width_s` seconds; drawn in bins of a multiple of that width."""
    secs = np.array([p[0] for p in points], np.int64)
    items = np.array([p[2] for p in points], np.int64)
    start = secs.min()
    width = max(1, math.ceil((secs.max() + width_s - start) / max_bins))
    width = -(-width // width_s) * width_s
    per_bin = np.bincount((secs - start) // width, weights=items)
    return np.arange(len(per_bin)) * width, per_bin / width, float(width)
