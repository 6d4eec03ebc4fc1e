"""What changed in the input since its completion records were made, found without reading it again.

A finished read unit is skipped unopened only while its record still covers what the input holds. Each unit record
keeps an extent (pipeline.progress) to compare with what the input's listing says now:
- a listing partition listed before the end of the last run that ended is listed again here, in the driver, before
  any Ray work starts (pipeline.listing: the keys its snapshot lacks become new parts); it is opened only when it
  has parts its records lack, so a rerun that finds nothing new starts nothing. The keys after each snapshot's last
  one are looked for first (cheap: O(new) on S3); in full, a listing costs ~70 us of driver CPU per S3 object
  (botocore's parse of each page), ~700 s at 1e7 objects, which would hold back the first new row that long. So it
  goes on only until something new is found, for RELIST_BUDGET_S at most; then the work starts, and the partitions
  not listed again are opened, their read tasks listing them again beside the work (going on after the last new part
  found here);
- a manifest whose size or version (ETag, modification time) changed is checked cheaply: a CSV/JSONL one only
  appended to still holds the same bytes before where its records end, a Parquet one rewritten with its old rows first
  has the same row groups before its last old one and the same URIs at their end. Then only its new rows are read;
  any other change is said in one line, and the file is not read again (its rows done keep their results);
- a tar or Parquet shard file whose size changed is said in one line likewise.
Records an earlier version made have no extent: they cover their unit as before, with a note.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from pipeline import listing, readers, storage
from pipeline.readers import ReadSpec, Unit

MAX_NAMED = 5   # files named in a line about changed input; the rest are counted
RELIST_BUDGET_S = 10.0   # the driver's time for listing partitions again before the work starts (then read tasks do)
# Partitions listed again at once. Listing is CPU work under the GIL (comparing keys; on S3 parsing pages, whose
# requests overlap with 4): 16 at once each got 1/16th of the budget and all of them were cut short, their work
# lost (a cut partition is listed again from its start by its read task).
RELIST_THREADS = 4


@dataclass(frozen=True)
class Change:
    """What to do with a finished unit."""
    read: bool                  # open it again
    grown: dict | None = None   # a text manifest only appended to: its record's {"size", "rows"}
    refused: str = ""           # why it is not read again although it changed (one line's worth)
    legacy: bool = False        # its record has no extent to compare with (an earlier version's)
    relisted: bool = True       # False: a listing partition left to its read task to list again
    new: bool = False           # known to hold work (rows appended, new objects listed): its reading goes first


@dataclass
class Notes:
    """The lines a start says about input that changed, gathered over the units."""
    refused: list[str] = field(default_factory=list)
    legacy: int = 0
    moved: list[str] = field(default_factory=list)   # unfinished units whose file changed under their records
    unlisted: int = 0   # finished listing partitions left to their read tasks to list again

    def add(self, change: Change) -> None:
        if change.refused:
            self.refused.append(change.refused)
        self.legacy += change.legacy
        self.unlisted += not change.relisted

    def lines(self) -> list[str]:
        out = []
        if self.refused:
            more = f"; and {len(self.refused) - MAX_NAMED} more" if len(self.refused) > MAX_NAMED else ""
            out.append(f"input changed: {len(self.refused)} finished file(s) changed other than by rows appended "
                       f"({'; '.join(self.refused[:MAX_NAMED])}{more}): they are not read again and their results "
                       f"stay; name their new rows in a new manifest file, or write to a new output.uri to run them "
                       f"all")
        if self.moved:
            named = ", ".join(storage.scrub(u) for u in self.moved[:MAX_NAMED])
            out.append(f"note: {len(self.moved)} input file(s) changed since some of their shards were done ({named}"
                       f"{', ...' if len(self.moved) > MAX_NAMED else ''}): rows past those are read, the rows done "
                       f"are taken as done")
        if self.unlisted:
            out.append(f"note: {self.unlisted} finished listing partition(s) of the input are listed again for new "
                       f"objects by their read tasks, beside the work (before the work starts, only until something "
                       f"new is found, for {RELIST_BUDGET_S:.0f}s at most)")
        if self.legacy:
            out.append(f"note: {self.legacy} finished input file(s) have records from an earlier version, which kept "
                       f"no file sizes: rows appended to them since are not looked for (new files are)")
        return out


def finished_units(units: list[Unit], extents: dict[str, dict], spec: ReadSpec,
                   shards: dict[str, set[str]] | None = None) -> dict[str, Change]:
    """A Change per finished unit (those in `units`), the checks run concurrently (a few small reads each, for
    files whose stamp changed only; listings as `_listing_changes` says). `shards`: each unit's shards with records."""
    listed = [u for u in units if u.kind == "listing"]
    files = [u for u in units if u.kind != "listing"]
    with ThreadPoolExecutor(max_workers=16) as pool:
        checked = pool.map(lambda unit: finished_unit(unit, extents.get(unit.id), spec), files)
        found = _listing_changes(listed, extents, spec, shards or {})
        return {**found, **{u.id: change for u, change in zip(files, checked)}}


def finished_unit(unit: Unit, extent: dict | None, spec: ReadSpec) -> Change:
    """A finished manifest or shard file: read again where rows were appended to it."""
    if extent is None or not extent.get("of"):
        return Change(read=False, legacy=True)
    if extent["of"] == unit.stamp or not unit.stamp:   # no stamp: a unit made up without a listing (tests)
        return Change(read=False)
    old, new = readers.stamp_size(extent["of"]), readers.stamp_size(unit.stamp)
    if unit.kind != "manifest":
        return Change(read=False) if old == new else Change(read=False, refused=f"{_name(unit)}: {old} -> {new} bytes")
    try:
        if readers.table_format(unit.uri) == "parquet":
            return _parquet_change(unit, extent, spec)
        return _text_change(unit, extent, old, new, spec)
    except FileNotFoundError:   # gone since it was listed: nothing to read, as for any file deleted
        return Change(read=False)


def _listing_changes(units: list[Unit], extents: dict[str, dict], spec: ReadSpec,
                     shards: dict[str, set[str]]) -> dict[str, Change]:
    """Finished listing partitions listed before the last run ended are looked at again, RELIST_THREADS at a time in
    input order, until RELIST_BUDGET_S has passed: first for keys after their snapshots' last ones only (cheap:
    appended corpora; local partitions whose folders are unchanged are done then), then in full, but only while
    nothing new is found. Once something is, the work starts, and every partition not yet listed again in full is
    opened for its read task to list beside the work."""
    deadline = time.monotonic() + RELIST_BUDGET_S
    due = [u for u in units if (extents.get(u.id) or {}).get("listed_at", 0.0) < spec.relist_before]
    found = {u.id: Change(read=False) for u in units if u not in due}
    snapshot = listing.ListingSnapshot(spec.state, spec.input_uri)

    def look(unit: Unit) -> Change | None:
        """What the keys after its snapshot's last one say of a partition; None where it waits for a listing in full."""
        tail = None if time.monotonic() >= deadline else listing.tail(
            spec.input_uri, spec.opts, snapshot, unit.partition, listing.Partition(unit.prefix, unit.recursive),
            spec.relist_before, spec.started_at)
        if tail is None:
            return None
        numbers, whole = tail
        read = any(str(n) not in shards.get(unit.id, set()) for n in numbers)
        if whole:   # listed again in full already: its folders are unchanged
            return Change(read=read, new=read)
        return Change(read=True, relisted=False, new=True) if read else None

    with ThreadPoolExecutor(max_workers=RELIST_THREADS) as lister:
        looked = dict(zip([u.id for u in due], lister.map(look, due)))
        found |= {name: change for name, change in looked.items() if change is not None and change.relisted}
        due = [u for u in due if u.id not in found]
        if any(looked[u.id] is not None for u in due):   # new keys after some partition's last: the work starts
            return found | {u.id: looked[u.id] or Change(read=True, relisted=False) for u in due}
        stop = threading.Event()

        def check(unit: Unit) -> Change:
            if stop.is_set():
                return Change(read=True, relisted=False)
            change = _listing_change(unit, snapshot, spec, shards.get(unit.id, set()), deadline)
            if change.new:
                stop.set()
            return change

        return found | {u.id: change for u, change in zip(due, lister.map(check, due))}


def _listing_change(unit: Unit, snapshot: listing.ListingSnapshot, spec: ReadSpec, shards: set[str],
                    deadline: float) -> Change:
    """Listed again in full: read where its snapshot now has parts without records (found now, or by a run killed
    before it read them), or where the deadline came before its listing's end."""
    if time.monotonic() >= deadline:
        return Change(read=True, relisted=False)
    numbers = listing.relist(spec.input_uri, spec.opts, snapshot, unit.partition,
                             listing.Partition(unit.prefix, unit.recursive), spec.relist_before, spec.started_at,
                             deadline)
    if numbers is None:
        return Change(read=True, relisted=False)
    read = any(str(n) not in shards for n in numbers)
    return Change(read=read, new=read)


def _text_change(unit: Unit, extent: dict, old: int, new: int, spec: ReadSpec) -> Change:
    if "tail" not in extent:   # it was empty (its reader stopped before): every row is new
        return Change(read=True)
    if new < old:
        return Change(read=False, refused=f"{_name(unit)}: {old} -> {new} bytes")
    fs, path = storage.filesystem(unit.uri, spec.opts)
    start = max(0, old - readers.TAIL_BYTES)
    data = storage.with_retries(lambda: fs.cat_file(path, start=start, end=old + 1), unit.uri, spec.opts)
    ends_a_line = old == 0 or data[old - start - 1:old - start] == b"\n" or data[old - start:] == b"\n"
    if readers._digest(data[:old - start]) != extent["tail"] or not ends_a_line:
        return Change(read=False, refused=f"{_name(unit)}: its bytes before byte {old} differ")
    if new == old:
        return Change(read=False)   # the same bytes (touched, or copied over)
    return Change(read=True, grown={"size": old, "rows": extent["rows"]}, new=True)


def _parquet_change(unit: Unit, extent: dict, spec: ReadSpec) -> Change:
    if "tail" not in extent or not extent.get("groups"):
        return Change(read=True)
    old = extent["groups"]
    fs, path = storage.filesystem(unit.uri, spec.opts)

    def row_groups() -> list[int]:
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]

    new = storage.with_retries(row_groups, unit.uri, spec.opts)
    last = len(old) - 1
    same_layout = len(new) > last and new[:last] == old[:last] and new[last] >= old[last]
    if not same_layout or readers.parquet_tail(unit.uri, spec.opts, spec.uri_column, old) != extent["tail"]:
        return Change(read=False, refused=f"{_name(unit)}: its rows up to row {sum(old)} differ")
    # grown or not, read as a unit with records: their extents cover the old rows, the footer names the new ones
    return Change(read=sum(new) > sum(old), new=sum(new) > sum(old))


def _name(unit: Unit) -> str:
    return storage.scrub(unit.uri)


def moved_under(unit: Unit, extents: dict[str, dict]) -> bool:
    """Whether some shard of an unfinished unit was done from another version of its file than the one there now."""
    return bool(unit.stamp) and any(e.get("of") not in (None, unit.stamp) for e in extents.values())
