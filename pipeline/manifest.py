"""Which result files the output holds: the source of truth a start checks the output against.

`_state/files.pq.state` has one row per result file: its name, size, rows, a digest of its (id, task) keys (their
uint64 hashes summed), the shards whose rows it holds, its tasks and a summary of its rows for the run report
(`pipeline.filestats`; null for a file written before summaries existed, filled in by the next run's report). A
file's row is folded in from its sidecar (written before the file, already with the size, rows and digest) once the
file has landed, so at a kill -9 a landed file has a sidecar or a row, and a file that never landed has at most a
sidecar.

A start lists the output once (unless the last run's clean close sealed it: pipeline.seal) and compares it with the
manifest; it opens no result file unless something differs:
- a file gone, or of another size (cut short, garbage appended, rewritten): named in a warning, a resized one moved
  to `_state/quarantine/<name>.quarantined` (out of readers' `*.parquet` globs); the shards it held are read again
  and their pairs found in the other files that hold them are skipped, so its pairs are redone exactly once;
- a file the manifest does not know: with our schema and exactly the rows of the files that are gone (a user's
  compaction: same row count and key digest, no key twice) it is adopted in their place; with our schema but other
  rows the run stops (`OutputChanged`), since counting or ignoring its rows could duplicate or lose pairs; anything
  else (another tool's file, a torn one) is named in a warning and left where it is (moved aside with
  `output.quarantine = true`, and always when it is torn and named like ours).

Files of an output written before the manifest existed get rows with unknown shards (and rows, digest). When such a
file is damaged there is no telling which shards to read again: the records are dropped and the output is scanned
whole once, as an output without records is.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipeline import output, storage
from pipeline.errors import OutputChanged
from pipeline.items import key_hash
from pipeline.state import StateDir

log = logging.getLogger(__name__)

MANIFEST = "files"   # a state table: _state/files.pq.state
SCHEMA = pa.schema([("file", pa.string()), ("size", pa.int64()), ("rows", pa.int64()), ("digest", pa.uint64()),
                    ("shards", pa.list_(pa.string())), ("tasks", pa.list_(pa.string())),
                    ("stats", pa.string())])   # pipeline.filestats' summary of its rows (JSON), null when unknown
UNKNOWN = {"rows": -1, "digest": 0, "shards": None, "tasks": [], "stats": None}   # written before the manifest


def read(state: StateDir) -> dict[str, dict] | None:
    """The manifest, or None when the output has none (new, or written by an earlier version)."""
    table = state.read_table(MANIFEST)
    if table is None:
        return None
    # a manifest of an earlier version lacks the later columns (stats): unknown, None
    columns = [table[c].to_pylist() if c in table.column_names else [None] * len(table) for c in SCHEMA.names]
    keys = SCHEMA.names[1:]
    return {name: dict(zip(keys, row)) for name, *row in zip(*columns)}   # by rows: ~2x faster than by index


def write(state: StateDir, files: dict[str, dict]) -> None:
    rows = {c: [e.get(c) for e in files.values()] for c in SCHEMA.names[1:]}
    state.write_table(MANIFEST, pa.table({"file": list(files), **rows}, schema=SCHEMA))


def sidecar_entry(sidecar: dict, size: int) -> dict:
    """A landed file's row from its sidecar (one written by an earlier version has no size: unknown rows)."""
    if "size" not in sidecar:
        return {**UNKNOWN, "size": size, "shards": sidecar["shards"], "tasks": sidecar["tasks"]}
    return {c: sidecar.get(c) for c in SCHEMA.names[1:]}   # an earlier version's sidecar has no stats


@dataclass
class Check:
    """A start's comparison of the output's listing ({name: size}) with the manifest and the sidecars."""
    state: StateDir
    listed: dict[str, int]
    files: dict[str, dict]                     # the manifest; changed in place
    sidecars: dict[str, dict]                  # sidecars of files not in the manifest yet, by file name
    move_foreign: bool                         # output.quarantine
    reopen: set[str] = field(default_factory=set)   # shards whose pairs must be looked for again
    scan: bool = False                         # a damaged file's shards are unknown: scan the output whole
    changed: bool = False                      # the manifest must be written again
    moved: set[str] = field(default_factory=set)   # listed files set aside
    left: list[str] = field(default_factory=list)   # foreign files left where they are (named at every start)

    built: bool = False                        # the manifest was just made from the listing (no manifest yet)

    def run(self) -> None:
        unknown = []
        for name, size in self.listed.items():
            if name in self.files:
                if self.files[name]["size"] == size:
                    continue
                if self.sidecars.get(name, {}).get("size") == size:
                    self._landed(name, size)   # rewritten whole (run.retry_errors) and killed before the manifest
                else:
                    self._damaged(name, f"its size is {size} bytes, not the {self.files[name]['size']} written")
            elif name in self.sidecars:
                self._landed(name, size)
            elif self.built and output.is_ours(name):
                self.files[name] = {**UNKNOWN, "size": size}
                self.changed = True
            else:
                unknown.append(name)
        for name, sidecar in self.sidecars.items():
            if name not in self.listed and name in self.files and sidecar["rows"] == 0:
                self._reopen_shards(self.files.pop(name))   # deleted by run.retry_errors: all its rows were errors
            elif name not in self.listed and name not in self.files:
                # never landed (a kill between sidecar and file), or deleted before its row was folded in
                log.info("result file %s named by a sidecar is not in the output: its shards are read again", name)
                self.reopen.update(sidecar["shards"])
        missing = [n for n in self.files if n not in self.listed]
        candidates = self.unknown(unknown)
        if candidates and not self._adopt(candidates, missing):
            self._refuse(candidates, missing)
        for name in missing:
            if name in self.files:
                self._lost(name, "it is gone", move=False)

    def _move(self, name: str) -> None:
        quarantine(self.state, name)
        self.moved.add(name)

    def _landed(self, name: str, size: int) -> None:
        row = sidecar_entry(self.sidecars[name], size)
        self.files[name], self.changed = row, True
        if row["size"] != size:
            self._damaged(name, f"its size is {size} bytes, not the {row['size']} written")

    def _damaged(self, name: str, why: str) -> None:
        self._lost(name, why, move=True)

    def _reopen_shards(self, row: dict) -> None:
        self.changed = True
        self.reopen.update(row["shards"])

    def _lost(self, name: str, why: str, move: bool) -> None:
        row = self.files.pop(name)
        self.changed = True
        if row["shards"] is None:
            log.warning("result file %s/%s was written by an earlier version and %s: the output is scanned "
                        "whole once", self.state.root, name, why)
            self.scan = True
        else:
            log.warning("result file %s/%s is damaged (%s): its pairs are redone", self.state.root, name, why)
            self.reopen.update(row["shards"])
        if move:
            self._move(name)

    def unknown(self, names: list[str]) -> dict[str, np.ndarray]:
        """Files the manifest does not know: those with our schema are returned with their keys; the others are
        named in a warning and left where they are (moved aside when torn and named like ours, or when asked)."""
        candidates = {}
        for name in names:
            why = _not_ours(self.state, name)
            if not why:
                candidates[name] = _keys(self.state, name)
                continue
            move = self.move_foreign or output.is_ours(name)   # named like ours, it would pass for one
            log.warning("output file %s/%s is %s%s", self.state.root, name, why,
                        f": moved to {self.state.full(QUARANTINE)}/" if move else
                        ": left where it is (readers of the output's *.parquet will read it too; move it away, or "
                        "set output.quarantine = true to have runs move such files aside)")
            if move:
                self._move(name)
            else:
                self.left.append(name)
        return candidates

    def _adopt(self, candidates: dict[str, np.ndarray], missing: list[str]) -> bool:
        """A user's merge of result files: the files gone hold, together, exactly the candidates' keys."""
        gone = [self.files[n] for n in missing]
        if not gone or any(r["rows"] < 0 or r["shards"] is None for r in gone):
            return False
        keys = np.concatenate(list(candidates.values()))
        if (len(keys) != sum(r["rows"] for r in gone) or len(np.unique(keys)) != len(keys)
                or output.digest(keys) != output.digest(np.array([r["digest"] for r in gone], np.uint64))):
            return False
        shards = sorted({s for r in gone for s in r["shards"]})
        tasks = sorted({t for r in gone for t in r["tasks"]})
        for name, held in candidates.items():
            self.files[name] = {"size": self.listed[name], "rows": len(held), "digest": output.digest(held),
                                "shards": shards, "tasks": tasks}
        for name in missing:
            del self.files[name]
        self.changed = True
        log.warning("output files %s hold exactly the rows of the %d result files gone since the last run (%d "
                    "rows): adopted in their place, nothing is redone", ", ".join(sorted(candidates)), len(gone),
                    len(keys))
        return True

    def _refuse(self, candidates: dict[str, np.ndarray], missing: list[str]) -> None:
        names = ", ".join(sorted(candidates))
        if self.built or any(self.files[n]["shards"] is None or self.files[n]["rows"] < 0 for n in missing):
            log.warning("output files %s hold result rows and files written by an earlier version are gone: the "
                        "output is scanned whole once and their rows count as done", names)
            self.scan = True
            return
        if not self.move_foreign:
            rows = sum(len(k) for k in candidates.values())
            raise OutputChanged(
                f"{self.state.root}: {names} hold(s) {rows} result rows that are not exactly those of the "
                f"{len(missing)} result file(s) gone since the last run: move them out of the output (or restore "
                f"the files they were made from) and run again; output.quarantine = true moves them aside and redoes "
                f"the pairs of the files gone")
        for name in candidates:
            log.warning("output file %s/%s holds result rows the manifest does not know: moved to %s/",
                        self.state.root, name, self.state.full(QUARANTINE))
            self._move(name)


def _not_ours(state: StateDir, name: str) -> str:
    """'' for a file with every output column; else why it is not a result file of ours."""
    fs = storage.arrow_filesystem(state.fs)
    try:
        schema = output.read_result_schema(fs, state.root, name, state.opts)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as e:
        if storage.is_transient(e) or isinstance(e, FileNotFoundError):
            raise
        return f"not a readable Parquet file ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
    mismatch = output.schema_mismatch(schema)
    return f"{output.NOT_OURS} ({mismatch})" if mismatch else ""


def _keys(state: StateDir, name: str) -> np.ndarray:
    fs = storage.arrow_filesystem(state.fs)
    table = output.read_result(fs, state.root, name, state.opts, columns=["id", "task"])
    return key_hash(table["id"].to_pylist(), table["task"].to_pylist())


QUARANTINE = "quarantine"
SUFFIX = ".quarantined"


def quarantine(state: StateDir, name: str) -> None:
    """Move an output file out of the readers' way: under `_state/quarantine/`, its name ending in `.quarantined`
    so that no `**/*.parquet` glob picks it up. The move is a copy then a delete; a retry that finds the source
    gone is the move done (only the answer to its delete was lost)."""
    # one folder: task=caption/part-... is task=caption@part-...quarantined there
    source, target = f"{state.root}/{name}", state.full(f"{QUARANTINE}/{name.replace('/', '@')}{SUFFIX}")

    def move():
        state.fs.makedirs(state.full(QUARANTINE), exist_ok=True)
        try:
            state.fs.mv(source, target)
        except FileNotFoundError:
            try:
                state.fs.info(source)   # not fs.exists(), which answers False for any error
            except FileNotFoundError:
                return
            raise OSError(errno.EAGAIN, f"moving {source} failed: it is still there") from None

    storage.with_retries(move, source, state.opts)


def set_stats(state: StateDir, stats: dict[str, tuple[int, str]]) -> int:
    """Fill in the `stats` of manifest rows that have none: {file: (its size, summary JSON)}, summaries computed by
    the report from the files (written by an earlier version, or after a restart without trusted records). Only rows
    still of that size and without stats are changed; returns how many. The manifest is read and written again
    here: call it only where nothing else writes it (the run's end, under its lease, after the ledger's last fold)."""
    files = read(state) if stats else None
    if not files:
        return 0
    changed = 0
    for name, (size, text) in stats.items():
        row = files.get(name)
        if row is not None and row["size"] == size and row.get("stats") is None:
            row["stats"] = text
            changed += 1
    if changed:
        write(state, files)
    return changed
