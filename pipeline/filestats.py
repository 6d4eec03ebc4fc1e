"""A result file's summary: what the run report shows of its rows, small enough to keep in its manifest row.

    summarize(table, run)  -> stats   # of a result file's rows, computed once, when the file is written
    merge(stats_list)      -> stats   # of several files' rows together (a compacted file's row; the report)
    merge_json(texts)      -> text    # the same on the manifest's `stats` column values
    dumps(stats) / loads(text)        # the manifest's `stats` column holds dumps(stats)
    items(stats)           -> int     # distinct item ids (an estimate: see below)

The report then costs O(files), never O(rows): it reads the manifest's summaries and merges them. A summary is a
JSON-able dict (about 2.5 KB for a 512-row file; bounded whatever the file's size):

    v         1 (the format's version; a summary of another version is recomputed from its file)
    rows      rows in the file
    strata    [[task, media_type, "ok"|"error", rows], ...]
    finish    [[task, finish_reason, rows], ...]
    models    [[model, run_config_hash, rows], ...]
    out       {task: [width, sum, [rows, ...]]}  ok rows' num_output_tokens: bin k holds [k*width, (k+1)*width);
              width is a power of two, at most MAX_TOKEN_BINS(_FILE) bins; sum is the exact total (for the mean)
    in        {media_type: [lo, [rows, ...]]}    ok rows' floor(log2(num_input_tokens)), from bin lo on
    px        {media_type: [lo, [rows, ...]]}    ok rows' floor(log2(width * height)), rows with a size only
    errors    {kind: [rows, [message, ...]]}  kinds as error_kind() folds them, a few example messages each
    times     {run: [width, [[bin, rows, items], ...]]}  rows by processed_at second // width (width a power of two,
              at most MAX_TIME_BINS bins per run); items: distinct ids in the bin
    at        [first, last] processed_at (microseconds since the epoch), or null
    ids       HyperLogLog registers of the distinct ids (base64 of zlib), for items()

merge() is pure (its inputs are left as they are), associative and order-free in every count; examples and which
error kinds keep examples may depend on the order. A histogram or time axis of coarser bins than another's is
merged at the coarser width, so merge(summaries of parts) has the exact counts of summarize(all rows), binned at
least as coarsely. items() counts exactly-ish: the registers of a union are the element-wise maximum, and the
estimate is HyperLogLog's with 2**14 registers (linear counting below ~40k items, where it is within a few tenths of
a percent of the truth; about 0.8% standard error above).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import zlib
from collections import Counter
from typing import Iterable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

VERSION = 1
# the columns summarize() reads (a file's other columns are never needed)
COLUMNS = ["id", "uri", "task", "media_type", "error", "finish_reason", "num_input_tokens", "num_output_tokens",
           "width", "height", "processed_at", "model", "run_config_hash"]
MAX_TOKEN_BINS_FILE = 32     # per task, in one file's summary
MAX_TOKEN_BINS = 64          # per task, in a merged summary (the report draws at most 40 bins)
MAX_TIME_BINS_FILE = 32      # per run, in one file's summary
MAX_TIME_BINS = 128          # per run, in a merged summary (the report draws at most 120 bins)
MAX_KINDS_TRACKED = 1000     # error kinds counted apart; more (messages that fold badly) are counted as OTHER
KINDS_WITH_EXAMPLES = 50     # the most frequent kinds of a summary keep examples
EXAMPLES_PER_KIND = 3
MAX_MESSAGE = 500            # characters of an example error message
MAX_TOKENS = 1_000_000       # a larger (corrupt) token count is left out of the histogram
OTHER = "(other kinds)"
HLL_P = 14
HLL_M = 1 << HLL_P


# --- error kinds ------------------------------------------------------------------------------------------------


def error_kind(uri: str | None, message: str) -> str:
    """Group key of an error message "<uri>: <cause>": the cause up to its first detail, digits folded."""
    cause = message[len(uri) + 2:] if uri and message.startswith(f"{uri}: ") else message
    head = re.split(r" \(|: ", cause, maxsplit=1)[0].strip() or "(empty message)"
    exc = re.match(r" \((\w+(?:Error|Exception))\b", cause[len(head):])   # "model failed (RuntimeError: ...)"
    return re.sub(r"\d+", "#", head + (f" ({exc.group(1)})" if exc else ""))[:100]


# --- summarize ---------------------------------------------------------------------------------------------------


def _column(t: pa.Table, name: str, type_: pa.DataType, fill) -> pa.ChunkedArray:
    """A column cast to the type wanted (absent or null values become `fill`)."""
    if name not in t.column_names:
        return pa.chunked_array([pa.array([fill] * len(t), type_)], type_)
    return pc.cast(t[name], type_).fill_null(fill)


def _groups(t: pa.Table, keys: list[str]) -> list[tuple]:
    """(key values..., rows) per distinct combination of `keys`."""
    if not len(t):
        return []
    g = t.group_by(keys).aggregate([([], "count_all")])
    return list(zip(*(g[k].to_pylist() for k in keys), g["count_all"].to_pylist()))


def summarize(table: pa.Table, run: str = "") -> dict:
    """The summary of a result file's rows (a table with the output columns; any missing one counts as null).
    `run`: the run that wrote them (a result file's name says it: part-<run>-<n>.parquet)."""
    n = len(table)
    error = (table["error"].cast(pa.string()) if "error" in table.column_names
             else pa.chunked_array([pa.nulls(n, pa.string())], pa.string()))
    t = pa.table({
        "id": _column(table, "id", pa.string(), ""), "uri": _column(table, "uri", pa.string(), ""),
        "task": _column(table, "task", pa.string(), ""), "media": _column(table, "media_type", pa.string(), ""),
        "status": pc.if_else(pc.is_valid(error), "error", "ok"), "error": error,
        "finish": _column(table, "finish_reason", pa.string(), ""),
        "out": _column(table, "num_output_tokens", pa.int64(), 0),
        "in": _column(table, "num_input_tokens", pa.int64(), 0),
        "px": pc.multiply(_column(table, "width", pa.int64(), 0), _column(table, "height", pa.int64(), 0)),
        "model": _column(table, "model", pa.string(), ""), "hash": _column(table, "run_config_hash", pa.string(), ""),
        "at": (pc.cast(table["processed_at"], pa.int64()) if "processed_at" in table.column_names
               else pa.chunked_array([pa.nulls(n, pa.int64())], pa.int64())),
    })
    ok = t.filter(pc.equal(t["status"], "ok"))
    acc = Merged(MAX_TIME_BINS_FILE, MAX_TOKEN_BINS_FILE)
    acc.rows = n
    acc.strata.update({(a, b, c): k for a, b, c, k in _groups(t, ["task", "media", "status"])})
    acc.finish.update({(a, b): k for a, b, k in _groups(t, ["task", "finish"])})
    acc.models.update({(a, b): k for a, b, k in _groups(t, ["model", "hash"])})
    _token_hists(acc, ok)
    for key, column in (("in", "in"), ("px", "px")):
        rows = ok if key == "in" else ok.filter(pc.greater(ok["px"], 0))
        binned = pa.table({"media": rows["media"], "bin": _log2_bins(rows[column])})
        for media, b, k in _groups(binned, ["media", "bin"]):
            _add_log(acc.log[key], media, b, np.array([k], np.int64))
    _errors(acc, t.filter(pc.equal(t["status"], "error")))
    _times(acc, t, run)
    acc.regs = _registers(pc.unique(t["id"]).to_pylist()) if n else None
    return acc.summary()


def _log2_bins(values: pa.ChunkedArray) -> pa.Array:
    v = np.maximum(values.to_numpy(), 1)
    return pa.array(np.floor(np.log2(v)).astype(np.int64))


def _token_hists(acc: "Merged", ok: pa.Table) -> None:
    for task in pc.unique(ok["task"]).to_pylist():
        tokens = ok.filter(pc.equal(ok["task"], task))["out"].to_numpy()
        tokens = tokens[(tokens >= 0) & (tokens <= MAX_TOKENS)]
        if not len(tokens):
            continue
        width = _pow2_width(int(tokens.max()) + 1, acc.max_token_bins)
        acc.add_out(task, width, int(tokens.sum()), np.bincount(tokens // width))


def _pow2_width(span: int, bins: int) -> int:
    """The smallest power of two w with ceil(span / w) <= bins."""
    width = 1
    while -(-span // width) > bins:
        width *= 2
    return width


def _errors(acc: "Merged", t: pa.Table) -> None:
    for uri, message in zip(t["uri"].to_pylist(), t["error"].to_pylist()):
        acc.add_error(error_kind(uri, message), 1, [message[:MAX_MESSAGE]])


def _times(acc: "Merged", t: pa.Table, run: str) -> None:
    t = t.filter(pc.is_valid(t["at"]))
    if not len(t):
        return
    at = t["at"].to_numpy()
    acc.at = [int(at.min()), int(at.max())]
    secs = at // 1_000_000
    ids = t["id"].to_numpy(zero_copy_only=False)
    width = 1
    while len(np.unique(secs // width)) > acc.max_time_bins:
        width *= 2
    bins = secs // width
    g = pa.table({"bin": bins, "id": ids})
    rows = dict((b, k) for b, k in _groups(g, ["bin"]))
    items = Counter(b for b, _, _ in _groups(g, ["bin", "id"]))
    acc.add_times(run, width, {b: [rows[b], items[b]] for b in rows})


# --- ids: HyperLogLog ------------------------------------------------------------------------------------------


def _registers(ids: list[str]) -> np.ndarray:
    hashes = np.fromiter((int.from_bytes(hashlib.blake2b(i.encode(), digest_size=8).digest(), "little")
                          for i in ids), np.uint64, len(ids))
    regs = np.zeros(HLL_M, np.uint8)
    if not len(hashes):
        return regs
    index = (hashes >> np.uint64(64 - HLL_P)).astype(np.int64)
    rest = hashes & np.uint64((1 << (64 - HLL_P)) - 1)
    # rank: leading zeros of the 52 remaining bits, plus one (frexp is exact: the values are below 2**53)
    _, exponent = np.frexp(rest.astype(np.float64))
    rank = np.where(rest == 0, 64 - HLL_P + 1, (64 - HLL_P) - exponent + 1).astype(np.uint8)
    np.maximum.at(regs, index, rank)
    return regs


def _estimate(regs: np.ndarray) -> int:
    m = float(HLL_M)
    zeros = int(np.count_nonzero(regs == 0))
    if zeros == HLL_M:
        return 0
    raw = 0.7213 / (1 + 1.079 / m) * m * m / float(np.sum(np.ldexp(1.0, -regs.astype(np.int64))))
    if raw <= 2.5 * m and zeros:
        return int(round(m * math.log(m / zeros)))   # linear counting: the small-range estimate
    return int(round(raw))


def _encode_regs(regs: np.ndarray) -> str:
    return base64.b64encode(zlib.compress(regs.tobytes(), 6)).decode("ascii")


def _decode_regs(text: str) -> np.ndarray:
    regs = np.frombuffer(zlib.decompress(base64.b64decode(text)), np.uint8)
    if len(regs) != HLL_M:
        raise ValueError(f"{len(regs)} HyperLogLog registers, not {HLL_M}")
    return regs


# --- merge -------------------------------------------------------------------------------------------------------


class Merged:
    """Summaries being merged: counts in Counters, histograms as numpy arrays; summary() writes the dict form."""

    def __init__(self, max_time_bins: int = MAX_TIME_BINS, max_token_bins: int = MAX_TOKEN_BINS):
        self.max_time_bins, self.max_token_bins = max_time_bins, max_token_bins
        self.rows = 0
        self.strata: Counter = Counter()
        self.finish: Counter = Counter()
        self.models: Counter = Counter()
        self.out: dict[str, list] = {}            # task -> [width, sum, counts array]
        self.log: dict[str, dict[str, np.ndarray]] = {"in": {}, "px": {}}   # media -> counts per log2 bin
        self.errors: dict[str, list] = {}         # kind -> [rows, [message, ...]]
        self.times: dict[str, list] = {}          # run -> [width, {bin: [rows, items]}]
        self.at: list | None = None
        self.regs: np.ndarray | None = None

    # adding ------------------------------------------------------------------------------------------------
    def add(self, s: dict) -> None:
        """Add a summary (left unchanged). Its registers are decoded first: a summary whose sketch is damaged raises
        ValueError before anything is added."""
        regs = _decode_regs(s["ids"]) if s.get("ids") else None
        self.rows += int(s["rows"])
        for task, media, status, n in s.get("strata", ()):
            self.strata[(task, media, status)] += n
        for task, reason, n in s.get("finish", ()):
            self.finish[(task, reason)] += n
        for model, hash_, n in s.get("models", ()):
            self.models[(model, hash_)] += n
        for task, (width, total, counts) in s.get("out", {}).items():
            self.add_out(task, int(width), int(total), np.asarray(counts, np.int64))
        for key in ("in", "px"):
            for media, (lo, counts) in s.get(key, {}).items():
                _add_log(self.log[key], media, int(lo), np.asarray(counts, np.int64))
        for kind, (n, examples) in s.get("errors", {}).items():
            self.add_error(kind, int(n), [str(e) for e in examples])
        for run, (width, bins) in s.get("times", {}).items():
            self.add_times(run, int(width), {int(b): [int(r), int(i)] for b, r, i in bins})
        if s.get("at"):
            lo, hi = s["at"]
            self.at = [lo, hi] if self.at is None else [min(self.at[0], lo), max(self.at[1], hi)]
        if regs is not None:
            self.regs = regs.copy() if self.regs is None else np.maximum(self.regs, regs)

    def add_out(self, task: str, width: int, total: int, counts: np.ndarray) -> None:
        mine = self.out.get(task)
        if mine is None:
            self.out[task] = mine = [width, 0, np.zeros(0, np.int64)]
        if width == mine[0] and len(counts) <= len(mine[2]):   # the common case: in place (the array is ours)
            mine[1] += total
            mine[2][: len(counts)] += counts
            return
        wide = max(mine[0], width)
        a, b = _rebin(mine[2], mine[0], wide), _rebin(counts, width, wide)
        size = max(len(a), len(b))
        merged = np.zeros(size, np.int64)
        merged[: len(a)] += a
        merged[: len(b)] += b
        while len(merged) > self.max_token_bins:
            merged, wide = _rebin(merged, wide, 2 * wide), 2 * wide
        mine[0], mine[1], mine[2] = wide, mine[1] + total, merged

    def add_error(self, kind: str, n: int, examples: list[str]) -> None:
        if kind not in self.errors and len(self.errors) >= MAX_KINDS_TRACKED:
            kind = OTHER
        entry = self.errors.setdefault(kind, [0, []])
        entry[0] += n
        entry[1].extend(examples[: EXAMPLES_PER_KIND - len(entry[1])])

    def add_times(self, run: str, width: int, bins: dict[int, list]) -> None:
        mine = self.times.setdefault(run, [width, {}])
        if width > mine[0]:
            mine[1], mine[0] = _coarsen(mine[1], width // mine[0]), width
        factor, target = mine[0] // width, mine[1]
        for b, (rows, items) in bins.items():
            slot = target.get(b // factor)
            if slot is None:
                target[b // factor] = [rows, items]
            else:
                slot[0] += rows
                slot[1] += items
        while len(mine[1]) > self.max_time_bins:
            mine[1], mine[0] = _coarsen(mine[1], 2), 2 * mine[0]

    # reading -------------------------------------------------------------------------------------------------
    def items(self) -> int:
        return 0 if self.regs is None else _estimate(self.regs)

    def summary(self, examples_for: int = KINDS_WITH_EXAMPLES) -> dict:
        kinds = sorted(self.errors.items(), key=lambda kv: -kv[1][0])
        errors = {kind: [n, list(examples) if k < examples_for else []]
                  for k, (kind, (n, examples)) in enumerate(kinds)}
        return {
            "v": VERSION, "rows": self.rows,
            "strata": [[*k, n] for k, n in sorted(self.strata.items())],
            "finish": [[*k, n] for k, n in sorted(self.finish.items())],
            "models": [[*k, n] for k, n in sorted(self.models.items())],
            "out": {t: [w, total, counts.tolist()] for t, (w, total, counts) in sorted(self.out.items())},
            **{key: {m: _log_summary(h) for m, h in sorted(hists.items())} for key, hists in self.log.items()},
            "errors": errors,
            "times": {run: [w, sorted([b, *v] for b, v in bins.items())] for run, (w, bins) in
                      sorted(self.times.items())},
            "at": self.at,
            "ids": _encode_regs(self.regs) if self.regs is not None else None,
        }


def _coarsen(bins: dict[int, list], factor: int) -> dict[int, list]:
    """Time bins (bin -> [rows, items]) as bins `factor` times wider."""
    out: dict[int, list] = {}
    for b, (rows, items) in bins.items():
        slot = out.setdefault(b // factor, [0, 0])
        slot[0] += rows
        slot[1] += items
    return out


def _rebin(counts: np.ndarray, width: int, wide: int) -> np.ndarray:
    """Counts in bins of `width` as bins of `wide` (a multiple of it)."""
    factor = wide // width
    if factor == 1 or not len(counts):
        return counts
    padded = np.zeros(-(-len(counts) // factor) * factor, np.int64)
    padded[: len(counts)] = counts
    return padded.reshape(-1, factor).sum(axis=1)


LOG_BINS = 65   # floor(log2) of a positive int64: 0..63 (64: room to spare)


def _add_log(hists: dict, key, lo: int, counts: np.ndarray) -> None:
    """Add counts of log2 bins lo, lo + 1, ... (bins outside 0..64 are left out)."""
    h = hists.get(key)
    if h is None:
        hists[key] = h = np.zeros(LOG_BINS, np.int64)
    index = np.arange(lo, lo + len(counts))
    keep = (index >= 0) & (index < LOG_BINS)
    np.add.at(h, index[keep], counts[keep])


def _log_summary(h: np.ndarray) -> list:
    """[lo, counts from lo to the last non-zero bin]."""
    used = np.flatnonzero(h)
    if not len(used):
        return [0, []]
    return [int(used[0]), h[used[0]: used[-1] + 1].tolist()]


def accumulate(stats: Iterable[dict]) -> Merged:
    """The merged form the report reads (Counters and arrays), from summaries added one at a time: memory bounded
    by the merged summary, not by how many are added."""
    acc = Merged()
    for s in stats:
        acc.add(s)
    return acc


def merge(stats_list: Iterable[dict | None]) -> dict | None:
    """The summary of the rows of several files together: what a compaction that writes their rows into one file
    keeps in the new file's manifest row. Pure: the inputs are not changed. None when any input is None (a file
    without a summary: the new file's is then computed from its rows by the report, once)."""
    acc = Merged()
    for s in stats_list:
        if s is None or s.get("v") != VERSION:
            return None
        acc.add(s)
    return acc.summary()


def merge_json(texts: Iterable[str | None]) -> str | None:
    """merge() on the manifest's `stats` texts: the new file's `stats` when a compaction writes the rows of the
    files whose `stats` these are into one file; None when any is unknown (the report then computes it, once)."""
    stats = []
    for text in texts:
        s = loads(text)
        if s is None:
            return None
        stats.append(s)
    return dumps(merge(stats)) if stats else None


def error_rows(stats: dict) -> int:
    """How many of the summarized rows are error rows."""
    return sum(n for _, _, status, n in stats.get("strata", ()) if status == "error")


def items(stats: dict) -> int:
    """Distinct item ids in the summarized rows (HyperLogLog estimate; see the module's docstring)."""
    return accumulate([stats]).items()


# --- text form ---------------------------------------------------------------------------------------------------


def dumps(stats: dict | None) -> str | None:
    return None if stats is None else json.dumps(stats, separators=(",", ":"), ensure_ascii=False)


def loads(text: str | None) -> dict | None:
    """The summary in a manifest's `stats` column; None when there is none, or it is of another version."""
    if not text:
        return None
    stats = json.loads(text)
    return stats if isinstance(stats, dict) and stats.get("v") == VERSION else None
