"""What is finished, kept so that a restart costs nothing per finished item.

Shards (a listing part, a manifest row range, a tar, a Parquet row range) and read units (a partition, a file)
get a completion record once every (item, task) pair of theirs is in a result file:
`_state/done/<hash>.json` = {"name", "counts": {task: pairs}, "extent"}, folded now and then into `_state/done.pq.state`
(Parquet, named so that no reader takes it for results; an earlier version's `done.parquet` is read until the next
fold replaces it).
A rerun skips finished units without opening them and finished shards without reading them.
A record's extent says what it covers of an input that can grow (pipeline.changes): a shard's rows and the file
version they were read from, a unit's file version and size, a listing partition's time of listing. A record without
one (an earlier version's) covers its shard or unit whatever it holds now.

Which result file holds which shards' rows is the manifest's (`pipeline.manifest`, `_state/files.pq.state`): a
sidecar written just before each file, `_state/inflight/<file>.json` = {"file", "size", "rows", "digest",
"shards", "tasks"}, becomes its manifest row at the next fold (and goes then). A rerun lists the output once
(or, after a clean close, takes the manifest's word: pipeline.seal), checks it against the manifest (a damaged
file's shards are open again), and reads the (item, task) keys of only the files that hold rows of open shards: the
work that was in flight when a run stopped, never the finished corpus.

`_state/progress.json` says the records can be trusted for this input. An output without it (written by an
earlier version, or with `run.retry_errors`, or for another input) is scanned whole once: every result file's
keys count as done, and the marker is written when a run has finished every shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray

from pipeline import compact, filestats, manifest, output, storage
from pipeline.items import key_hash
from pipeline.state import StateDir

log = logging.getLogger(__name__)

MARKER = "progress.json"
RECORDS = "done"
FOLDED = "done"            # a state table: _state/done.pq.state
INFLIGHT = "inflight"
FOLD_EVERY = 256          # new records between folds
UNREAD = object()          # Ledger.load's manifest when the caller has not read it
FOLDED_SCHEMA = pa.schema([("name", pa.string()), ("tasks", pa.list_(pa.string())),
                           ("pairs", pa.list_(pa.int64())), ("extent", pa.string())])   # extent: JSON or null


def _record_file(name: str) -> str:
    return f"{RECORDS}/{hashlib.sha256(name.encode()).hexdigest()[:32]}.json"


def covers(counts: dict[str, int] | None, tasks) -> bool:
    return counts is not None and all(t in counts for t in tasks)


@dataclass
class Resume:
    """What a run starts from."""
    records: dict[str, dict[str, int]]     # finished shard or unit -> pairs per task
    done_keys: np.ndarray                  # sorted uint64 (id, task) keys of rows of open shards
    scanned: bool                          # the whole output was scanned (no trusted records)
    extents: dict[str, dict] = field(default_factory=dict)   # record -> what it covers of a growing input


class Ledger:
    """The driver's view of `_state/`: completion records and sidecars."""

    def __init__(self, state: StateDir, fingerprint: str, move_foreign: bool = False):
        self.state, self.fingerprint, self.move_foreign = state, fingerprint, move_foreign
        self.records: dict[str, dict[str, int]] = {}
        self.extents: dict[str, dict] = {}         # record -> its extent, where it has one
        self.sidecars: dict[str, dict] = {}        # sidecar file name -> {"file", manifest row}
        self.files: dict[str, dict] = {}           # the manifest: result file -> row
        self.landed: set[str] = set()              # files landed since the last fold
        self.foreign: list[str] = []               # files not ours the start left under the prefix
        self.unfolded = 0

    # -- start ----------------------------------------------------------------------------------------------

    def load(self, listed: dict[str, int], files: dict[str, dict] | None | object = UNREAD) -> Resume:
        """`listed`: the output's result files and their sizes (one listing, or the manifest's where a seal
        vouches for it), checked against the manifest; `files`: the manifest where the caller has just read it (read
        once: at 1e5 files a read costs ~1 s)."""
        files = manifest.read(self.state) if files is UNREAD else files
        listed = compact.recover(self.state, files, listed)
        if self.trusted():
            self._load_records()
            self._load_sidecars()
            check = self._check(listed, files)
            if not check.scan:
                self._reopen(check.reopen)
                if check.changed or check.reopen:
                    self._save()
                return Resume(dict(self.records), self._open_keys(), False, dict(self.extents))
            self.forget()
            listed = {n: size for n, size in listed.items() if n not in check.moved}
        return self._scan(listed)

    def trusted(self) -> bool:
        """The records were written for this input (else the output is scanned whole)."""
        marker = self.state.read_json(MARKER)
        return bool(marker) and marker.get("version") == 1 and marker.get("input") == self.fingerprint

    def _check(self, listed: dict[str, int], files: dict[str, dict] | None) -> manifest.Check:
        self.files = files or {}
        pending = {s["file"]: s for s in self.sidecars.values()}
        check = manifest.Check(self.state, listed, self.files, pending, self.move_foreign, built=files is None)
        check.run()
        self.foreign = check.left
        return check

    def _reopen(self, shards: set[str]) -> None:
        """These shards' pairs must be looked for again: their records, and their units', go."""
        for shard in shards:
            for name in (shard, shard.rsplit("#", 1)[0]):
                self.records.pop(name, None)
                self.extents.pop(name, None)

    def _open_keys(self) -> np.ndarray:
        """Keys of the files holding rows of open shards; a file found torn there loses its row, and the shards
        it held are open again (which may add files to read)."""
        keys, read = [], set()
        while True:
            names = [n for n, row in self.files.items() if n not in read and self._is_open(row)]
            if not names:
                return unique_sorted(np.concatenate(keys)) if keys else np.zeros(0, np.uint64)
            lost: list[str] = []
            keys.append(read_keys(self.state, names, lost))
            read.update(names)
            for name in lost:
                self._reopen(set(self.files.pop(name)["shards"]))
            if lost:
                self._save()

    def _is_open(self, row: dict) -> bool:
        if row["shards"] is None:   # from an earlier version, whose sidecars named the files of open shards
            return False
        return not all(covers(self.records.get(s), row["tasks"]) for s in row["shards"])

    def _scan(self, listed: dict[str, int]) -> Resume:
        """No trusted records: every result file's keys count as done, and the manifest starts again from the
        files (their shards unknown)."""
        check = manifest.Check(self.state, {}, {}, {}, self.move_foreign)
        candidates = check.unknown([n for n in listed if not output.is_ours(n)])
        self.foreign = check.left
        names = [n for n in listed if output.is_ours(n)] + sorted(candidates)
        if names:
            log.info("no completion records for this input: scanning %d result files once", len(names))
        lost: list[str] = []
        keys = read_keys(self.state, names, lost)
        self.files = {n: {**manifest.UNKNOWN, "size": listed[n]} for n in names if n not in lost}
        manifest.write(self.state, self.files)
        return Resume({}, keys, True)

    def _load_sidecars(self) -> None:
        for name in self.state.list(INFLIGHT):
            if name.endswith(".json"):
                sidecar = self.state.read_json(f"{INFLIGHT}/{name}")
                if sidecar is not None:
                    self.sidecars[name] = sidecar

    def _load_records(self) -> None:
        folded = self.state.read_table(FOLDED)
        if folded is not None:
            # an earlier version's table has no extents
            extents = folded["extent"].to_pylist() if "extent" in folded.column_names else [None] * len(folded)
            for name, tasks, pairs, extent in zip(*(folded[c].to_pylist() for c in FOLDED_SCHEMA.names[:3]), extents):
                self.records[name] = dict(zip(tasks, pairs))
                if extent is not None:
                    self.extents[name] = json.loads(extent)
        names = [n for n in self.state.list(RECORDS) if n.endswith(".json")]
        with ThreadPoolExecutor(max_workers=16) as pool:
            for rec in pool.map(lambda n: self.state.read_json(f"{RECORDS}/{n}"), names):
                if rec is not None:
                    self._keep(rec["name"], rec["counts"], rec.get("extent"))   # a record file holds it whole
        self.unfolded = len(names)

    def _keep(self, name: str, counts: dict[str, int], extent: dict | None) -> None:
        """A record as read back or written (its file holds the whole record)."""
        self.records[name] = counts
        if extent is not None:
            self.extents[name] = extent

    # -- while running --------------------------------------------------------------------------------------

    def closed_files(self, open_too: bool = False) -> list[str]:
        """Result files in the manifest whose every shard is finished (all of them with `open_too`): no run writes
        their pairs again, so they may be merged (pipeline.compact). Files of an earlier version (shards and rows
        unknown) are left alone."""
        return [n for n, row in self.files.items() if row["shards"] is not None and row["rows"] >= 0
                and (open_too or not self._is_open(row))]

    def replace(self, sources: list[str], targets: dict[str, dict]) -> None:
        """A merge's switch: the manifest drops `sources` and takes `targets` (name -> row), in one write."""
        for name in sources:
            del self.files[name]
        self.files.update(targets)
        manifest.write(self.state, self.files)

    def note_file(self, file_name: str, entry: dict) -> None:
        """Before a result file is written: its manifest row (size, rows, digest, shards, tasks)."""
        sidecar = {"file": file_name, **entry}
        name = file_name.rsplit(".", 1)[0].replace("/", "@") + ".json"   # one folder of sidecars
        self.state.write_json(f"{INFLIGHT}/{name}", sidecar)
        self.sidecars[name] = sidecar

    def committed(self, file_name: str) -> None:
        """The file has landed: its row goes into the manifest at the next fold."""
        self.landed.add(file_name)

    def record(self, name: str, counts: dict[str, int], extent: dict | None = None) -> None:
        """`extent`: what the record covers of an input that can grow; None keeps the one it had."""
        counts, extent = _merged(self.records.get(name), counts), extent or self.extents.get(name)
        self.state.write_json(_record_file(name), {"name": name, "counts": counts, "extent": extent})
        self._keep(name, counts, extent)
        self.unfolded += 1
        if self.unfolded >= FOLD_EVERY:
            self.fold()

    def fold(self) -> None:
        """All records into done.pq.state, then the record files removed. Shard records stay beside their unit's:
        a task added later reopens the unit, and its shards' records then say which tasks each has done. The files
        landed since the last fold get their manifest rows."""
        for sidecar in list(self.sidecars.values()):
            if sidecar["file"] in self.landed:
                self.files[sidecar["file"]] = manifest.sidecar_entry(sidecar, sidecar["size"])
        self._save(write_manifest=bool(self.landed))
        self.landed.clear()

    def _save(self, write_manifest: bool = True) -> None:
        """Records first, then the manifest, then the sidecars it now holds: a kill between any two leaves a
        manifest row dropped for a damaged file only once its shards' records are gone (they are read again), and
        a landed file's sidecar until its row is in."""
        self.state.write_table(FOLDED, pa.table({
            "name": list(self.records), "tasks": [list(c) for c in self.records.values()],
            "pairs": [list(c.values()) for c in self.records.values()],
            "extent": [_json_or_none(self.extents.get(n)) for n in self.records]}, schema=FOLDED_SCHEMA))
        self.state.remove(RECORDS, recursive=True)
        self.unfolded = 0
        if write_manifest:
            manifest.write(self.state, self.files)
        for name, sidecar in list(self.sidecars.items()):
            if sidecar["file"] in self.files or sidecar["file"] not in self.landed:
                self.state.remove(f"{INFLIGHT}/{name}")
                del self.sidecars[name]

    def retry_errors(self, uri: str, opts, staging: str) -> int | None:
        """`run.retry_errors` with trusted records: the files holding error rows lose them, and only their shards
        are open again (a restart reads the keys of their files, not of the whole output). Which files hold errors
        is in their manifest summaries; only a file without one is read to find out. None when some file's
        shards are unknown (an earlier version's output): the caller drops the records and rewrites every file.

        Order, safe at each kill: the shards' records go first; then each file's new manifest row is noted in a
        sidecar before the file is replaced (or deleted), so a start takes a replaced file's new size as landed,
        not as damage; then the manifest takes the new rows."""
        if any(row["shards"] is None or row["rows"] < 0 for row in self.files.values()):
            return None
        summaries = {name: filestats.loads(row.get("stats")) for name, row in self.files.items()}
        names = sorted({name for name, stats in summaries.items() if stats and filestats.error_rows(stats)} |
                       set(output.files_with_errors(uri, opts, sorted(n for n, s in summaries.items() if not s))))
        self._reopen({s for n in names for s in self.files[n]["shards"]})
        self._save(write_manifest=False)
        rows = {}

        def before_rewrite(name: str, kept) -> None:
            old = self.files[name]
            if kept is None:
                rows[name] = {**old, "size": 0, "rows": 0, "digest": 0}   # a sidecar of a file that goes
            else:
                rows[name] = output.manifest_row(kept[0], kept[1], old["shards"], compact.tag_of(name))
            self.note_file(name, rows[name])

        reopened = output.reopen_errors(uri, opts, staging, names, before_rewrite)
        for name, row in rows.items():
            if row["rows"]:
                self.files[name] = row
            else:
                del self.files[name]
        self._save()
        return reopened

    def mark_trusted(self) -> None:
        self.state.write_json(MARKER, {"version": 1, "input": self.fingerprint})

    def forget(self) -> None:
        """Distrust every record (e.g. after `run.retry_errors` reopened rows): the next run scans the output."""
        self.state.remove(MARKER)
        self.state.remove(RECORDS, recursive=True)
        self.state.remove_table(FOLDED)
        self.state.remove(INFLIGHT, recursive=True)
        self.state.remove_table(manifest.MANIFEST)
        self.records, self.extents, self.sidecars, self.files = {}, {}, {}, {}   # or a fold would write them back


def _merged(old: dict[str, int] | None, new: dict[str, int]) -> dict[str, int]:
    return {**(old or {}), **new}


def _json_or_none(value: dict | None) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True)


def read_keys(state: StateDir, files: list[str], lost: list[str] | None = None) -> np.ndarray:
    """Sorted, unique uint64 keys of the (id, task) rows in these result files (names under the output root).
    A file that is gone holds none; a torn or foreign one is set aside under `_state/quarantine/` with a warning;
    both are added to `lost`, and their pairs are pending again, never a crash."""
    fs, root, opts = storage.arrow_filesystem(state.fs), state.root, state.opts

    def keys_of(name: str) -> np.ndarray:
        try:
            table = output.read_result(fs, root, name, opts, columns=["id", "task"])
        except FileNotFoundError:   # gone since the listing: its pairs are not done
            if lost is not None:
                lost.append(name)
            return np.zeros(0, np.uint64)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, KeyError, OSError) as e:
            if storage.is_transient(e):
                raise
            quarantine(state, name, f"{type(e).__name__}: {e}")
            if lost is not None:
                lost.append(name)
            return np.zeros(0, np.uint64)
        return key_hash(table["id"].to_pylist(), table["task"].to_pylist())

    # concurrently: on an object store each file is a round trip
    with ThreadPoolExecutor(max_workers=16) as pool:
        keys = list(pool.map(keys_of, files))
    return unique_sorted(np.concatenate(keys)) if keys else np.zeros(0, np.uint64)


def quarantine(state: StateDir, name: str, reason: str) -> None:
    """Move a result-prefix file that is not a whole result file of ours out of the readers' way."""
    log.warning("output file %s/%s is not a readable result file (%s): moved to %s/; its rows will be redone",
                state.root, name, reason.splitlines()[0][:200], state.full(manifest.QUARANTINE))
    manifest.quarantine(state, name)


def unique_sorted(keys: np.ndarray) -> np.ndarray:
    """np.unique without its extra passes: sort in place, keep each first of a run."""
    keys.sort()
    if len(keys) < 2:
        return keys
    keep = np.empty(len(keys), bool)
    keep[0] = True
    np.not_equal(keys[1:], keys[:-1], out=keep[1:])
    return keys[keep]


# --- the count of open shards --------------------------------------------------------------------------------


def tracker_name(run_tag: str) -> str:
    return f"glmv-tracker-{run_tag}"


class Tracker:
    """Read tasks report here what each shard held once they have read it; the driver drains the reports. It also
    holds the run's stop flag (a SIGTERM's drain): read tasks and model actors look it up by name.

    One per dataset attempt, on the driver's node (pipeline.cluster): a restarted dataset starts from fresh counts,
    and a lost worker node never takes the reports with it."""

    def __init__(self):
        self.shards: dict[str, tuple[dict[str, int], int]] = {}
        self.units: dict[str, list[str]] = {}
        self.skipped = 0
        self.cut: set[str] = set()
        self.stop_requested = False
        self.admitted = 0   # items the model actors took, retried windows counted again (see admit)
        # the read-ahead window (sources.ReadAhead): (item, task) pairs and bytes each unit's reader handed on, rows
        # written
        self.read_units: dict[str, tuple[int, int]] = {}
        self.read_pairs = self.read_bytes = self.written_rows = 0

    def stop(self) -> None:
        self.stop_requested = True

    def admit(self, items: int) -> bool:
        """A model actor is about to run a window of `items`: False when the run is draining (it should not)."""
        if not self.stop_requested:
            self.admitted += items
        return not self.stop_requested

    def admitted_items(self) -> int:
        return self.admitted

    def stopping(self) -> bool:
        return self.stop_requested

    def shard(self, name: str, counts: dict[str, int], pending: int, skipped: int, extent: dict | None = None) -> None:
        """counts: the shard's pairs per task (done or not) that no earlier record holds; pending: how many of
        them this run does; skipped: pairs found done; extent: what its record will cover (rows, file version)."""
        if name not in self.shards:   # a retried read task reports the same shard again
            self.skipped += skipped
        self.shards[name] = (counts, pending, extent)

    def cut_short(self, name: str, skipped: int) -> None:
        """A shard read only in part (input.max_items): skipped, its pairs found done so far; it stays open."""
        if name not in self.cut and name not in self.shards:
            self.cut.add(name)
            self.skipped += skipped

    def unit(self, name: str, shards: list[str], extent: dict | None = None) -> None:
        self.units[name] = (shards, extent)

    def read(self, unit: str, pairs: int, nbytes: int) -> tuple[int, float]:
        """A read task has handed on `pairs` of `unit` so far (`nbytes` of raw rows): (pairs read and not yet
        written, their bytes as estimated from the mean pair's). Counts per unit, the most any attempt handed on:
        a read task Ray runs again hands on the same pairs again, which go downstream once."""
        old_pairs, old_bytes = self.read_units.get(unit, (0, 0))
        if pairs > old_pairs:
            self.read_units[unit] = (pairs, max(nbytes, old_bytes))
            self.read_pairs += pairs - old_pairs
            self.read_bytes += max(nbytes, old_bytes) - old_bytes
        ahead = max(0, self.read_pairs - self.written_rows)
        return ahead, ahead * self.read_bytes / max(1, self.read_pairs)

    def wrote(self, rows: int) -> None:
        """The driver has written `rows` result rows in this dataset attempt so far."""
        self.written_rows = max(self.written_rows, rows)

    def drain(self) -> tuple[dict, dict, int]:
        out = (self.shards, self.units, self.skipped)
        self.shards, self.units, self.skipped = {}, {}, 0
        return out


TrackerActor = ray.remote(num_cpus=0)(Tracker)


def admit(run_tag: str, items: int) -> bool:
    """A model actor asks before it runs a window: False when the run asked its stages to stop admitting work (a
    SIGTERM's drain); else the window's items are counted, so that the run can say how many items the model ran
    again when Ray retried windows lost with a worker or node (admitted - written). A tracker that cannot be found
    or asked (a run without one: benchmarks, tests) means yes, and so does a process outside Ray (a Predictor used
    directly), where asking would start a Ray of its own."""
    if not ray.is_initialized():
        return True
    try:
        return bool(ray.get(ray.get_actor(tracker_name(run_tag)).admit.remote(items), timeout=10))
    except Exception:  # noqa: BLE001 - the flag is advisory: the worst case is a window run in vain
        return True


@dataclass
class OpenShards:
    """The driver's count, per open shard, of rows already in result files against the pairs its reader found
    to do; a shard whose rows have all landed gets its record, a unit whose shards all have theirs gets one."""
    ledger: Ledger
    tasks: tuple[str, ...]
    expected: dict[str, tuple[dict[str, int], int, dict | None]] = field(default_factory=dict)
    landed: dict[str, int] = field(default_factory=dict)
    units: dict[str, tuple[list[str], dict | None]] = field(default_factory=dict)

    def listed(self, shards: dict[str, tuple], units: dict[str, tuple | list]) -> None:
        """shards: name -> (counts, pending pairs[, extent]) (Tracker.shard); units: name -> (shard names, extent)
        or the names."""
        self.expected.update({name: (*report, None)[:3] for name, report in shards.items()})
        self.units.update({name: report if isinstance(report, tuple) else (report, None)
                           for name, report in units.items()})
        self._settle(list(shards))

    def wrote(self, counts: dict[str, int]) -> None:
        for shard, n in counts.items():
            self.landed[shard] = self.landed.get(shard, 0) + n
        self._settle(list(counts))

    def _settle(self, shards: list[str]) -> None:
        for shard in shards:
            if shard not in self.expected or self.landed.get(shard, 0) < self.expected[shard][1]:
                continue
            counts, _, extent = self.expected.pop(shard)
            self.ledger.record(shard, counts, extent)
            self.landed.pop(shard, None)
        for unit, (names, extent) in list(self.units.items()):
            # a shard still waiting for rows may hold an older record (one that covered it before it grew)
            if all(covers(self.ledger.records.get(s), self.tasks) and s not in self.expected for s in names):
                total: dict[str, int] = {}
                for s in names:
                    for t, n in self.ledger.records[s].items():
                        total[t] = total.get(t, 0) + n
                self.ledger.record(unit, total, extent)
                del self.units[unit]

    def pending_pairs(self) -> int:
        """Pairs of reported shards still waiting for their rows."""
        return sum(max(0, pending - self.landed.get(shard, 0)) for shard, (_, pending, *_) in self.expected.items())

    @property
    def open(self) -> int:
        """Shards and units still waiting for rows or reports."""
        return len(self.expected) + len(self.units)
