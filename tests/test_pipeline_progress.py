"""Whole result files, completion records and sidecars: what a restart reads is the work that was in flight,
never the finished corpus. No Ray here."""

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import output, progress
from pipeline.config import ConfigError
from pipeline.items import key_hash
from pipeline.state import StateDir
from pipeline.storage import StorageOptions
from tests.faults import FaultProxy
from tests.pipeline_helpers import moto_s3, read_output, s3fs_for, unchecked_strings

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)


def rows(ids, task="caption", shard="u#0", error=None) -> pa.Table:
    out = [{**output.error_row({"id": i, "uri": f"/x/{i}.png", "media_type": "image"}, task, "p", "", "m", "h"),
            "error": error} for i in ids]
    table = pa.Table.from_pylist(out, schema=output.SCHEMA)
    return table.append_column("_shard", pa.array([shard] * len(ids), pa.string()))


def writer_with_ledger(out, rows_per_file=3):
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    shards = progress.OpenShards(ledger, ("caption",))
    writer = output.ResultWriter(str(out), OPTS, rows_per_file=rows_per_file, flush_seconds=60,
                                 note_file=ledger.note_file, landed=shards.wrote, committed=ledger.committed)
    return writer, ledger, shards


def test_writer_files_are_whole_with_a_sidecar_written_first(tmp_path):
    out = tmp_path / "out"
    order = []
    writer, ledger, _ = writer_with_ledger(out)
    real_note = writer.note_file
    writer.note_file = lambda *a: order.append(("sidecar", len(list(out.glob("*.parquet"))))) or real_note(*a)
    writer.add(rows(["a", "b"]))
    assert not list(out.glob("*.parquet"))          # buffered: nothing half-written appears
    writer.add(rows(["c", "d"], shard="u#1"))
    writer.flush()
    writer.write_run_record({"ok": True})
    files = sorted(out.glob("*.parquet"))
    assert len(files) == 2 and writer.rows == 4 and order == [("sidecar", 0), ("sidecar", 1)]
    sidecars = sorted(ledger.sidecars.values(), key=lambda s: s["file"])
    assert [s["shards"] for s in sidecars] == [["u#0", "u#1"], ["u#1"]] and sidecars[0]["tasks"] == ["caption"]
    table = read_output(str(out))
    assert table.schema.equals(output.SCHEMA, check_metadata=False)   # _shard is never written
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert len(pd.read_parquet(out)) == 4 and list((out / "_state" / "runs").glob("*.json"))
    assert not list((out / "_state" / "staging").glob("*"))   # staged files were renamed into place



def test_the_writer_refuses_text_that_is_not_utf8_rather_than_spoil_the_output(tmp_path):
    """pyarrow writes such strings as they are, and then no reader can open the file."""
    schema = output.output_schema(False, pa.schema([("title", pa.string())]))
    writer = output.ResultWriter(str(tmp_path / "out"), OPTS, rows_per_file=2, flush_seconds=60, schema=schema)
    with pytest.raises(pa.ArrowInvalid, match="UTF8"):
        writer.add(rows(["a", "b"]).append_column("input:title", unchecked_strings([b"ok", b"caf\xe9"])))
    assert not list((tmp_path / "out").glob("*.parquet"))


def test_a_shard_is_recorded_once_all_its_rows_landed_and_a_restart_reads_only_open_shards(tmp_path):
    out = tmp_path / "out"
    writer, ledger, shards = writer_with_ledger(out, rows_per_file=2)
    ledger.mark_trusted()
    shards.listed({"u#0": ({"caption": 3}, 3), "u#1": ({"caption": 2}, 2)}, {"u": ["u#0", "u#1"]})
    writer.add(rows(["a", "b", "c"]))               # one file of 2 rows lands; u#0 still waits for "c"
    assert "u#0" not in ledger.records
    writer.add(rows(["d"], shard="u#1"))            # "c" + "d" land: u#0 is finished, u#1 is not
    assert ledger.records["u#0"] == {"caption": 3} and "u#1" not in ledger.records
    assert (out / "_state" / "done").exists()
    # killed here: a restart trusts the records and reads only the file that holds rows of the open shard
    resume = progress.Ledger(StateDir(str(out), OPTS), "fp").load(_listed(out))
    assert not resume.scanned and resume.records == {"u#0": {"caption": 3}}
    assert sorted(resume.done_keys) == sorted(key_hash(["c", "d"], ["caption"] * 2))
    # the run goes on: u#1 finishes, then the unit; the fold drops the sidecars nobody needs any more
    writer.add(rows(["e"], shard="u#1"))
    writer.flush()
    assert ledger.records["u#1"] == {"caption": 2} and ledger.records["u"] == {"caption": 5}
    ledger.fold()
    assert not list((out / "_state" / "inflight").glob("*")) and not (out / "_state" / "done").exists()
    resume = progress.Ledger(StateDir(str(out), OPTS), "fp").load(_listed(out))
    assert resume.records["u"] == {"caption": 5} and len(resume.done_keys) == 0
    # another input on the same output: the records do not count, the output is scanned once
    scan = progress.Ledger(StateDir(str(out), OPTS), "other").load(_listed(out))
    assert scan.scanned and not scan.records and len(scan.done_keys) == 5


def _fs(out):
    from pipeline import storage

    return storage.filesystem(str(out), OPTS)


def _listed(out):
    return output.listed_files(*_fs(out), OPTS)


def test_a_sidecar_whose_file_never_landed_is_harmless(tmp_path):
    out = tmp_path / "out"
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    ledger.mark_trusted()
    ledger.note_file("part-x-000000.parquet", {"size": 10, "rows": 1, "digest": 0, "shards": ["u#0"],
                                               "tasks": ["caption"]})   # killed before the file was written
    resume = progress.Ledger(StateDir(str(out), OPTS), "fp").load({})
    assert len(resume.done_keys) == 0


def test_retry_errors_reopens_only_error_rows_file_by_file(tmp_path):
    out = tmp_path / "out"
    writer = output.ResultWriter(str(out), OPTS, rows_per_file=2, flush_seconds=60)
    table = pa.concat_tables([rows(["a"]), rows(["b"], error="/x/b.png: model failed (OOM)"),
                              rows(["c"], error="/x/c.png: corrupt"), rows(["d"], error="x")])
    writer.add(table)
    writer.flush()
    state = StateDir(str(out), OPTS)
    assert len(progress.read_keys(state, output.result_files(*_fs(out), OPTS))) == 4   # error rows count as done
    assert output.reopen_errors(str(out), OPTS, writer.staging) == 3
    table = read_output(str(out))
    assert table["id"].to_pylist() == ["a"] and table["error"].null_count == 1
    assert len(sorted(out.glob("*.parquet"))) == 1           # the file of only error rows is gone
    assert list(progress.read_keys(state, output.result_files(*_fs(out), OPTS))) == list(key_hash(["a"], ["caption"]))
    assert output.reopen_errors(str(out), OPTS, writer.staging) == 0
    assert not list((out / "_state" / "staging").glob("*"))


def test_a_kill_while_retry_errors_reopens_loses_no_pair(tmp_path, monkeypatch):
    """Killed right after the files were rewritten: the next run must not trust records that call the error's shard
    finished (it did: reopen_errors ran before ledger.forget, and the error pair was never run again)."""
    from pipeline import store

    out = tmp_path / "out"
    writer, ledger, _ = writer_with_ledger(out)
    writer.add(pa.concat_tables([rows(["a"]), rows(["b"], error="/x/b.png: corrupt")]))
    writer.flush()
    ledger.record("u#0", {"caption": 2})
    ledger.mark_trusted()
    real = output.reopen_errors

    def killed(*args):
        real(*args)
        raise SystemExit(137)

    monkeypatch.setattr(output, "reopen_errors", killed)
    with pytest.raises(SystemExit):
        store.reopen_errors(str(out), OPTS, ledger, writer.staging)
    resume = progress.Ledger(StateDir(str(out), OPTS), "fp").load(_listed(out))
    assert resume.scanned and not resume.records                 # "u#0" is not taken as finished ...
    assert list(resume.done_keys) == list(key_hash(["a"], ["caption"]))   # ... and only "a" is done: "b" runs again


def _finished_with_errors(out):
    """Three shards, all recorded, in files of 2 rows: u#0 = a b | c (b an error), u#1 = d e | f g (none),
    u#2 = h i (both errors)."""
    writer, ledger, shards = writer_with_ledger(out, rows_per_file=2)
    ledger.load({})
    ledger.mark_trusted()
    shards.listed({"u#0": ({"caption": 3}, 3), "u#1": ({"caption": 4}, 4), "u#2": ({"caption": 2}, 2)},
                  {"u": ["u#0", "u#1", "u#2"]})
    writer.add(pa.concat_tables([rows(["a"]), rows(["b"], error="/x/b.png: OOM"), rows(["c"])]))
    writer.flush()
    writer.add(rows(["d", "e", "f", "g"], shard="u#1"))
    writer.add(rows(["h", "i"], shard="u#2", error="/x: storage outage"))
    writer.flush()
    ledger.fold()
    assert ledger.records["u"] == {"caption": 9}


def test_retry_errors_on_trusted_records_opens_only_the_shards_of_files_with_errors(tmp_path, monkeypatch):
    out = tmp_path / "out"
    _finished_with_errors(out)
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    ledger.load(_listed(out))
    opened = []
    real = progress.read_keys
    monkeypatch.setattr(progress, "read_keys", lambda s, names, lost=None: opened.extend(names) or real(s, names, lost))
    read, real_read = [], output.pq.read_table
    monkeypatch.setattr(output.pq, "read_table", lambda path, **kw: read.append(path) or real_read(path, **kw))
    assert ledger.retry_errors(str(out), OPTS, f"{out}/_state/staging") == 3
    # the manifest's summaries say which files hold errors: only those two are read, once each
    assert len(read) == len(set(read)) == 2, read
    resume = progress.Ledger(StateDir(str(out), OPTS), "fp").load(_listed(out))
    # trusted still: u#1 stays finished and its files are never opened; u#0 is open, its good rows count as done
    assert not resume.scanned and set(resume.records) == {"u#1"}
    assert sorted(resume.done_keys) == sorted(key_hash(["a", "c"], ["caption"] * 2))
    manifest_rows = progress.manifest.read(StateDir(str(out), OPTS))
    assert sorted(manifest_rows) == sorted(_listed(out)) and sum(r["rows"] for r in manifest_rows.values()) == 6
    assert len(set(opened)) == 2   # u#0's two files (one rewritten without b), never u#1's
    assert not list((out / "_state" / "inflight").iterdir())


@pytest.mark.parametrize("kill_at", ["rewrite", "delete", "manifest"])
def test_a_kill_in_retry_errors_on_trusted_records_loses_no_pair_and_warns_of_nothing(tmp_path, monkeypatch, caplog,
                                                                                     kill_at):
    """Killed after the first file with errors was rewritten (or deleted), or before the manifest took the new
    rows: the next start takes the new file from its sidecar, with no damage warning, and no pair is lost."""
    out = tmp_path / "out"
    _finished_with_errors(out)
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    ledger.load(_listed(out))
    if kill_at == "manifest":
        monkeypatch.setattr(progress.manifest, "write", lambda *a: (_ for _ in ()).throw(SystemExit(137)))
    else:
        real_write = output.storage.write_atomic
        if kill_at == "rewrite":
            def write_then_die(fs, path, *args):
                real_write(fs, path, *args)
                if "/_state/" not in path:   # a result file rewritten, not a state file
                    raise SystemExit(137)
            monkeypatch.setattr(output.storage, "write_atomic", write_then_die)
        else:
            fs = output.storage.filesystem(str(out), OPTS)[0]
            real_rm = type(fs).rm

            def rm_then_die(self, path, *args, **kwargs):
                real_rm(self, path, *args, **kwargs)
                raise SystemExit(137)
            monkeypatch.setattr(type(fs), "rm", rm_then_die)
    with pytest.raises(SystemExit):
        ledger.retry_errors(str(out), OPTS, f"{out}/_state/staging")
    monkeypatch.undo()
    assert list((out / "_state" / "inflight").iterdir()) or kill_at == "manifest"   # the new rows' sidecars
    with caplog.at_level("WARNING"):
        resume = progress.Ledger(StateDir(str(out), OPTS), "fp").load(_listed(out))
    assert "damaged" not in caplog.text and "OutputChanged" not in caplog.text
    done = set(resume.done_keys.tolist())
    remaining = read_output(str(out))
    # every pair is in a file exactly once or pending; whatever a file holds is done, nothing done is missing
    assert len(remaining) == len(set(remaining["id"].to_pylist()))
    held = set(key_hash(remaining["id"].to_pylist(), remaining["task"].to_pylist()).tolist())
    finished = {"u#1": {"d", "e", "f", "g"}}
    for shard, ids in finished.items():
        if shard in resume.records:
            assert set(key_hash(sorted(ids), ["caption"] * len(ids)).tolist()) <= held
    assert done <= held


def test_s3_writer_records_and_a_typo_bucket(tmp_path):
    with moto_s3() as endpoint:
        fs = s3fs_for(endpoint)
        fs.mkdir("results")
        opts = StorageOptions(endpoint_url=endpoint)
        ledger = progress.Ledger(StateDir("s3://results/run1", opts), "fp")
        writer = output.ResultWriter("s3://results/run1", opts, rows_per_file=2, flush_seconds=60,
                                     note_file=ledger.note_file)
        writer.add(rows(list("abcde")))
        writer.flush()
        assert len([p for p in fs.ls("results/run1") if p.endswith(".parquet")]) == 3   # 2 + 2 + 1 rows
        assert len(read_output("s3://results/run1", endpoint)) == 5
        ledger.mark_trusted()
        from pipeline import manifest, storage

        state = StateDir("s3://results/run1", opts)
        resume = progress.Ledger(state, "fp").load(output.listed_files(*storage.filesystem(state.output_uri, opts),
                                                                        opts))
        # the sidecars of the landed files are their manifest rows now
        assert len(resume.done_keys) == 5 and not fs.exists("results/run1/_state/inflight")
        assert sorted(r["rows"] for r in manifest.read(state).values()) == [1, 2, 2]
        with pytest.raises(ConfigError, match="bucket 'resluts' does not exist"):   # a typo makes no new bucket
            output.ResultWriter("s3://resluts/run1", opts, rows_per_file=2, flush_seconds=60)
        assert not fs.exists("resluts")


def test_a_state_folder_on_s3_is_removed_with_each_request_retried_on_its_own():
    """A failed delete is retried alone, not with the listing before it: under a 30% fault rate, retrying
    listing + HEAD + deletes as one call took 11 retries and half a minute of back-off to clear staging/."""
    with moto_s3() as endpoint:
        fs = s3fs_for(endpoint)
        fs.mkdir("state-results")
        for i in range(5):
            fs.pipe(f"state-results/run1/_state/records/{i:03d}.json", b"{}")
        with FaultProxy(endpoint) as proxy:
            state = StateDir("s3://state-results/run1", StorageOptions(endpoint_url=proxy.url, retries=3,
                                                                   retry_backoff_s=0.0))
            proxy.burst("write", 3, "internal")   # the delete fails three times, then goes through
            state.remove("records", recursive=True)
            assert proxy.requests["list"] == 1 and proxy.injected("write") == 3, dict(proxy.requests)
            state.remove("nothing-here", recursive=True)   # no files: no error, no delete
        assert not fs.find("state-results/run1/_state/records") and proxy.requests["write"] == 4
        # an output named with glob characters removes its own state files, never those of `exp1` beside it
        for out in ("exp[1]", "exp1"):
            fs.pipe({f"state-results/{out}/_state/records/a.json": b"{}", f"state-results/{out}/_state/m.json": b"{}"})
        state = StateDir("s3://state-results/exp[1]", StorageOptions(endpoint_url=endpoint))
        state.remove("records", recursive=True)
        state.remove("m.json")
        assert not fs.find("state-results/exp[1]/_state")
        assert len(fs.find("state-results/exp1/_state")) == 2


def test_unique_sorted_matches_numpy():
    import numpy as np

    keys = np.random.default_rng(0).integers(0, 1000, 10_000).astype(np.uint64)
    assert np.array_equal(progress.unique_sorted(keys.copy()), np.unique(keys))


def test_a_scan_sets_torn_files_aside_and_names_foreign_ones_where_they_are(tmp_path, caplog):
    out = tmp_path / "out"
    writer = output.ResultWriter(str(out), OPTS, rows_per_file=2, flush_seconds=60)
    writer.add(rows(["a", "b", "c", "d"]))
    good, torn = sorted(out.glob("*.parquet"))
    torn.write_bytes(torn.read_bytes()[:-40])                      # cut short, as a crash without fsync would
    pq.write_table(pa.table({"x": [1]}), out / "notes.parquet")     # someone else's file
    with caplog.at_level("WARNING"):
        resume = progress.Ledger(StateDir(str(out), OPTS), "fp").load(_listed(out))
    assert resume.scanned and sorted(resume.done_keys) == sorted(key_hash(["a", "b"], ["caption"] * 2))
    # the torn file no longer matches *.parquet anywhere; someone else's file stays where it is
    assert [p.name for p in (out / "_state" / "quarantine").iterdir()] == [torn.name + ".quarantined"]
    assert sorted(p.name for p in out.glob("*.parquet")) == sorted([good.name, "notes.parquet"])
    assert torn.name in caplog.text and "notes.parquet" in caplog.text
    assert len(pd.read_parquet(good)) == 2
