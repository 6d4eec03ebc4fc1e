"""What to process: the read units of the input, minus what is finished, as blocks of item records.

One Ray read task per group of units streams each unit's pieces from its reader, names every item (a stable id
from its URI), drops repeats of an item within the unit, attaches the tasks still to do (the run's tasks, minus
those a completion record or a key in the done-set says are done), and reports each shard's pair counts to the
tracker when the shard ends. Finished shards are not read and finished units are not even opened. A shard's distinct
ids are kept under `_state/ids/` as it is read, so that a rerun drops repeats of a finished shard's items without
reading it again.
"""

from __future__ import annotations

import hashlib
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import readers
from pipeline.items import FIELDS, ITEM_SCHEMA, item_id, key_hash
from pipeline.readers import Known, Piece, ReadSpec, Unit
from pipeline.state import StateDir

MAX_READ_TASKS = 256


@dataclass(frozen=True)
class TaskPlan:
    """Which tasks an item gets."""
    tasks: tuple[str, ...]
    prompt_task: str          # a manifest row's own prompt runs as this task ('' = no such task)

    def all(self) -> tuple[str, ...]:
        return self.tasks + ((self.prompt_task,) if self.prompt_task else ())

    def of(self, prompt: str) -> tuple[str, ...]:
        return self.tasks + ((self.prompt_task,) if prompt and self.prompt_task else ())


class SeenIds:
    """Ids met so far in one unit, as sorted uint64 runs merged like a log-structured tree (8 bytes an id,
    O(log n) runs to search), so a unit of millions of rows is checked without a Python set."""

    def __init__(self):
        self.runs: list[np.ndarray] = []
        self.size = 0

    def first(self, ids: list[str]) -> np.ndarray:
        """Mask of the ids not met before (the first of repeats within `ids` included); remembers them."""
        return self.first_keys(id_keys(ids))

    def first_keys(self, keys: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(keys), bool)
        mask[np.unique(keys, return_index=True)[1]] = True
        mask &= ~self.known(keys)
        self.add(keys[mask])
        return mask

    def known(self, keys: np.ndarray) -> np.ndarray:
        mask = np.zeros(len(keys), bool)
        for run in self.runs:
            pos = np.minimum(np.searchsorted(run, keys), len(run) - 1)
            mask |= run[pos] == keys
        return mask

    def add(self, keys: np.ndarray) -> None:
        """Remember keys that are not known yet and not repeated among themselves."""
        if len(keys):
            self.runs.append(np.sort(keys))
            self.size += len(keys)
        while len(self.runs) > 1 and len(self.runs[-2]) <= 2 * len(self.runs[-1]):
            last = self.runs.pop()
            self.runs[-1] = np.sort(np.concatenate([self.runs[-1], last]))

    def keys(self) -> np.ndarray:
        return np.concatenate(self.runs) if self.runs else np.zeros(0, np.uint64)


def id_keys(ids: list[str]) -> np.ndarray:
    """8 bytes of each item id, as kept by SeenIds."""
    return np.array([int(i[:16], 16) for i in ids], dtype=np.uint64)


class StoredIds:
    """Each shard's distinct ids (those not met in the unit's earlier shards), stored under `_state/ids/` once the
    shard is read: a rerun skips finished shards unread and takes their ids from here, to drop later repeats of
    their items (a manifest naming an item twice runs it once) without reading and hashing every finished row.
    Tables only: a listing's keys and a tar's members are one shard's, or never repeat."""

    SUFFIX = ".u64"

    def __init__(self, state: StateDir, unit: Unit, kept: bool):
        self.state, self.kept = state, kept
        self.folder = f"ids/{hashlib.sha256(unit.id.encode()).hexdigest()[:32]}"
        names = state.list(self.folder) if kept else []
        self.stored = frozenset(n[:-len(self.SUFFIX)] for n in names if n.endswith(self.SUFFIX))
        self.loading: dict[str, object] = {}
        self.waiting: list[np.ndarray] = []        # loaded, not yet in the unit's SeenIds
        self.met: dict[str, list[np.ndarray]] = {}  # shard -> its ids met so far

    def prefetch(self, shards: list[str]) -> None:
        """Load these shards' ids now, 8 at a time (on an object store each is a round trip)."""
        shards = [s for s in shards if s in self.stored and s not in self.loading]
        if shards:
            with ThreadPoolExecutor(max_workers=8) as pool:   # threads end with the loads; results kept
                self.loading.update(zip(shards, pool.map(self._load, shards)))

    def _load(self, shard: str) -> np.ndarray:
        data = self.state.read_bytes(f"{self.folder}/{shard}{self.SUFFIX}")
        if data is None:
            raise FileNotFoundError(f"{self.folder}/{shard}{self.SUFFIX}")
        return np.frombuffer(data, dtype=np.uint64)

    def unread(self, shard: str) -> None:
        """The shard's rows (some or all) are not read: its stored ids stand for them."""
        if shard in self.stored and shard not in self.met:
            keys = self.loading.pop(shard) if shard in self.loading else self._load(shard)
            self.waiting.append(keys)
            self.met[shard] = [keys]

    def first(self, seen: SeenIds, shard: str, keys: np.ndarray) -> np.ndarray:
        """SeenIds.first_keys, after the stored ids waiting; notes the shard's ids."""
        self.settle(seen)
        mask = seen.first_keys(keys)
        self.met.setdefault(shard, []).append(keys[mask])
        return mask

    def settle(self, seen: SeenIds) -> None:
        if self.waiting:   # one sorted run, rather than one per shard
            seen.add(np.sort(np.concatenate(self.waiting)))
            self.waiting = []

    def save(self, shard: str, read: bool) -> None:
        """Once the shard's last piece went by; `read`: rows of it were read for their items (else its ids are
        written only where none are stored: a finished shard of an earlier version's, read for its ids)."""
        met = self.met.pop(shard, [])
        if self.kept and (read or (met and shard not in self.stored)):
            self.write(shard, np.concatenate(met) if met else np.zeros(0, np.uint64))

    def write(self, shard: str, keys: np.ndarray) -> None:
        self.state.write_bytes(f"{self.folder}/{shard}{self.SUFFIX}", np.sort(keys).tobytes())


class Repeats:
    """Items met in more than one read unit (the same URI in two manifest files is read, and written, once per
    file), counted from each unit's distinct ids as its read task reports them. Exact while the ids kept fit in
    `max_ids` (8 bytes each); past that, new ids are still looked up but no longer kept, so a repeat of an item
    first met after the cap is missed and the count is a lower bound (`exact` False)."""

    MAX_IDS = 1 << 25   # 256 MiB of ids in the actor, whatever the corpus size

    def __init__(self, max_ids: int = MAX_IDS):
        self.max_ids, self.seen, self.units = max_ids, SeenIds(), set()
        self.repeats, self.exact = 0, True

    def add(self, unit: str, keys: np.ndarray) -> None:
        if unit in self.units:   # a retried read task reports its unit again
            return
        self.units.add(unit)
        known = self.seen.known(keys)
        self.repeats += int(known.sum())
        fresh = keys[~known]
        room = self.max_ids - self.seen.size
        if len(fresh) > room:
            fresh, self.exact = fresh[:max(room, 0)], False
        self.seen.add(fresh)

    def result(self) -> tuple[int, bool]:
        return self.repeats, self.exact


RepeatCounter = ray.remote(num_cpus=0)(Repeats)


def is_done(keys: np.ndarray, done: np.ndarray) -> np.ndarray:
    if not len(done):
        return np.zeros(len(keys), bool)
    return done[np.minimum(np.searchsorted(done, keys), len(done) - 1)] == keys


@dataclass
class UnitWork:
    unit: Unit
    records: dict[str, dict[str, int]]    # completion records of this unit's shards, by shard number
    extents: dict[str, dict] = field(default_factory=dict)   # their extents (rows covered, file version)
    grown: dict | None = None             # a finished text manifest appended to since (pipeline.changes)


TABLE_KINDS = ("manifest", "parquet")   # units of many shards, whose items may repeat across them


class ShardCount:
    """Pairs of one shard, counted as its pieces go by, and the rows read of it (its record's extent)."""

    def __init__(self, tasks: tuple[str, ...]):
        self.counts = {t: 0 for t in tasks}
        self.pending = self.skipped = 0
        self.rows, self.read = 0, False

    def extent(self, read: dict) -> dict | None:
        """What the shard's record covers, where rows of it were read."""
        return {"rows": self.rows, "of": read.get("of")} if self.read else None


class Budget:
    """`input.max_items`: the first items of the input, done or not, shared by the units of one read task (which
    then reads every unit, finished ones too, in input order), so that a rerun with the same limit finds the same
    items done."""

    def __init__(self, limit: int):
        self.limit, self.left = limit, limit

    def take(self, fresh: np.ndarray) -> np.ndarray:
        if self.limit:
            fresh = fresh & (np.cumsum(fresh) <= self.left)
            self.left -= int(fresh.sum())
        return fresh

    def take_finished(self, record: dict[str, int]) -> None:
        """A finished shard skipped unread: its items, as its record counts them (one pair per item and task)."""
        if self.limit:
            self.left -= max(record.values(), default=0)

    @property
    def spent(self) -> bool:
        return bool(self.limit) and self.left <= 0


class StopFlag:
    """The tracker's stop flag (a SIGTERM's drain), asked at most once per `every_s` seconds."""

    def __init__(self, tracker, every_s: float = 1.0):
        self.tracker, self.every_s, self.asked_at, self.set = tracker, every_s, 0.0, False

    def __call__(self) -> bool:
        if not self.set and time.monotonic() - self.asked_at >= self.every_s:
            self.asked_at = time.monotonic()
            self.set = bool(ray.get(self.tracker.stopping.remote()))
        return self.set


def pairs_of(block: pa.Table) -> int:
    """(item, task) pairs of an item block: each becomes one result row."""
    return int(pc.sum(pc.list_value_length(block["tasks"])).as_py() or 0)


class ReadAhead:
    """The read-ahead window (batching.read_ahead_items / read_ahead_mb), shared by the run's read tasks through the
    tracker: after each block a read task hands on, it waits while the pairs read and not yet written (the driver
    reports its rows) fill the window, so the queue ahead of the model actors stays a few minutes' work whatever the
    input's size, and its blocks never pile up in the object store or the driver. Pairs, not items, as each pair is
    one result row (an item named in two manifest files is two items with one id)."""

    WAIT_S = 0.2

    def __init__(self, tracker, items: int, nbytes: int, stop=None, get=ray.get):
        """`get`: how a tracker call's result is had (ray.get; tests call a plain Tracker)."""
        self.tracker, self.items, self.nbytes, self.stop, self.get = tracker, items, nbytes, stop, get
        self.handed_on: dict[str, list[int]] = {}   # by unit, in this attempt of the read task

    def handed(self, unit: str, block: pa.Table) -> None:
        total = self.handed_on.setdefault(unit, [0, 0])
        total[0], total[1] = total[0] + pairs_of(block), total[1] + block.nbytes
        while True:
            ahead, ahead_bytes = self.get(self.tracker.read.remote(unit, *total))
            if (ahead < self.items and ahead_bytes < self.nbytes) or (self.stop is not None and self.stop()):
                return
            time.sleep(self.WAIT_S)


def pending_items(work: UnitWork, spec: ReadSpec, plan: TaskPlan, done: np.ndarray, tracker,
                  budget: Budget | None = None, repeats=None, stop=None,
                  window: ReadAhead | None = None) -> Iterator[pa.Table]:
    """Item blocks of one unit with their tasks still to do; reports each shard to the tracker as it ends (with its
    extent), the unit when it ends (with what was read of it), and the unit's distinct ids to `repeats` (a
    RepeatCounter, or None) once it is read.
    Once the budget is spent it stops, and a shard cut short is never reported, so never recorded finished; so does
    a read stopped by `stop()` (the run drains after a SIGTERM), and then the unit is not reported either."""
    unit, seen, shards, open_count = work.unit, SeenIds(), [], {}
    budget = budget or Budget(0)
    tables = unit.kind in TABLE_KINDS
    ids = StoredIds(spec.state, unit, kept=tables)
    known = Known(work.records, work.extents, plan.all(), ids.stored, work.grown,
                  read={"of": unit.stamp} if unit.stamp else {})
    ids.prefetch([s for s in sorted(work.records) if tables and covers_tasks(work.records[s], plan.all())])
    for piece in readers.read_unit(unit, spec, known):
        name = f"{unit.id}#{piece.shard}"
        # only tasks its record lacks: a finished shard reported again must not zero its record's counts
        record = work.records.get(str(piece.shard)) or {}
        count = open_count.setdefault(name, ShardCount(tuple(t for t in plan.all() if t not in record)))
        if piece.table is None and piece.end > piece.start:
            ids.unread(str(piece.shard))
        if piece.table is not None and piece.table.num_rows:
            item_ids = [item_id(u) for u in piece.table["uri"].to_pylist()]
            fresh = budget.take(ids.first(seen, str(piece.shard), id_keys(item_ids)))
            if not piece.finished:
                block = _items_block(piece, name, item_ids, fresh, record, plan, done, count)
                if block.num_rows:
                    yield block
                    if window is not None:
                        window.handed(unit.id, block)
                    if stop is not None and stop():
                        return
        elif piece.finished:
            budget.take_finished(record)
        if piece.finished and piece.last:   # once per shard, however many pieces it came in
            count.skipped += _finished_pairs(record, plan)
        if not piece.finished:
            count.rows, count.read = piece.end - sub_start(piece.shard), True
        if budget.spent:   # the shard stays open (never recorded finished); its pairs found done still count
            tracker.cut_short.remote(name, count.skipped)
            _report_ids(repeats, unit, seen, ids)
            return
        if piece.last:
            ids.save(str(piece.shard), count.read)
            tracker.shard.remote(name, count.counts, count.pending, count.skipped,
                                 count.extent(known.read) if tables else None)
            shards.append(name)
            del open_count[name]
    tracker.unit.remote(unit.id, shards, _unit_extent(unit, known))
    _report_ids(repeats, unit, seen, ids)


def sub_start(name) -> int:
    """The row of its shard a part of it starts at (readers.sub_shard)."""
    name = str(name)
    return int(name.rsplit("+", 1)[1]) if "+" in name else 0


def _unit_extent(unit: Unit, known: Known) -> dict | None:
    """What the unit's record covers: a partition's time of listing, a file's version (and for a manifest its rows
    and last bytes or URIs, to tell rows appended from a rewrite: pipeline.changes)."""
    if unit.kind == "listing":
        return {"listed_at": known.read.get("listed_at", 0.0)}
    return dict(known.read) or None


def _report_ids(repeats, unit: Unit, seen: SeenIds, ids: StoredIds) -> None:
    # waited for: once the last read task ends, the driver's count holds every unit
    ids.settle(seen)
    if repeats is not None:
        ray.get(repeats.add.remote(unit.id, seen.keys()))


def covers_tasks(counts: dict[str, int] | None, tasks) -> bool:
    return counts is not None and all(t in counts for t in tasks)


def _finished_pairs(record: dict[str, int] | None, plan: TaskPlan) -> int:
    return sum((record or {}).get(t, 0) for t in plan.all())


def _items_block(piece: Piece, shard: str, ids: list[str], fresh: np.ndarray, record: dict[str, int] | None,
                 plan: TaskPlan, done: np.ndarray, count: ShardCount) -> pa.Table:
    table = piece.table
    prompts = table["prompt"].to_pylist()
    rows, tasks = [], []
    for i in np.flatnonzero(fresh):
        todo = [t for t in plan.of(prompts[i]) if not (record and t in record)]
        if len(done) and todo:
            found = is_done(key_hash([ids[i]] * len(todo), todo), done)
            count.skipped += int(found.sum())
            for t in todo:
                count.counts[t] += 1
            todo = [t for t, d in zip(todo, found) if not d]
        else:
            for t in todo:
                count.counts[t] += 1
        if record:
            count.skipped += sum(1 for t in plan.of(prompts[i]) if t in record)
        if todo:
            rows.append(int(i))
            tasks.append(todo)
    count.pending += sum(len(t) for t in tasks)
    taken = table.take(pa.array(rows, pa.int64()))
    n = len(rows)
    columns = {"id": pa.array([ids[i] for i in rows], pa.string()), "tasks": pa.array(tasks, pa.list_(pa.string())),
               "shard": pa.array([shard] * n, pa.string())}
    arrays = [columns[f] if f in columns else (taken[f] if f in taken.column_names else pa.nulls(n, t))
              for f, t in zip(FIELDS, ITEM_SCHEMA.types)]
    block = pa.Table.from_arrays(arrays, schema=ITEM_SCHEMA)
    for name in taken.column_names:
        if name not in FIELDS:
            block = block.append_column(taken.schema.field(name), taken[name])
    return block


class PendingItems(Datasource):
    """Ray Data source: one read task per group of units (at most MAX_READ_TASKS groups, in input order)."""

    def __init__(self, work: list[UnitWork], spec: ReadSpec, plan: TaskPlan, done_ref, tracker, max_items: int,
                 repeats=None, read_ahead: tuple[int, int] | None = None):
        """read_ahead: ((item, task) pairs, bytes) of the read-ahead window (ReadAhead); None: no window."""
        super().__init__()
        self.work, self.spec, self.plan, self.done_ref, self.tracker = work, spec, plan, done_ref, tracker
        self.max_items, self.repeats, self.read_ahead = max_items, repeats, read_ahead

    def get_name(self) -> str:
        return "ReadItems"

    def estimate_inmemory_data_size(self):
        return None

    def num_tasks(self) -> int:
        # max_items counts across units, so then one task reads them in order
        return 1 if self.max_items else max(1, min(len(self.work), MAX_READ_TASKS))

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        spec, plan, done_ref, tracker, max_items = self.spec, self.plan, self.done_ref, self.tracker, self.max_items
        repeats, read_ahead = self.repeats, self.read_ahead
        size = -(-len(self.work) // self.num_tasks())

        def make(chunk: list[UnitWork]):
            def read():
                done, budget, stop = ray.get(done_ref), Budget(max_items), StopFlag(tracker)
                window = ReadAhead(tracker, *read_ahead, stop) if read_ahead else None
                for work in chunk:
                    yield from pending_items(work, spec, plan, done, tracker, budget, repeats, stop, window)
                    if budget.spent or stop():
                        return
            return read

        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(make(self.work[i:i + size]), meta)
                for i in range(0, len(self.work), size)]
