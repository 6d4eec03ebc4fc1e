"""Input that grows after a run finished it: rows appended to a manifest, objects added under a listed prefix. A rerun
runs exactly the new ones, reading only the new part; changes it cannot follow are said in one line. The read side
and the driver's bookkeeping (records, result files) without Ray, a kill between any two result files included;
then the job itself on one local Ray."""

import io
import os
from dataclasses import dataclass, field, replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import changes, config, listing, output, progress, readers, storage
from pipeline import run as run_module
from pipeline.run import _open_work, run
from pipeline.sources import TaskPlan, UnitWork, pending_items
from pipeline.state import StateDir
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import config_text, good_media, write_local

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)
PLAN = TaskPlan(("caption",), "")


class Reports:
    """Stands in for the tracker actor (progress.Tracker): what the read tasks report, as the driver drains it."""

    def __init__(self):
        self.shards, self.units = {}, {}
        self.shard = _Remote(lambda name, counts, pending, skipped, extent=None:
                             self.shards.__setitem__(name, (counts, pending, extent)))
        self.unit = _Remote(lambda name, shards, extent=None: self.units.__setitem__(name, (shards, extent)))
        self.cut_short = _Remote(lambda *a: None)


@dataclass
class _Remote:
    call: object

    def remote(self, *args):
        self.call(*args)


@dataclass
class Driver:
    """A run's read side and bookkeeping on `out`: records, sidecars and whole result files, as the job keeps them.
    `rows_per_file` small, so that a kill can fall between two result files."""
    out: object
    spec: readers.ReadSpec
    rows_per_file: int = 3
    notes: list = field(default_factory=list)

    def run(self, kill_after: int | None = None) -> list[str]:
        """The uris run; with `kill_after`, the run dies once that many rows were handed to the writer (the files
        whole by then have landed, the rows buffered are lost, no record is folded)."""
        state = StateDir(str(self.out), OPTS)
        ledger = progress.Ledger(state, "fp")
        shards = progress.OpenShards(ledger, PLAN.all())
        writer = output.ResultWriter(str(self.out), OPTS, rows_per_file=self.rows_per_file, flush_seconds=600,
                                     note_file=ledger.note_file, landed=shards.wrote, committed=ledger.committed)
        listed = output.listed_files(writer.fs, writer.root, OPTS)
        resume = ledger.load(listed)
        if resume.scanned and not listed:
            ledger.mark_trusted()   # a new output: its records cover it from its first row on (as OutputStore.open)
        work, _, self.notes = _open_work(readers.find_units(self.spec), resume, PLAN, self.spec)
        reports, done = Reports(), []
        blocks = [b for w in work for b in pending_items(w, self.spec, PLAN, resume.done_keys, reports)]
        shards.listed(reports.shards, reports.units)
        for block in blocks:
            for item in block.to_pylist():
                if kill_after is not None and len(done) == kill_after:
                    return done
                writer.add(_result(item))
                done.append(item["uri"])
        writer.flush()
        ledger.fold()
        return done


def _result(item: dict) -> pa.Table:
    row = output.error_row(item, item["tasks"][0], "p", "", "m", "h")
    return pa.Table.from_pylist([row], schema=output.SCHEMA).append_column("_shard", pa.array([item["shard"]]))


def _spec(out, **kw) -> readers.ReadSpec:
    return readers.ReadSpec(kw.get("uri", ""), "files", kw.get("manifest", ""), "uri", "", "", (), ("*",), (), OPTS,
                            StateDir(str(out), OPTS), None, kw.get("started_at", 0.0), kw.get("relist_before", 0.0))


def _write_manifest(path, uris, fmt, row_group_size=None):
    if fmt == "parquet":
        pq.write_table(pa.table({"uri": uris}), path, row_group_size=row_group_size)
    else:
        path.write_text("uri\n" + "".join(u + "\n" for u in uris))


def _pairs(out) -> pd.DataFrame:
    return pd.read_parquet(out, columns=["id", "uri", "task"])


@pytest.mark.parametrize("fmt", ["csv", "parquet"])
def test_rows_appended_to_a_finished_manifest_run_once_even_when_a_kill_falls_among_them(tmp_path, monkeypatch, fmt):
    """The shard the new rows extend is read past its record only, under a record of its own, so the rows of it
    that landed before the kill are found in the output and the rest run: each pair once."""
    monkeypatch.setattr(readers, "MANIFEST_SHARD_ROWS", 4)
    monkeypatch.setattr(readers, "TAIL_BYTES", 64)   # less than a read: the digest comes from the bytes read
    out, manifest = tmp_path / "out", tmp_path / f"m.{fmt}"
    uris = [f"/media/{i:03d}.png" for i in range(10)]   # 2 full shards and one of 2 rows
    _write_manifest(manifest, uris, fmt, row_group_size=100)
    driver = Driver(out, _spec(out, manifest=str(manifest)))
    assert len(driver.run()) == 10 and driver.run() == []
    read = []
    monkeypatch.setattr(readers, "_batches", _spy(readers._batches, read))
    # 9 more rows, one of them an item the file named before (a manifest runs an item once)
    grown = uris + [f"/media/{i:03d}.png" for i in range(10, 18)] + [uris[3]]
    _write_manifest(manifest, grown, fmt, row_group_size=100)
    assert driver.run(kill_after=4) == grown[10:14]   # 3 landed in a file, the 4th was lost with the run
    assert driver.run() == grown[13:18] and driver.run() == []
    grown += ["/media/100.png", "/media/101.png"]   # and again: the records of the last read say where it ended
    _write_manifest(manifest, grown, fmt, row_group_size=100)
    assert driver.run() == grown[-2:]
    df = _pairs(out)
    assert sorted(df.uri) == sorted(grown[:18] + grown[-2:]) and not df.duplicated(["id", "task"]).any()
    if fmt == "csv":   # read from where the rows done end: the bytes before are never parsed again
        assert {start for start, _ in read[-3:-1]} == {len(("uri\n" + "".join(u + "\n" for u in uris)).encode())}
    assert not driver.notes


def _spy(batches, read: list):
    def spy(uri, fmt, columns, text, opts, *, start=0, end=None, **kw):
        read.append((start, end))
        return batches(uri, fmt, columns, text, opts, start=start, end=end, **kw)
    return spy


def test_a_big_manifest_resumes_without_reading_its_finished_row_groups(tmp_path, monkeypatch):
    """Finished shards' ids come from _state/ids/: a repeat of one of their items later in the file still runs
    once, and no row group whose shards are all finished is read."""
    monkeypatch.setattr(readers, "MANIFEST_SHARD_ROWS", 4)
    out, manifest = tmp_path / "out", tmp_path / "m.parquet"
    uris = [f"/media/{i:03d}.png" for i in range(24)]
    pq.write_table(pa.table({"uri": uris + [uris[1]] + ["/media/new.png"]}), manifest, row_group_size=8)
    driver = Driver(out, _spec(out, manifest=str(manifest)))
    assert len(driver.run(kill_after=19)) == 19   # shards of row groups 0 and 1 (rows 0-15) are finished
    groups = []
    real = pq.ParquetFile.iter_batches
    monkeypatch.setattr(pq.ParquetFile, "iter_batches",
                        lambda self, *a, **k: groups.append(k["row_groups"]) or real(self, *a, **k))
    assert driver.run() == uris[18:] + ["/media/new.png"]   # the repeat of row 1 is dropped, unread
    assert groups == [[2], [3]]
    assert sorted(_pairs(out).uri) == sorted(uris + ["/media/new.png"])


def test_rows_past_a_shards_record_in_embedded_media_are_named_by_their_row(tmp_path):
    """A Parquet file of embedded media that grew while its unit was unfinished: the rows past the record of its
    shard are a shard of their own, and keyless rows keep the names of their rows in the file."""
    data = good_media(num_images=1, num_videos=0)
    pq.write_table(pa.table({"jpg": [next(iter(data.values()))] * 5}), tmp_path / "a.parquet")
    spec = replace(_spec(tmp_path / "out", uri=str(tmp_path)), format="parquet", bytes_column="jpg")
    unit = readers.find_units(spec)[0]
    work = UnitWork(unit, {"0.0": {"caption": 3}}, {"0.0": {"rows": 3, "of": unit.stamp}})
    reports = Reports()
    items = [r for b in pending_items(work, spec, PLAN, np.zeros(0, np.uint64), reports) for r in b.to_pylist()]
    assert [i["uri"] for i in items] == [f"{unit.uri}#3", f"{unit.uri}#4"]   # named by their row in the file
    assert {n.rsplit("#", 1)[1]: r[2] for n, r in reports.shards.items()} == {"0.0": None, "0.0+3": {
        "rows": 2, "of": unit.stamp}}


def test_a_manifest_changed_other_than_by_appending_is_said_in_one_line_and_not_read_again(tmp_path):
    out, manifest = tmp_path / "out", tmp_path / "m.csv"
    uris = [f"/media/{i:03d}.png" for i in range(6)]
    _write_manifest(manifest, uris, "csv")
    driver = Driver(out, _spec(out, manifest=str(manifest)))
    driver.run()
    _write_manifest(manifest, ["/media/new.png"] + uris, "csv")   # a row put first: the others moved
    assert driver.run() == []
    (line,) = driver.notes
    assert line.startswith("input changed: 1 finished file(s)") and str(manifest) in line and "\n" not in line
    _write_manifest(manifest, uris, "csv")   # the same bytes as when it was done, written again: nothing to say
    os.utime(manifest, ns=(os.stat(manifest).st_atime_ns, os.stat(manifest).st_mtime_ns + 10**9))
    assert driver.run() == [] and not driver.notes


def test_an_earlier_versions_records_cover_their_units_as_before_with_a_note(tmp_path):
    out, manifest = tmp_path / "out", tmp_path / "m.csv"
    _write_manifest(manifest, ["/media/a.png"], "csv")
    driver = Driver(out, _spec(out, manifest=str(manifest)))
    driver.run()
    state = StateDir(str(out), OPTS)
    table = state.read_table(progress.FOLDED)
    state.write_table(progress.FOLDED, table.drop_columns(["extent"]))   # as an earlier version wrote it
    _write_manifest(manifest, ["/media/a.png", "/media/b.png"], "csv")
    assert driver.run() == []
    assert driver.notes == ["note: 1 finished input file(s) have records from an earlier version, which kept no "
                            "file sizes: rows appended to them since are not looked for (new files are)"]


def _a_finished_listing_of_two_folders(tmp_path, monkeypatch):
    """A listed folder of two sub-folders (3 objects each, parts of 2 keys), run to its end: (corpus, out, driver)."""
    monkeypatch.setattr(listing, "PART_ROWS", 2)
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    for folder in ("a", "b"):
        write_local(corpus / folder, {f"{i}.png": b"x" for i in range(3)})
    driver = Driver(out, _spec(out, uri=str(corpus), started_at=100.0))
    assert len(driver.run()) == 6
    return corpus, out, driver


def _walks(monkeypatch, what=lambda part, after: after) -> list:
    """What each listing.walk call is asked for, as `what(partition, after)` says it."""
    walked, real_walk = [], listing.walk
    monkeypatch.setattr(listing, "walk", lambda *a: walked.append(what(a[2], a[3])) or real_walk(*a))
    return walked


def _listed_evens(tmp_path, monkeypatch):
    """0.png 2.png ... 8.png listed at 1.0, two keys a part: (corpus, snapshot, partition)."""
    monkeypatch.setattr(listing, "PART_ROWS", 2)
    corpus = tmp_path / "corpus"
    write_local(corpus, {f"{i}.png": b"x" for i in range(0, 10, 2)})
    snapshot = listing.ListingSnapshot(StateDir(str(tmp_path / "out"), OPTS), str(corpus))
    part = snapshot.partitions(OPTS)[0]
    assert listing.relist(str(corpus), OPTS, snapshot, 0, part, 0.0, 1.0) == [0, 1, 2]
    return corpus, snapshot, part


def test_a_listed_prefix_is_listed_again_after_a_run_ended_and_only_new_objects_run(tmp_path, monkeypatch):
    """New keys in a listed folder become new parts (the snapshot compared in key order, a part at a time), a new
    sub-folder a new partition; a resume of a run killed while listing again goes on after its last new part."""
    corpus, out, driver = _a_finished_listing_of_two_folders(tmp_path, monkeypatch)
    assert driver.run() == []    # no run ended since: nothing is listed again
    for name in ("a/0a.png", "a/9.png", "b/1a.png", "c/0.png", "top.png"):
        write_local(corpus, {name: b"x"})
    driver.spec = replace(driver.spec, started_at=300.0, relist_before=200.0)   # a run ended at 200
    first = driver.run(kill_after=4)[:3]   # 3 rows landed in a file, the 4th was lost with the run
    # a/9.png sorts after a's last key: found by the driver at once, so the work starts and both are listed by it
    assert driver.notes == [f"note: 2 finished listing partition(s) of the input are listed again for new objects by "
                            f"their read tasks, beside the work (before the work starts, only until something new "
                            f"is found, for {changes.RELIST_BUDGET_S:.0f}s at most)"]
    walked = _walks(monkeypatch, lambda part, after: (part.prefix, after))
    rest = driver.run()   # the resume lists nothing its killed run listed
    assert sorted(first + rest) == sorted(str(corpus / n) for n in ("a/0a.png", "a/9.png", "b/1a.png", "c/0.png",
                                                                    "top.png"))
    assert walked == []
    df = _pairs(out)
    assert len(df) == 11 and not df.duplicated(["id", "task"]).any()
    snapshot = listing.ListingSnapshot(StateDir(str(out), OPTS), str(corpus))
    assert [p.prefix for p in snapshot.partitions(OPTS)] == ["a/", "b/", "", "c/"]
    numbers, complete = snapshot.status(0)
    assert numbers == [0, 1, 2, 3] and complete == {"parts": 4, "runs": [[0, 2], [2, 3], [3, 4]], "listed_at": 300.0}
    assert snapshot.read_part(0, 2) == ["a/9.png"] and snapshot.read_part(0, 3) == ["a/0a.png"]   # tail, then middle
    driver.spec = replace(driver.spec, relist_before=0.0, started_at=500.0)
    assert driver.run() == []


def test_a_relisting_cut_short_goes_on_after_its_last_new_part(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "PART_ROWS", 2)
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_local(corpus, {f"{i}.png": b"x" for i in range(0, 10, 2)})
    state = StateDir(str(out), OPTS)
    snapshot = listing.ListingSnapshot(state, str(corpus))
    part = snapshot.partitions(OPTS)[0]
    assert [n for n, _ in listing.partition_parts(str(corpus), OPTS, snapshot, 0, part, lambda n: False,
                                                  now=1.0)] == [0, 1, 2]
    write_local(corpus, {f"{i}.png": b"x" for i in range(1, 10, 2)})
    new = listing.partition_parts(str(corpus), OPTS, snapshot, 0, part, lambda n: True, relist_before=2.0, now=3.0)
    assert [next(new) for _ in range(5)][3:] == [(3, ["1.png", "3.png"]), (4, ["5.png", "7.png"])]   # killed here
    after = _walks(monkeypatch)
    resumed = list(listing.partition_parts(str(corpus), OPTS, snapshot, 0, part, lambda n: n < 5, now=4.0))
    assert resumed[5:] == [(5, ["9.png"])] and after == ["7.png"]
    assert snapshot.status(0)[1] == {"parts": 6, "runs": [[0, 3], [3, 6]], "listed_at": 4.0}
    keys = list(snapshot.keys(0, snapshot.status(0)[1]["runs"]))
    assert keys == sorted(f"{i}.png" for i in range(10))


def test_the_job_runs_exactly_the_rows_and_objects_added_since_it_finished(local_ray, tiny_gqa, tmp_path, monkeypatch):
    """Issue 25's case: a rerun after rows were appended to a finished manifest, or objects added under a listed
    prefix, used to say "N of N input units finished" and run nothing."""
    media = good_media(num_images=6, num_videos=0)
    names = sorted(media)
    write_local(tmp_path / "corpus", {n: media[n] for n in names[:4]})
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\n" + "".join(f"corpus/{n}\n" for n in names[:3]))
    text = config_text("", str(tmp_path / "out"), str(tiny_gqa)).replace('uri = ""\n', f'manifest = "{manifest}"\n')
    (tmp_path / "m.toml").write_text(text)
    cfg = config.load(tmp_path / "m.toml")
    assert run(cfg, out=io.StringIO()).done == 3
    write_local(tmp_path / "corpus", {n: media[n] for n in names[4:]})
    with manifest.open("a") as f:
        f.write("".join(f"corpus/{n}\n" for n in names[3:]))
    printed = io.StringIO()
    summary = run(cfg, out=printed)
    assert (summary.done, summary.skipped) == (3, 3), printed.getvalue()
    assert sorted(_pairs(tmp_path / "out").uri) == sorted(str(tmp_path / "corpus" / n) for n in names)

    listed = tmp_path / "listed"
    write_local(listed, {n: media[n] for n in names[:3]})
    (tmp_path / "l.toml").write_text(config_text(str(listed), str(tmp_path / "out2"), str(tiny_gqa)))
    cfg = config.load(tmp_path / "l.toml")
    assert run(cfg, out=io.StringIO()).done == 3
    write_local(listed, {n.replace("images/", "images/more/"): media[n] for n in names[3:]})
    printed = io.StringIO()
    summary = run(cfg, out=printed)
    assert (summary.done, summary.skipped) == (3, 3), printed.getvalue()
    assert "1 of 1 input unit(s) finished (1 read again for what was added since)" in printed.getvalue()
    df = _pairs(tmp_path / "out2")
    assert len(df) == 6 and not df.duplicated(["id", "task"]).any()
    # listed again with nothing new: decided in the driver, no dataset and so no model actor (it took 50-70 s)
    monkeypatch.setattr(run_module, "build_dataset", _no_dataset)
    printed = io.StringIO()
    summary = run(cfg, out=printed)
    assert (summary.done, summary.skipped) == (0, 6) and "nothing to do: 6 (item, task) rows done" in printed.getvalue()


def _no_dataset(*args, **kwargs):
    raise AssertionError("a rerun with nothing new built a Ray dataset")


def test_partitions_not_listed_again_in_time_are_listed_by_their_read_tasks_and_run_exactly_the_new(
        tmp_path, monkeypatch):
    """The driver's relisting has RELIST_BUDGET_S (a listing costs ~70 us of driver CPU per S3 object): past it, a
    finished partition is opened and its read task lists it again beside the work."""
    corpus, out, driver = _a_finished_listing_of_two_folders(tmp_path, monkeypatch)
    write_local(corpus, {"a/0a.png": b"x", "b/9.png": b"x"})
    monkeypatch.setattr(changes, "RELIST_BUDGET_S", 0.0)
    driver.spec = replace(driver.spec, started_at=300.0, relist_before=200.0)   # a run ended at 200
    assert sorted(driver.run()) == [str(corpus / "a/0a.png"), str(corpus / "b/9.png")]
    assert driver.notes == ["note: 2 finished listing partition(s) of the input are listed again for new objects by "
                            "their read tasks, beside the work (before the work starts, only until something new is "
                            "found, for 0s at most)"]
    assert driver.run() == [] and driver.notes == []   # listed to the end by the read tasks at 300
    df = _pairs(out)
    assert len(df) == 8 and not df.duplicated(["id", "task"]).any()


def test_a_relisting_stopped_by_its_deadline_is_gone_on_with_after_its_last_new_part(tmp_path, monkeypatch):
    monkeypatch.setattr(listing, "DEADLINE_EVERY", 1)
    corpus, snapshot, part = _listed_evens(tmp_path, monkeypatch)
    write_local(corpus, {f"{i}.png": b"x" for i in range(1, 10, 2)})
    ticks = iter(range(100))
    monkeypatch.setattr(listing, "_clock", lambda: next(ticks))
    # keys 0 1 2 3 4 walked (one look at the clock each) by time 4: the new 1, 3 are part 3, then time is up
    assert listing.relist(str(corpus), OPTS, snapshot, 0, part, 2.0, 3.0, deadline=5) is None
    assert snapshot.status(0) == ([0, 1, 2, 3], {"parts": 3, "runs": [[0, 3]], "listed_at": 1.0})
    resumed = list(listing.partition_parts(str(corpus), OPTS, snapshot, 0, part, lambda n: n < 4, 2.0, 6.0))
    assert resumed[4:] == [(4, ["5.png", "7.png"]), (5, ["9.png"])]
    assert snapshot.status(0)[1] == {"parts": 6, "runs": [[0, 3], [3, 6]], "listed_at": 6.0}
    assert list(snapshot.keys(0, snapshot.status(0)[1]["runs"])) == sorted(f"{i}.png" for i in range(10))


def test_the_driver_lists_partitions_again_a_few_at_a_time_in_input_order_until_something_new_is_found(
        tmp_path, monkeypatch):
    """Listing again is CPU work under the GIL: 16 partitions at once each got 1/16th of RELIST_BUDGET_S and all were
    cut short, their work lost. RELIST_THREADS at a time, in order, finish theirs; files are checked beside them.
    Once one finds something new the work starts: the partitions not begun are left to their read tasks."""
    import threading
    import time

    running, most, started = [0], [0], []
    lock = threading.Lock()

    def listing_change(unit, snapshot, spec, shards, deadline):
        with lock:
            started.append(unit.partition)
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.0 if unit.partition == 2 else 0.3)   # 2 finds something new while 0, 1 and 3 are listed
        with lock:
            running[0] -= 1
        return changes.Change(read=unit.partition == 2, new=unit.partition == 2)

    monkeypatch.setattr(changes, "_listing_change", listing_change)
    tails = []
    monkeypatch.setattr(listing, "tail", lambda uri, opts, snapshot, index, *a: tails.append(index) or ([0], False))
    monkeypatch.setattr(changes, "finished_unit", lambda unit, extent, spec: changes.Change(read=False))
    partitions = [readers.Unit("listing", "/corpus", i, f"d{i:02d}/", True) for i in range(12)]
    manifests = [readers.Unit("manifest", f"/m{i}.csv") for i in range(3)]
    shards = {u.id: {"0"} for u in partitions}   # the one part each tail says of is done: nothing new after
    found = changes.finished_units(partitions + manifests, {}, _spec(tmp_path, relist_before=200.0), shards)
    assert sorted(tails) == list(range(12))
    assert most[0] == changes.RELIST_THREADS and sorted(started) == [0, 1, 2, 3]
    assert [(found[u.id].read, found[u.id].relisted, found[u.id].new) for u in partitions] == \
        [(False, True, False)] * 2 + [(True, True, True), (False, True, False)] + [(True, False, False)] * 8
    assert set(found) == {u.id for u in partitions + manifests}


def test_keys_after_a_snapshots_last_are_looked_for_first_and_the_partition_stays_due_in_full(tmp_path, monkeypatch):
    """listing.tail: what an appended corpus gained, found from the snapshot's last key on (StartAfter on S3); the
    keys added among the old ones wait for the full listing again, and a tail cut by a kill is a run all the same."""
    corpus, snapshot, part = _listed_evens(tmp_path, monkeypatch)
    assert listing.tail(str(corpus), OPTS, snapshot, 0, part, 1.0, 2.0) is None   # listed since: not due
    write_local(corpus, {name: b"x" for name in ("1.png", "9.png", "9a.png", "readme.txt")})
    walked = _walks(monkeypatch)
    assert listing.tail(str(corpus), OPTS, snapshot, 0, part, 2.0, 3.0) == ([0, 1, 2, 3], False)
    assert walked == ["8.png"] and snapshot.read_part(0, 3) == ["9.png", "9a.png"]
    assert snapshot.status(0)[1] == {"parts": 4, "runs": [[0, 3], [3, 4]], "listed_at": 1.0}   # still due
    assert listing.tail(str(corpus), OPTS, snapshot, 0, part, 2.0, 3.0) == ([0, 1, 2, 3], False)   # nothing after

    write_local(corpus, {name: b"x" for name in ("9b.png", "9c.png", "9d.png")})
    real_write = snapshot.write_part

    def killed_after_its_first_part(index, number, paths):
        if number == 5:
            raise KeyboardInterrupt
        real_write(index, number, paths)

    monkeypatch.setattr(snapshot, "write_part", killed_after_its_first_part)
    with pytest.raises(KeyboardInterrupt):
        listing.tail(str(corpus), OPTS, snapshot, 0, part, 2.0, 3.0)
    monkeypatch.setattr(snapshot, "write_part", real_write)
    numbers, complete = snapshot.status(0)
    assert numbers == [0, 1, 2, 3, 4] and complete["tail_from"] == 4 and complete["runs"] == [[0, 3], [3, 4]]
    assert listing.ListingSnapshot.runs(numbers, complete) == [[0, 3], [3, 4], [4, 5]]
    relisted = list(listing.partition_parts(str(corpus), OPTS, snapshot, 0, part, lambda n: n < 5, 2.0, 3.0))
    assert relisted[5:] == [(5, ["1.png", "9d.png"])] and walked[-1] == ""   # listed again from its start
    assert snapshot.status(0)[1] == {"parts": 6, "runs": [[0, 3], [3, 4], [4, 5], [5, 6]], "listed_at": 3.0}
    everything = sorted(n for n in os.listdir(corpus) if n.endswith(".png"))
    assert list(snapshot.keys(0, snapshot.status(0)[1]["runs"])) == everything


def test_new_objects_after_a_partitions_last_key_start_the_work_with_no_listing_in_full_first(tmp_path, monkeypatch):
    """At 1e7 listed objects the listings in full took the driver's whole budget before the first new row: objects
    appended after a partition's last key are found by their tails alone, and their partition is read first."""
    corpus, out, driver = _a_finished_listing_of_two_folders(tmp_path, monkeypatch)
    write_local(corpus, {"a/0a.png": b"x", "b/9.png": b"x"})
    driver.spec = replace(driver.spec, started_at=300.0, relist_before=200.0)
    walked = _walks(monkeypatch, lambda part, after: (part.prefix, after))
    units = readers.find_units(driver.spec)
    resume = progress.Ledger(StateDir(str(out), OPTS), "fp").load(
        output.listed_files(*storage.filesystem(str(out), OPTS), OPTS))
    found = changes.finished_units(units, resume.extents, driver.spec,
                                   {u.id: {str(n) for n in range(2)} for u in units})
    assert sorted(walked) == [("a/", "a/2.png"), ("b/", "b/2.png")]
    assert [(found[u.id].read, found[u.id].relisted, found[u.id].new) for u in units] == \
        [(True, False, False), (True, False, True)]
    walked.clear()
    assert driver.run() == [str(corpus / "b/9.png"), str(corpus / "a/0a.png")]   # the partition with news first
    # the tails again (b's now from its new key), then each listed again in full by its read task
    assert sorted(walked[:2]) == [("a/", "a/2.png"), ("b/", "b/9.png")] and walked[2:] == [("b/", ""), ("a/", "")]
    assert driver.run() == []
    df = _pairs(out)
    assert len(df) == 8 and not df.duplicated(["id", "task"]).any()


def test_a_tail_on_s3_asks_for_the_keys_after_the_snapshots_last_only(s3, tmp_path):
    from tests.pipeline_helpers import s3fs_for

    s3fs_for(s3).mkdir("tails")
    for i in range(0, 20, 2):
        s3fs_for(s3).pipe(f"tails/corpus/{i:02d}.png", b"x")
    opts = StorageOptions(endpoint_url=s3, retries=1)
    uri = "s3://tails/corpus/"
    snapshot = listing.ListingSnapshot(StateDir(str(tmp_path / "out"), OPTS), uri)
    part = snapshot.partitions(opts)[0]
    assert listing.relist(uri, opts, snapshot, 0, part, 0.0, 1.0) == [0]
    s3fs_for(s3).pipe("tails/corpus/05.png", b"x")
    s3fs_for(s3).pipe("tails/corpus/30.png", b"x")
    fs, _ = storage.filesystem(uri, opts)
    calls = []
    real = fs.call_s3
    fs.call_s3 = lambda *a, **k: calls.append(k) or real(*a, **k)
    try:
        assert listing.tail(uri, opts, snapshot, 0, part, 2.0, 3.0) == ([0, 1], False)
    finally:
        del fs.call_s3
    assert [c.get("StartAfter") for c in calls] == ["corpus/18.png"] and snapshot.read_part(0, 1) == ["30.png"]


def test_a_local_partition_whose_folders_are_unchanged_is_not_walked_again(tmp_path, monkeypatch):
    """A listing to its end stamps each folder (inode, change time): while they hold, listing the partition again
    costs a stat per folder (1e7 objects in 16 folders: 16 stat calls, not ~40 s of walking and comparing). Any entry
    added changes its folder's change time, even where its modification time is set back (rsync -a, cp -a, tar)."""
    monkeypatch.setattr(listing, "SETTLE_S", 0.0)
    corpus = tmp_path / "corpus"
    write_local(corpus, {"0.png": b"x", "2.png": b"x", "sub/1.png": b"x"})
    snapshot = listing.ListingSnapshot(StateDir(str(tmp_path / "out"), OPTS), str(corpus))
    part = listing.Partition("", True)
    assert listing.relist(str(corpus), OPTS, snapshot, 0, part, 0.0, 1.0) == [0]
    assert sorted(snapshot.stamps(0)) == ["", "sub/"]
    walked = _walks(monkeypatch)
    assert listing.relist(str(corpus), OPTS, snapshot, 0, part, 2.0, 3.0) == [0] and walked == []
    assert snapshot.status(0)[1]["listed_at"] == 3.0
    assert listing.tail(str(corpus), OPTS, snapshot, 0, part, 4.0, 5.0) == ([0], True) and walked == []
    assert snapshot.status(0)[1]["listed_at"] == 5.0

    write_local(corpus, {"sub/5.png": b"x"})   # a folder deep down changed: walked in full, and stamped again
    assert listing.relist(str(corpus), OPTS, snapshot, 0, part, 6.0, 7.0) == [0, 1] and walked == [""]
    assert snapshot.read_part(0, 1) == ["sub/5.png"]
    before = os.stat(corpus)
    write_local(corpus, {"7.png": b"x"})
    os.utime(corpus, ns=(before.st_atime_ns, before.st_mtime_ns))   # as rsync -a leaves it
    assert os.stat(corpus).st_mtime_ns == before.st_mtime_ns
    assert listing.relist(str(corpus), OPTS, snapshot, 0, part, 8.0, 9.0) == [0, 1, 2]
    assert snapshot.read_part(0, 2) == ["7.png"] and walked == ["", ""]
    assert listing.relist(str(corpus), OPTS, snapshot, 0, part, 10.0, 11.0) == [0, 1, 2] and walked == ["", ""]

    monkeypatch.setattr(listing, "SETTLE_S", 3600.0)   # folders changed within it are not trusted: no stamps
    fresh = listing.ListingSnapshot(StateDir(str(tmp_path / "out2"), OPTS), str(corpus))
    assert listing.relist(str(corpus), OPTS, fresh, 0, part, 0.0, 1.0) == [0]
    assert fresh.stamps(0) is None
    assert listing.relist(str(corpus), OPTS, fresh, 0, part, 2.0, 3.0) == [0] and walked[-1] == ""
