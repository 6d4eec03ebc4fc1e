"""One pass over an output's light columns: counts, histograms, throughput, error kinds and a stratified sample.

The output is read as it stands (also a run in progress or a killed one), but only its result files: those named
as a run names them, directly under the prefix, holding the output columns; any other Parquet file there is left
out and named (a user's notes file must neither stop the report nor be read as results). Only the columns named
in LIGHT are read, a few result files per thread at a time, and only aggregates are kept: per (task, media type,
ok/error) stratum the N smallest item ids (ids are SHA-256 hex, so that is a uniform sample that stays the same as
the output grows), and a 12-byte id prefix per row so that the sampled items' rows can be found again without a
second pass.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from pipeline import output, storage
from pipeline.storage import StorageOptions

LIGHT = ["id", "uri", "task", "media_type", "error", "finish_reason", "num_input_tokens", "num_output_tokens",
         "width", "height", "processed_at", "model", "run_config_hash"]
PREFIX = 12            # bytes of the id kept per row to find the sampled rows again (collisions are re-checked)
FILES_PER_CHUNK = 16   # result files a thread reads, concatenates and aggregates at once
EXAMPLES_PER_KIND = 3
MAX_KINDS = 40       # kinds shown, most frequent first
MAX_TRACKED = 1000   # kinds counted apart; more (messages that fold badly) are counted as OTHER
OTHER = "(other kinds)"
MAX_MESSAGE = 500    # characters of an example error message
_RUN_OF_FILE = re.compile(r"part-(.+)-\d+\.parquet$")


@dataclass
class Scan:
    rows: int = 0
    strata: Counter = field(default_factory=Counter)         # (task, media_type, "ok"|"error") -> rows
    finish: Counter = field(default_factory=Counter)         # (task, finish_reason) -> rows
    out_tokens: dict = field(default_factory=dict)           # task -> bincount of num_output_tokens
    in_tokens: dict = field(default_factory=dict)            # media_type -> bincount of floor(log2(tokens))
    pixels: dict = field(default_factory=dict)               # media_type -> bincount of floor(log2(w * h))
    models: Counter = field(default_factory=Counter)         # (model, run_config_hash) -> rows
    errors: dict = field(default_factory=dict)               # kind -> [count, [(uri, message), ...]]
    times: dict = field(default_factory=dict)                # run -> [(seconds, rows, items) arrays]
    candidates: dict = field(default_factory=dict)           # stratum -> sorted smallest ids
    keys: dict = field(default_factory=dict)                 # fragment index -> (rows,) S12 id prefixes
    left_out: list = field(default_factory=list)             # (path, why): not result files, or unreadable
    files: int = 0                                           # result files read (the left out ones are not)

    def items(self) -> int:
        """Distinct items (by id prefix)."""
        keys = [k for k in self.keys.values() if len(k)]
        return int(np.unique(np.concatenate(keys)).size) if keys else 0


def task_colors(scanned: Scan) -> dict[str, int]:
    """A fixed palette index per task, shared by the plots and the gallery."""
    return {task: k for k, task in enumerate(sorted({t for t, _, _ in scanned.strata}))}


def open_dataset(fs, root: str, opts: StorageOptions) -> tuple[pads.FileSystemDataset, list[tuple[str, str]]]:
    """The result files under `root` (named as a run names them) as a dataset with the output schema, and the
    other Parquet files there with why they are left out. The schema is given, not taken from the first file as
    pyarrow's discovery would: someone else's file sorting first would make every result file misread."""
    names = output.result_files(fs, root, opts)
    foreign = [(f"{root}/{n}", output.FOREIGN_NAME) for n in names if not output.is_ours(n)]
    paths = [f"{root}/{n}" for n in names if output.is_ours(n)]
    return pads.FileSystemDataset.from_paths(paths, schema=output.SCHEMA, format=pads.ParquetFileFormat(),
                                             filesystem=storage.arrow_filesystem(fs)), foreign


def run_of(path: str) -> str:
    """The run tag in a result file's name (`part-<run>-<n>.parquet`), else the file name."""
    name = path.rsplit("/", 1)[-1]
    m = _RUN_OF_FILE.search(name)
    return m.group(1) if m else name


def error_kind(uri: str | None, message: str) -> str:
    """Group key of an error message "<uri>: <cause>": the cause up to its first detail, digits folded."""
    cause = message[len(uri) + 2:] if uri and message.startswith(f"{uri}: ") else message
    head = re.split(r" \(|: ", cause, maxsplit=1)[0].strip() or "(empty message)"
    exc = re.match(r" \((\w+(?:Error|Exception))\b", cause[len(head):])   # "model failed (RuntimeError: ...)"
    return re.sub(r"\d+", "#", head + (f" ({exc.group(1)})" if exc else ""))[:100]


def scan(dataset: pads.Dataset, sample: int, threads: int = 8) -> Scan:
    """Aggregate every result file of `dataset`; keep `sample` candidate ids per stratum."""
    fragments = list(dataset.get_fragments())
    columns = [c for c in LIGHT if c in dataset.schema.names]
    chunks = [list(range(i, min(i + FILES_PER_CHUNK, len(fragments))))
              for i in range(0, len(fragments), FILES_PER_CHUNK)]
    total = Scan()
    with ThreadPoolExecutor(max_workers=threads) as pool:
        for part in pool.map(lambda c: _scan_chunk(dataset, fragments, c, columns, sample), chunks):
            _merge(total, part, sample)
    return total


def _read_chunk(dataset, fragments, chunk, columns, part: Scan) -> pa.Table | None:
    tables = []
    for i in chunk:
        path = fragments[i].path
        t, why = _read_file(dataset, path, columns)
        if t is None:
            part.left_out.append((path, why))
            continue
        part.keys[i] = _prefixes(t["id"]) if "id" in columns else np.zeros(len(t), f"S{PREFIX}")
        tables.append(t.append_column("run", pa.array([run_of(path)] * len(t), pa.string())))
    part.files = len(tables)
    return pa.concat_tables(tables) if tables else None


def _read_file(dataset, path: str, columns) -> tuple[pa.Table | None, str]:
    """(its light columns, "") for a result file, else (None, why it is left out)."""
    # a fragment of its own, so that the footer read for the schema check is freed with it
    fragment = dataset.format.make_fragment(path, dataset.filesystem)
    try:   # a file replaced or removed since listing (run.retry_errors), or not Parquet: noted, not fatal
        mismatch = output.schema_mismatch(fragment.physical_schema)
        if mismatch:
            return None, f"{output.NOT_OURS} ({mismatch})"
        return fragment.to_table(columns=columns, schema=dataset.schema), ""
    except (OSError, pa.ArrowException) as e:
        return None, f"{type(e).__name__}: {e}"


def _prefixes(ids: pa.ChunkedArray) -> np.ndarray:
    short = pc.binary_slice(ids.cast(pa.binary()), 0, PREFIX).fill_null(b"")
    return np.asarray(short.to_numpy(zero_copy_only=False), dtype=f"S{PREFIX}")


def _column(t: pa.Table, name: str, type_: pa.DataType, fill) -> pa.ChunkedArray:
    """A column cast to the type the report expects (absent or null values become `fill`)."""
    if name not in t.column_names:
        return pa.chunked_array([pa.array([fill] * len(t), type_)])
    return pc.cast(t[name], type_).fill_null(fill)


def _scan_chunk(dataset, fragments, chunk, columns, sample) -> Scan:
    part = Scan()
    t = _read_chunk(dataset, fragments, chunk, columns, part)
    if t is None or not len(t):
        return part
    part.rows = len(t)
    error = t["error"] if "error" in t.column_names else pa.chunked_array([pa.nulls(len(t), pa.string())])
    t = pa.table({
        "id": _column(t, "id", pa.string(), ""), "uri": _column(t, "uri", pa.string(), ""),
        "task": _column(t, "task", pa.string(), ""), "media": _column(t, "media_type", pa.string(), ""),
        "status": pc.if_else(pc.is_valid(error), "error", "ok"), "error": error,
        "finish": _column(t, "finish_reason", pa.string(), ""),
        "out_tokens": _column(t, "num_output_tokens", pa.int64(), 0),
        "in_tokens": _column(t, "num_input_tokens", pa.int64(), 0),
        "pixels": pc.multiply(_column(t, "width", pa.int64(), 0), _column(t, "height", pa.int64(), 0)),
        "model": _column(t, "model", pa.string(), ""), "hash": _column(t, "run_config_hash", pa.string(), ""),
        "at": pc.cast(t["processed_at"], pa.int64()) if "processed_at" in t.column_names else pa.nulls(len(t)),
        "run": t["run"],
    })
    _count(part, t)
    _histograms(part, t)
    _errors(part, t.filter(pc.equal(t["status"], "error")))
    _times(part, t)
    _candidates(part, t, sample)
    return part


def _groups(t: pa.Table, keys: list[str]) -> list[tuple]:
    """(key values..., rows) per distinct combination of `keys`."""
    g = t.group_by(keys).aggregate([([], "count_all")])
    return list(zip(*(g[k].to_pylist() for k in keys), g["count_all"].to_pylist()))


def _count(part: Scan, t: pa.Table) -> None:
    for task, media, status, n in _groups(t, ["task", "media", "status"]):
        part.strata[(task, media, status)] += n
    for task, finish, n in _groups(t, ["task", "finish"]):
        part.finish[(task, finish)] += n
    for model, hash_, n in _groups(t, ["model", "hash"]):
        part.models[(model, hash_)] += n


def _log2_bins(values: pa.ChunkedArray) -> pa.Array:
    v = np.maximum(values.to_numpy(), 1)
    return pa.array(np.floor(np.log2(v)).astype(np.int64))


def _histograms(part: Scan, t: pa.Table) -> None:
    ok = t.filter(pc.equal(t["status"], "ok"))
    for task, tokens, n in _groups(ok, ["task", "out_tokens"]):
        _add_bin(part.out_tokens, task, tokens, n)
    sized = ok.filter(pc.greater(ok["pixels"], 0))
    binned = pa.table({"media": sized["media"], "bin": _log2_bins(sized["pixels"])})
    for media, b, n in _groups(binned, ["media", "bin"]):
        _add_bin(part.pixels, media, b, n)
    binned = pa.table({"media": ok["media"], "bin": _log2_bins(ok["in_tokens"])})
    for media, b, n in _groups(binned, ["media", "bin"]):
        _add_bin(part.in_tokens, media, b, n)


def _add_bin(hists: dict, key, index: int, n: int) -> None:
    if index < 0 or index > 1_000_000:   # a corrupt count must not allocate a huge histogram
        return
    h = hists.get(key)
    if h is None or len(h) <= index:
        grown = np.zeros(max(index + 1, 2 * len(h) if h is not None else 0), np.int64)
        if h is not None:
            grown[: len(h)] = h
        hists[key] = h = grown
    h[index] += n


def _errors(part: Scan, t: pa.Table) -> None:
    for uri, message in zip(t["uri"].to_pylist(), t["error"].to_pylist()):
        entry = _error_entry(part.errors, error_kind(uri, message))
        entry[0] += 1
        if len(entry[1]) < EXAMPLES_PER_KIND:
            entry[1].append((uri, message[:MAX_MESSAGE]))


def _error_entry(errors: dict, kind: str) -> list:
    if kind not in errors and len(errors) >= MAX_TRACKED:
        kind = OTHER
    return errors.setdefault(kind, [0, []])


def _times(part: Scan, t: pa.Table) -> None:
    t = t.filter(pc.is_valid(t["at"]))
    if not len(t):
        return
    t = t.set_column(t.column_names.index("at"), "at", pc.divide(t["at"], 1_000_000))   # microseconds -> s
    per_item = t.group_by(["run", "at", "id"]).aggregate([([], "count_all")])
    rows = {(r, s): n for r, s, n in _groups(t, ["run", "at"])}
    items = {(r, s): n for r, s, n in _groups(per_item, ["run", "at"])}
    for (run, sec), n in rows.items():
        part.times.setdefault(run, []).append((sec, n, items[(run, sec)]))


def _candidates(part: Scan, t: pa.Table, sample: int) -> None:
    ids = np.asarray(t["id"].to_numpy(zero_copy_only=False), dtype=object)
    for task, media, status, _ in _groups(t, ["task", "media", "status"]):
        mask = pc.and_(pc.and_(pc.equal(t["task"], task), pc.equal(t["media"], media)),
                       pc.equal(t["status"], status))
        chosen = np.unique(ids[mask.to_numpy(zero_copy_only=False)])[:sample]
        part.candidates[(task, media, status)] = list(chosen)


def _merge(total: Scan, part: Scan, sample: int) -> None:
    total.rows += part.rows
    total.files += part.files
    total.strata.update(part.strata)
    total.finish.update(part.finish)
    total.models.update(part.models)
    for mine, theirs in ((total.out_tokens, part.out_tokens), (total.in_tokens, part.in_tokens),
                         (total.pixels, part.pixels)):
        for key, h in theirs.items():
            for index in np.flatnonzero(h):
                _add_bin(mine, key, int(index), int(h[index]))
    for kind, (count, examples) in part.errors.items():
        entry = _error_entry(total.errors, kind)
        entry[0] += count
        entry[1].extend(examples[: EXAMPLES_PER_KIND - len(entry[1])])
    for run, points in part.times.items():
        total.times.setdefault(run, []).extend(points)
    for stratum, ids in part.candidates.items():
        total.candidates[stratum] = sorted(set(total.candidates.get(stratum, [])) | set(ids))[:sample]
    total.keys.update(part.keys)
    total.left_out.extend(part.left_out)


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


def throughput(points: list[tuple], max_bins: int = 120) -> tuple[np.ndarray, np.ndarray, float]:
    """(bin start seconds since the run's first row, items/s per bin, bin width) from (second, rows, items)."""
    secs = np.array([p[0] for p in points], np.int64)
    items = np.array([p[2] for p in points], np.int64)
    start = secs.min()
    width = max(1, math.ceil((secs.max() - start + 1) / max_bins))
    per_bin = np.bincount((secs - start) // width, weights=items)
    return np.arange(len(per_bin)) * width, per_bin / width, float(width)
