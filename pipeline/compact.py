"""Compaction: the small result files of finished shards merged into files of `output.target_file_mb`.

Small files are the commit unit while a shard is in flight; once every shard a file holds has its completion
record, nothing will ever write those rows again, and they can be rewritten as big files (zstd, row groups of at
least ROW_GROUP_ROWS rows) that analytics engines read well. One merge, kill -9 safe at every step, on S3 too:

  1. plan    `_state/compact/<tag>.json` = {"tag", "sources"}: the files to merge (the driver)
  2. merge   `part-<tag>-<n>.parquet`, each whole (a Ray task in the job, or `jobs/compact.py`); their rows and
             key digest must equal the sources' (verified), or the targets are deleted and the sources stay
  3. switch  the manifest (`_state/files.pq.state`) drops the sources and takes the targets, in one write
  4. delete  the sources, then the plan

A start finds the plans a killed run left (`recover`): a plan whose targets are in the manifest was switched, and
its sources still listed are deleted; any other plan is undone, its targets deleted. Completion records are per
shard, not per file: a merge changes none of them, so a resume after compaction skips every pair.

Readers that take the manifest's list of files (`pipeline.snapshot`) see every pair exactly once at every moment.
A reader that globs `OUT/**/*.parquet` during step 3-4 of a merge can see its rows twice (targets and sources both
there for a moment); after the run, or between merges, globs are exact.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
import time
import uuid
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import filestats, output, storage
from pipeline.items import key_hash
from pipeline.state import StateDir
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

PLANS = "compact"              # _state/compact/<tag>.json
ROW_GROUP_ROWS = 128 * 1024    # what scan engines want: >= 100k rows a row group (or the whole file)
BIG_ENOUGH = 0.75              # a file of this share of the target size is left as it is
TAG = re.compile(r"part-(\d{8}-\d{6}-[0-9a-f]{8})-\d{6}\.parquet")


def new_tag() -> str:
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"


def tag_of(name: str) -> str:
    """The run or merge that wrote a result file ('' for a name not ours)."""
    m = TAG.fullmatch(name.rsplit("/", 1)[-1])
    return m.group(1) if m else ""


def groups(files: dict[str, dict], closed: list[str], target_bytes: int, final: bool,
           shrink: float = 1.0) -> list[list[str]]:
    """Closed small files in groups whose merge makes about `target_bytes` (in the order they were written, which
    keeps an input's neighbours together); `shrink`: merged bytes per source byte so far (each small file carries a
    footer the merge writes once). Only a group that reaches the target is returned, unless `final` (the end of a
    run), when the rest of at least two files goes too."""
    out, group, size = [], [], 0.0
    for name in sorted(closed):   # a hive folder's files are neighbours: a group never mixes folders
        if files[name]["size"] >= BIG_ENOUGH * target_bytes:
            continue
        if group and _folder(group[-1]) != _folder(name):
            if final and len(group) >= 2:
                out.append(group)
            group, size = [], 0.0
        group.append(name)
        size += files[name]["size"] * shrink
        if size >= target_bytes:
            out.append(group)
            group, size = [], 0
    if final and len(group) >= 2:
        out.append(group)
    return out


def _folder(name: str) -> str:
    return name.rpartition("/")[0]


# --- the merge (runs in a Ray task or in jobs/compact.py) ------------------------------------------------------


def merge(uri: str, opts: StorageOptions, sources: list[str], tag: str) -> list[dict]:
    """Write the rows of `sources` (names under the output root) as `part-<tag>-<n>.parquet`: one file per distinct
    schema among them (a run that kept other input columns wrote files of another schema). Returns, per file
    written, {"file", "size", "rows", "digest", "sources"}. Memory: one row group and one source file at a time."""
    fs, root = storage.filesystem(uri, opts)
    root = root.rstrip("/")
    arrow_fs = storage.arrow_filesystem(fs)
    by_schema: dict[pa.Schema, list[str]] = {}
    for name in sources:
        path = f"{root}/{name}"
        schema = storage.with_retries(lambda: pq.read_schema(path, filesystem=arrow_fs), path, opts)
        by_schema.setdefault(schema, []).append(name)
    written = []
    for n, (schema, names) in enumerate(by_schema.items()):
        folder = _folder(names[0])
        target = f"{folder}/part-{tag}-{n:06d}.parquet" if folder else f"part-{tag}-{n:06d}.parquet"
        rows, digest = _write_merged(fs, arrow_fs, root, opts, schema, names, target)
        size = storage.with_retries(lambda: fs.size(f"{root}/{target}"), target, opts)
        written.append({"file": target, "size": int(size), "rows": rows, "digest": digest, "sources": names})
    return written


def _write_merged(fs, arrow_fs, root: str, opts: StorageOptions, schema: pa.Schema, names: list[str],
                  target: str) -> tuple[int, int]:
    staging = f"{root}/_state/staging"
    local = storage.is_local(fs)
    if local:
        os.makedirs(staging, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".tmp", dir=staging if local else None)
    os.close(fd)
    rows, digest = 0, 0
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            pending: list[pa.Table] = []
            buffered = 0
            for name in names:
                path = f"{root}/{name}"
                table = storage.with_retries(lambda: pq.read_table(path, filesystem=arrow_fs), path, opts)
                rows += table.num_rows
                keyed = output.with_partitions(table, name)   # a partitioned file's task is its folder's
                keys = key_hash(keyed["id"].to_pylist(), keyed["task"].to_pylist())
                digest = (digest + output.digest(keys)) % (1 << 64)
                pending.append(table)
                buffered += table.num_rows
                if buffered >= ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(pending), row_group_size=buffered)
                    pending, buffered = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=max(buffered, 1))
        storage.with_retries(lambda: storage.put_file_atomic(fs, tmp, f"{root}/{target}", staging), target, opts)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return rows, digest


def on_ray(num_cpus: float = 1.0):
    """(submit, ready) that run merges as Ray tasks: beside the model actors, never in the driver. A task whose
    worker dies is retried by Ray (it writes the same files again, whole); one that fails for good is undone."""
    import ray

    task = ray.remote(num_cpus=num_cpus, max_retries=2)(merge)

    def submit(uri, opts, sources, tag):
        return task.remote(uri, opts, sources, tag)

    def ready(handles: list, wait: bool) -> list[tuple]:
        done, _ = ray.wait(handles, num_returns=1 if wait else len(handles), timeout=None if wait else 0)
        results = []
        for handle in done:
            try:
                results.append((handle, ray.get(handle)))
            except Exception as e:  # noqa: BLE001 - a lost node, a storage outage: the merge is undone
                results.append((handle, e))
        return results

    return submit, ready


# --- the plan, switch and clean-up (the driver, or jobs/compact.py) -------------------------------------------


@dataclass
class Compactor:
    """Plans merges of the ledger's closed files, has them run by `submit` (a Ray task in the job; a plain call in
    jobs/compact.py), verifies and switches each as it finishes. The ledger (pipeline.progress.Ledger) holds the
    manifest; only the driver's thread calls this."""
    ledger: object
    uri: str
    opts: StorageOptions
    target_bytes: int
    everything: bool = False       # merge every file of known rows, open shards' too (jobs/compact.py: no run
                                   # writes while it holds the lease; a resume then reads the merged file's keys)
    submit: object = None          # (uri, opts, sources, tag) -> handle; None: merge here
    ready: object = None           # handles -> (finished handles, their results or exceptions)
    in_flight: int = 2
    running: dict = field(default_factory=dict)   # handle -> (tag, sources)
    merged_files: int = 0          # sources merged away
    source_bytes: int = 0
    written_bytes: int = 0
    written_files: int = 0         # targets now in the manifest
    failed: int = 0

    def step(self, final: bool = False) -> None:
        """Switch what finished; start what is due while fewer than `in_flight` merges run."""
        self._collect(wait=False)
        planned, due = None, []
        while len(self.running) < self.in_flight:
            if planned is None or abs(self._shrink() - planned) > 0.25 * planned:   # learnt from a merge just done
                planned = self._shrink()
                busy = {s for _, sources in self.running.values() for s in sources}
                closed = [n for n in self.ledger.closed_files(self.everything) if n not in busy]
                due = groups(self.ledger.files, closed, self.target_bytes, final, planned)
            if not due:
                return
            self._start(due.pop(0))

    def _shrink(self) -> float:
        return self.written_bytes / self.source_bytes if self.source_bytes else 1.0

    def settle(self) -> None:
        """Wait for the merges running, starting none (before the output is checked again after a fault)."""
        while self.running:
            self._collect(wait=True)

    def finish(self) -> None:
        """The end of a run: merge what is left (groups smaller than the target too) and wait for every merge."""
        self.step(final=True)
        while self.running:
            self._collect(wait=True)
            self.step(final=True)

    def _start(self, sources: list[str]) -> None:
        tag = new_tag()
        self.ledger.state.write_json(f"{PLANS}/{tag}.json", {"tag": tag, "sources": sources})
        if self.submit is None:
            try:
                self._done(tag, sources, merge(self.uri, self.opts, sources, tag))
            except Exception as e:  # noqa: BLE001 - undone below; the sources stay
                self._undo(tag, sources, e)
            return
        self.running[self.submit(self.uri, self.opts, sources, tag)] = (tag, sources)

    def _collect(self, wait: bool) -> None:
        if not self.running:
            return
        for handle, result in self.ready(list(self.running), wait):
            tag, sources = self.running.pop(handle)
            if isinstance(result, BaseException):
                self._undo(tag, sources, result)
            else:
                self._done(tag, sources, result)

    def _done(self, tag: str, sources: list[str], written: list[dict]) -> None:
        files = self.ledger.files
        problem = _verify(files, sources, written)
        if problem:
            self._undo(tag, sources, RuntimeError(problem))
            return
        self.source_bytes += sum(files[s]["size"] for s in sources)
        self.written_bytes += sum(w["size"] for w in written)
        targets = {}
        for w in written:
            held = [files[s] for s in w["sources"]]
            targets[w["file"]] = {"size": w["size"], "rows": w["rows"], "digest": w["digest"],
                                  "shards": sorted({s for r in held for s in r["shards"]}),
                                  "tasks": sorted({t for r in held for t in r["tasks"]}),
                                  # the report's summary: the sources' merged (None if one is unknown)
                                  "stats": filestats.merge_json([r.get("stats") for r in held])}
        self.ledger.replace(sources, targets)                 # the switch: readers of the manifest move over
        _delete(self.ledger.state, sources)
        self.ledger.state.remove(f"{PLANS}/{tag}.json")
        self.merged_files += len(sources)
        self.written_files += len(targets)
        log.info("compacted %d result files into %s", len(sources), ", ".join(targets))

    def _undo(self, tag: str, sources: list[str], error: BaseException) -> None:
        """A merge that failed (its task lost with a node, storage down, a check that did not hold): its targets go,
        its sources stay as they are, and a later merge takes them again."""
        self.failed += 1
        log.warning("compaction of %d result files failed (%s: %s); they stay as they are", len(sources),
                    type(error).__name__, str(error).splitlines()[0][:300] if str(error) else "")
        _delete(self.ledger.state, _targets_listed(self.ledger.state, tag))
        self.ledger.state.remove(f"{PLANS}/{tag}.json")


def _verify(files: dict[str, dict], sources: list[str], written: list[dict]) -> str:
    """'' when the targets hold exactly the sources' rows (each source in one target, same rows and key digest)."""
    seen = [s for w in written for s in w["sources"]]
    if sorted(seen) != sorted(sources):
        return f"the merge wrote the rows of {sorted(seen)}, not of {sorted(sources)}"
    for w in written:
        held = [files[s] for s in w["sources"]]
        rows = sum(r["rows"] for r in held)
        digest = int(np.sum(np.array([r["digest"] for r in held], np.uint64), dtype=np.uint64))
        if w["rows"] != rows or w["digest"] != digest:
            return f"{w['file']} holds {w['rows']} rows (digest {w['digest']}), not the sources' {rows} ({digest})"
    return ""


def _delete(state: StateDir, names: list[str]) -> None:
    state.remove_paths([f"{state.root}/{n}" for n in names])


def _targets_listed(state: StateDir, tag: str) -> list[str]:
    return [n for n in output.listed_files(state.fs, state.root, state.opts) if tag_of(n) == tag]


def recover(state: StateDir, files: dict[str, dict] | None, listed: dict[str, int]) -> dict[str, int]:
    """Finish or undo the merges a killed run left (see the module's doc); returns the listing as it now is."""
    listed = dict(listed)
    for name in state.list(PLANS):
        plan = state.read_json(f"{PLANS}/{name}") if name.endswith(".json") else None
        if plan is None:
            continue
        tag = plan["tag"]
        switched = any(tag_of(f) == tag for f in files or {})
        gone = [s for s in plan["sources"] if s in listed] if switched else [n for n in listed if tag_of(n) == tag]
        _delete(state, gone)
        for n in gone:
            listed.pop(n)
        state.remove(f"{PLANS}/{name}")
        log.info("compaction %s left by a stopped run %s (%d files deleted)", tag,
                 "finished" if switched else "undone", len(gone))
    return listed
