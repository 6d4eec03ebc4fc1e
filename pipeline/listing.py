"""Listing a prefix of loose media files, in parallel partitions, snapshotted under `_state/listing/`.

The prefix is cut into partitions once (its sub-folders or common prefixes, descending while there is only one),
and the plan is saved. Each partition is listed by its own read task in lexicographic key order, and every
`PART_ROWS` media keys are written as a snapshot part before their items go on: a part is a shard, the unit of
resume. A rerun reads the snapshot instead of listing again, skips parts that are finished without opening them,
and continues an unfinished partition after its last snapshotted key (S3 `StartAfter`), so restarting costs
nothing per finished object. A partition listed before the last run on the output ended is listed again by the
driver at start (relist), its new keys snapshotted as new parts, so a rerun that finds none starts no Ray work.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import logging
import os
import time
import uuid
from dataclasses import dataclass
from typing import Iterator

import pyarrow as pa

from pipeline import storage
from pipeline.config import ConfigError
from pipeline.items import media_type_of
from pipeline.state import OLD_TABLE, TABLE, StateDir
from pipeline.storage import StorageOptions

log = logging.getLogger(__name__)

PART_ROWS = 10_000       # media keys per snapshot part (shard)
MAX_PLAN_PAGES = 10      # listing pages spent on planning partitions before falling back to one partition
PART_SCHEMA = pa.schema([("path", pa.string())])   # key relative to the listed prefix
SETTLE_S = 2.0           # a folder changed more recently than this when listed is listed again in full next time
MAX_STAMPED_FOLDERS = 100_000   # folder stamps kept per partition (more: it is listed again in full each time)
DEADLINE_EVERY = 1000    # keys between looks at the clock when a listing has a deadline (a page's worth)
_clock = time.monotonic


@dataclass(frozen=True)
class Partition:
    """Keys below `prefix` (relative to the listed root, '' or ending in '/'); only its direct children when not
    recursive (the root's own files, when the root also has sub-folders)."""
    prefix: str
    recursive: bool


def listing_id(uri: str) -> str:
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]


# --- walking one partition in key order ----------------------------------------------------------------------


def _visible(folder: str, entries: list[os.DirEntry]) -> list[os.DirEntry]:
    """Entries not hidden and named in UTF-8. os.scandir gives another name with surrogate escapes, which no
    key, URI or Parquet string can hold: one such file stopped the whole run, now it is skipped and counted."""
    shown = [e for e in entries if not e.name.startswith(".")]
    named = [e for e in shown if is_utf8(e.name)]
    if len(named) < len(shown):
        odd = [e.name for e in shown if not is_utf8(e.name)]
        log.warning("skipped %d name(s) in %s that are not UTF-8, e.g. %s", len(odd), ascii(folder), ascii(odd[0]))
    return named


def is_utf8(name: str) -> bool:
    try:
        name.encode()
    except UnicodeEncodeError:
        return False
    return True


def _walk_local(root: str, prefix: str, recursive: bool, after: str, stamps: dict | None = None) -> Iterator[str]:
    """Relative paths in lexicographic order: a depth-first walk whose children sort by name, folders as
    'name/', so that the order equals the byte order of the keys (as S3 lists them). `stamps` gets each folder's
    stamp, taken before it is read (None for one changed too lately to be trusted)."""
    folder = os.path.join(root, prefix) if prefix else root
    try:
        if stamps is not None:
            stamps[prefix] = _stamp(os.stat(folder), settled=True)
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return
    if after.startswith(prefix) and after != prefix:
        # names before `after`'s own here are dropped before any other look at them: a listing of the keys after
        # the last one known (listing.tail) costs one pass over the names of a folder of 625,000 files, not 2 s
        cut = after[len(prefix):]
        entries = [e for e in entries if e.name + "/" > cut or cut.startswith(e.name + "/")]
    children = sorted((e.name + "/" if e.is_dir(follow_symlinks=True) else e.name, e)
                      for e in _visible(folder, entries))
    for name, _ in children:
        rel = prefix + name
        if name.endswith("/"):
            # a whole sub-tree sorts before `after` unless `after` lies inside it
            if recursive and (rel > after or after.startswith(rel)):
                yield from _walk_local(root, rel, True, after, stamps)
        elif rel > after:
            yield rel


def _walk_s3(fs, root: str, prefix: str, recursive: bool, after: str, opts: StorageOptions,
             page_size: int = 1000) -> Iterator[str]:
    """One page at a time, so a prefix of millions of objects is never held in full."""
    bucket, _, key = root.partition("/")
    base = key.rstrip("/") + "/" if key else ""
    kwargs = {"Bucket": bucket, "Prefix": base + prefix, "MaxKeys": page_size}
    if not recursive:
        kwargs["Delimiter"] = "/"
    if after:
        kwargs["StartAfter"] = base + after
    while True:
        page = storage.with_retries(lambda: fs.call_s3("list_objects_v2", **kwargs), f"s3://{root}", opts)
        for obj in page.get("Contents", []):
            if not obj["Key"].endswith("/"):
                yield obj["Key"][len(base):]
        if not page.get("IsTruncated"):
            return
        kwargs["ContinuationToken"] = page["NextContinuationToken"]


def _walk_fsspec(fs, root: str, prefix: str, recursive: bool, after: str) -> Iterator[str]:
    folder = f"{root.rstrip('/')}/{prefix}".rstrip("/")
    entries = sorted((e["name"].rstrip("/").rsplit("/", 1)[-1] + ("/" if e["type"] == "directory" else ""), e)
                     for e in fs.ls(folder, detail=True))
    for name, _ in entries:
        rel = prefix + name
        if name.endswith("/"):
            if recursive and (rel > after or after.startswith(rel)):
                yield from _walk_fsspec(fs, root, rel, True, after)
        elif rel > after:
            yield rel


def walk(uri: str, opts: StorageOptions, part: Partition, after: str = "",
         stamps: dict | None = None) -> Iterator[str]:
    """Relative keys of a partition greater than `after`, in lexicographic order. `stamps`: on a local file system,
    filled with the stamps of the folders walked (folder_stamps_hold)."""
    fs, root = storage.filesystem(uri, opts)
    if storage.is_local(fs):
        return _walk_local(root, part.prefix, part.recursive, after, stamps)
    if storage.protocol_of(uri) in ("s3", "s3a"):
        return _walk_s3(fs, root, part.prefix, part.recursive, after, opts)
    return _walk_fsspec(fs, root, part.prefix, part.recursive, after)


def _stamp(st: os.stat_result, settled: bool = False) -> list[int] | None:
    """A folder's inode and change time. Adding, removing or renaming an entry changes it, and so does setting the
    folder's modification time (as rsync -a, cp -a and tar do): no tool sets it back. A folder changed less than
    SETTLE_S ago gives None with `settled`: a file system's clock ticks coarsely, and an entry added in the same tick
    as the folder was read would leave its stamp as it was."""
    if settled and time.time() - st.st_ctime < SETTLE_S:
        return None
    return [st.st_ino, st.st_ctime_ns]


def folder_stamps_hold(root: str, stamps: dict | None) -> bool:
    """Whether no folder of a local partition under `root` changed since a listing of it to its end took these
    stamps: then it holds the keys it held, all in its snapshot (which only grows). A few stat calls, whatever the
    files."""
    if not stamps:
        return False
    for prefix, stamp in stamps.items():
        try:
            if _stamp(os.stat(os.path.join(root, prefix) if prefix else root)) != stamp:
                return False
        except OSError:
            return False
    return True


# --- planning partitions -------------------------------------------------------------------------------------


def _children(uri: str, opts: StorageOptions, prefix: str) -> tuple[list[str], bool] | None:
    """(sub-folders of `prefix`, whether it also holds files), or None when there are too many to plan with."""
    fs, root = storage.filesystem(uri, opts)
    if storage.protocol_of(uri) in ("s3", "s3a"):
        bucket, _, key = root.partition("/")
        base = (key.rstrip("/") + "/" if key else "") + prefix
        kwargs = {"Bucket": bucket, "Prefix": base, "Delimiter": "/", "MaxKeys": 1000}
        folders, has_files = [], False
        for _ in range(MAX_PLAN_PAGES):
            page = storage.with_retries(lambda: fs.call_s3("list_objects_v2", **kwargs), uri, opts)
            folders += [p["Prefix"][len(base) - len(prefix):] for p in page.get("CommonPrefixes", [])]
            has_files = has_files or any(not o["Key"].endswith("/") for o in page.get("Contents", []))
            if not page.get("IsTruncated"):
                return folders, has_files
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
        return None
    if storage.is_local(fs):
        folder = os.path.join(root, prefix) if prefix else root
        if not os.path.isdir(folder):
            raise ConfigError(f"input.uri: {uri} is not a folder")
        entries = _visible(folder, list(os.scandir(folder)))
        return (sorted(prefix + e.name + "/" for e in entries if e.is_dir()),
                any(not e.is_dir() for e in entries))
    entries = storage.with_retries(lambda: fs.ls(f"{root.rstrip('/')}/{prefix}", detail=True), uri, opts)
    return (sorted(prefix + e["name"].rstrip("/").rsplit("/", 1)[-1] + "/" for e in entries
                   if e["type"] == "directory"), any(e["type"] != "directory" for e in entries))


def uncovered(uri: str, opts: StorageOptions, known: list[Partition], prefix: str = "") -> list[Partition]:
    """Partitions for the keys below `prefix` that no `known` partition lists: sub-folders and files made since the
    prefix was planned. One listing call per folder on the way to the known partitions."""
    if any(p.recursive and prefix.startswith(p.prefix) for p in known):
        return []
    found = _children(uri, opts, prefix)
    if found is None:   # too many sub-folders to plan with: its partitions list what they hold
        log.warning("%s%s has too many sub-folders to look for new ones among them", storage.scrub(uri), prefix)
        return []
    folders, has_files = found
    new = [Partition(prefix, False)] if has_files and Partition(prefix, False) not in known else []
    for folder in folders:
        if any(p.prefix.startswith(folder) for p in known):   # a known partition is this folder or below it
            new += uncovered(uri, opts, known, folder)
        else:
            new.append(Partition(folder, True))
    return new


def plan_partitions(uri: str, opts: StorageOptions, max_depth: int = 8) -> list[Partition]:
    """Sub-folders of the prefix, one partition each (descending while a folder holds one sub-folder and no
    files), plus the files directly in the folder planned at. A few listing calls, whatever the corpus size."""
    prefix = ""
    for _ in range(max_depth):
        found = _children(uri, opts, prefix)
        if found is None:   # a flat prefix with very many entries: one partition, listed page by page
            return [Partition(prefix, True)]
        folders, has_files = found
        if len(folders) == 1 and not has_files:
            prefix = folders[0]
            continue
        if not folders:
            return [Partition(prefix, True)]
        return ([Partition(prefix, False)] if has_files else []) + [Partition(f, True) for f in folders]
    return [Partition(prefix, True)]


# --- the snapshot --------------------------------------------------------------------------------------------


class ListingSnapshot:
    """`_state/listing/<id>/`: plan.json (the partitions), then per partition p<i>/<n>.pq.state parts and a
    p<i>/complete.json once the partition is listed to its end."""

    def __init__(self, state: StateDir, uri: str):
        self.state, self.uri = state, uri
        self.dir = f"listing/{listing_id(uri)}"

    def partitions(self, opts: StorageOptions) -> list[Partition]:
        """The saved plan, or a new one (saved before any part is written, so part numbers stay meaningful)."""
        plan = self._plan()
        if plan is None or plan.get("uri") != self.uri:
            parts = plan_partitions(self.uri, opts)
            self.state.write_json(f"{self.dir}/plan.json", {"uri": self.uri, "snapshot": uuid.uuid4().hex,
                                                            "partitions": [{"prefix": p.prefix,
                                                                            "recursive": p.recursive} for p in parts]})
            return parts
        return [Partition(p["prefix"], p["recursive"]) for p in plan["partitions"]]

    def extend(self, opts: StorageOptions, relist_before: float, now: float) -> list[Partition]:
        """The plan, with partitions for sub-folders made since it was planned when that was before `relist_before`
        (the end of the last run that ended), appended so that the others keep their numbers."""
        plan = self._plan()
        partitions = [Partition(p["prefix"], p["recursive"]) for p in plan["partitions"]]
        if plan.get("planned_at", 0.0) >= relist_before:
            return partitions
        new = uncovered(self.uri, opts, partitions)
        plan["partitions"] += [{"prefix": p.prefix, "recursive": p.recursive} for p in new]
        self.state.write_json(f"{self.dir}/plan.json", {**plan, "planned_at": now})
        return partitions + new

    def identity(self) -> str:
        """A new value whenever the prefix is listed afresh (a deleted snapshot): the parts of a new listing hold
        other keys under the same numbers, so completion records made over an earlier one must not be trusted.
        "" for a snapshot from before this was kept."""
        plan = self._plan()
        return (plan or {}).get("snapshot", "")

    def _plan(self) -> dict | None:
        return self.state.read_json(f"{self.dir}/plan.json")

    def parts(self, index: int) -> tuple[list[int], bool]:
        """(numbers of the parts written so far, whether the partition is listed to its end)."""
        numbers, complete = self.status(index)
        return numbers, complete is not None

    def status(self, index: int) -> tuple[list[int], dict | None]:
        """(numbers of the parts written so far, complete.json once the partition is listed to its end). Parts an
        earlier version named `<n>.parquet` are renamed first: a snapshot is never written again, and under that name
        readers globbing the output for `**/*.parquet` took them for results."""
        names = self.state.list(f"{self.dir}/p{index}")
        numbers = set()
        for name in names:
            number, suffix = name.split(".", 1)[0], "." + name.split(".", 1)[-1]
            if number.isdigit() and suffix in (TABLE, OLD_TABLE):
                numbers.add(int(number))
                if suffix == OLD_TABLE:
                    self.state.rename_old_table(self._part(index, int(number)))
        complete = self.state.read_json(f"{self.dir}/p{index}/complete.json") if "complete.json" in names else None
        return sorted(numbers), complete

    def _part(self, index: int, number: int) -> str:
        return f"{self.dir}/p{index}/{number:06d}"

    def read_part(self, index: int, number: int) -> list[str]:
        table = self.state.read_table(self._part(index, number))
        if table is None:
            raise FileNotFoundError(f"listing snapshot part p{index}/{number} is missing")
        return table["path"].to_pylist()

    def write_part(self, index: int, number: int, paths: list[str]) -> None:
        self.state.write_table(self._part(index, number), pa.table({"path": pa.array(paths, pa.string())}))

    def mark_complete(self, index: int, parts: int, runs: list[list[int]] | None = None,
                      listed_at: float = 0.0, tail_from: int | None = None) -> None:
        """`runs`: [first, end) ranges of part numbers whose keys ascend through the range (a listing, or the new keys
        of a listing again); `listed_at`: the start of the run that listed it (wall clock); `tail_from`: parts from
        this number on are being written by a listing of the keys after the last one known (`tail`)."""
        done = {"parts": parts, "runs": runs or [[0, parts]], "listed_at": listed_at}
        self.state.write_json(f"{self.dir}/p{index}/complete.json",
                              done if tail_from is None else {**done, "tail_from": tail_from})

    @staticmethod
    def runs(numbers: list[int], complete: dict | None) -> list[list[int]]:
        """The runs of parts a listing to its end wrote (mark_complete), with those of a tail listing stopped before
        it marked them: each of its parts is written whole, in key order, so the ones there make a run."""
        if complete is None:
            return []
        runs = complete.get("runs") or [[0, complete["parts"]]]
        start = complete.get("tail_from")
        if start is not None and numbers and numbers[-1] >= start:
            runs = runs + [[start, numbers[-1] + 1]]
        return runs

    def stamps(self, index: int) -> dict | None:
        """The folder stamps (folder_stamps_hold) of the last listing of the partition to its end from its start."""
        return self.state.read_json(f"{self.dir}/p{index}/folders.json")

    def write_stamps(self, index: int, stamps: dict) -> None:
        self.state.write_json(f"{self.dir}/p{index}/folders.json", stamps)

    def mark_unchanged(self, uri: str, opts: StorageOptions, index: int, numbers: list[int], complete: dict,
                       now: float) -> bool:
        """Mark a partition whose folder stamps hold listed again at `now`, as a listing that found nothing new."""
        fs, root = storage.filesystem(uri, opts)
        if not storage.is_local(fs) or not folder_stamps_hold(root, self.stamps(index)):   # S3: no stamps to read
            return False
        runs = self.runs(numbers, complete)
        self.mark_complete(index, max(end for _, end in runs), runs, now)
        return True

    def keys(self, index: int, runs: list[list[int]]) -> Iterator[str]:
        """Every key of these runs of parts, in ascending order, a part at a time per run."""
        def run(first: int, end: int) -> Iterator[str]:
            for number in range(first, end):
                yield from self.read_part(index, number)

        return heapq.merge(*(run(first, end) for first, end in runs))


def partition_parts(uri: str, opts: StorageOptions, snapshot: ListingSnapshot, index: int, part: Partition,
                    skip, relist_before: float = 0.0, now: float = 0.0, note: dict | None = None,
                    deadline: float | None = None) -> Iterator[tuple[int, list[str] | None]]:
    """(part number, relative media paths) for every part of a partition, in order: read from the snapshot, or
    listed now and snapshotted first. Parts for which `skip(number)` is true come as (number, None) unread. A
    partition listed before `relist_before` is listed again: keys the snapshot lacks come as new parts. `note` gets
    "listed_at", when the snapshot was last listed to its end (`now` if here). With `deadline` (time.monotonic) the
    listing stops once it passes, the partition left unmarked as a listing cut short (note["cut"]), which the next
    lister goes on with after its last part."""
    numbers, complete = snapshot.status(index)
    for number in numbers:
        yield number, None if skip(number) else snapshot.read_part(index, number)
    runs = snapshot.runs(numbers, complete)
    listed = max((end for _, end in runs), default=0)   # parts after these: a listing cut short, to go on with
    if complete is not None and listed > (numbers[-1] if numbers else -1) and \
            complete.get("listed_at", 0.0) >= relist_before:
        if note is not None:
            note["listed_at"] = complete.get("listed_at", 0.0)
        return
    after = snapshot.read_part(index, numbers[-1])[-1] if numbers and numbers[-1] >= listed else ""
    note = {} if note is None else note
    if complete is not None and not after and snapshot.mark_unchanged(uri, opts, index, numbers, complete, now):
        note["listed_at"] = now
        return
    number = numbers[-1] + 1 if numbers else 0
    stamps = {} if not after else None   # a walk from the start stamps the folders it reads
    walked = walk(uri, opts, part, after, stamps)
    for chunk in _chunks(_new_keys(walked if deadline is None else _until(walked, deadline, note),
                                   snapshot.keys(index, runs))):
        snapshot.write_part(index, number, chunk)
        yield number, chunk
        number += 1
    if note.get("cut"):
        return
    if stamps and len(stamps) <= MAX_STAMPED_FOLDERS and None not in stamps.values():
        snapshot.write_stamps(index, stamps)
    runs = runs + ([[listed, number]] if number > listed else [])
    snapshot.mark_complete(index, number, runs, now)
    note["listed_at"] = now


def relist(uri: str, opts: StorageOptions, snapshot: ListingSnapshot, index: int, part: Partition,
           relist_before: float, now: float, deadline: float | None = None) -> list[int] | None:
    """List a partition again if it was listed before `relist_before`, snapshotting the keys it lacks as new parts
    (partition_parts, no part read); the numbers of its parts after. The driver does it before any Ray work, so
    that a rerun that finds nothing new starts nothing. None when `deadline` (time.monotonic) came first: the new
    parts found so far stay, and the partition's read task goes on after the last of them."""
    note: dict = {}
    numbers = [number for number, _ in partition_parts(uri, opts, snapshot, index, part, lambda n: True,
                                                       relist_before, now, note, deadline)]
    return None if note.get("cut") else numbers


def tail(uri: str, opts: StorageOptions, snapshot: ListingSnapshot, index: int, part: Partition,
         relist_before: float, now: float) -> tuple[list[int], bool] | None:
    """List a partition listed before `relist_before` for the keys after the last one of its snapshot only: what a
    corpus only appended to has gained, found at the cost of its new objects on S3 (StartAfter), of a pass over
    names locally. They are snapshotted as a run of new parts, and the partition stays due to be listed again in full
    (for keys added among the old ones); a local partition whose folder stamps hold is marked listed again instead.
    Gives the numbers of its parts after, and whether it is listed again in full; None where there is no such listing
    to make: the partition is not due, or a listing of it again is under way (its lister goes on with it)."""
    numbers, complete = snapshot.status(index)
    if complete is None or complete.get("listed_at", 0.0) >= relist_before:
        return None
    runs = snapshot.runs(numbers, complete)
    listed = max((end for _, end in runs), default=0)
    if numbers and numbers[-1] >= listed:
        return None
    if snapshot.mark_unchanged(uri, opts, index, numbers, complete, now):
        return numbers, True
    last = max((snapshot.read_part(index, end - 1)[-1] for first, end in runs if end > first), default="")
    chunks = _chunks(key for key in walk(uri, opts, part, last) if media_type_of(key) is not None)
    first = next(chunks, None)
    if first is None:
        return numbers, False
    snapshot.mark_complete(index, listed, runs, complete.get("listed_at", 0.0), tail_from=listed)
    number = listed
    for chunk in itertools.chain([first], chunks):
        snapshot.write_part(index, number, chunk)
        number += 1
    snapshot.mark_complete(index, number, runs + [[listed, number]], complete.get("listed_at", 0.0))
    return numbers + list(range(listed, number)), False


def _until(keys: Iterator[str], deadline: float, note: dict) -> Iterator[str]:
    """`keys` until `deadline` passes (looked at every DEADLINE_EVERY keys); note["cut"] then."""
    for i, key in enumerate(keys):
        if i % DEADLINE_EVERY == 0 and _clock() >= deadline:
            note["cut"] = True
            return
        yield key


def _new_keys(walked: Iterator[str], known: Iterator[str]) -> Iterator[str]:
    """The media keys of `walked` that `known` lacks, both ascending: a listing compared with its snapshot in one
    pass, holding a part of each at a time."""
    have = next(known, None)
    for key in walked:
        while have is not None and have < key:
            have = next(known, None)
        if have != key and media_type_of(key) is not None:   # a listing only picks media files
            yield key


def _chunks(keys: Iterator[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for key in keys:
        chunk.append(key)
        if len(chunk) == PART_ROWS:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
