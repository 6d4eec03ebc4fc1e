"""A start after a clean close takes the result files from the manifest instead of listing them (pipeline.seal); a
start after a run that did not close cleanly, or whose state changed since, lists and finds damage as before;
`output.verify = "always"` lists every time. The store driven as a run drives it, without Ray."""

import logging
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import compact, config, output, progress, seal
from pipeline.state import StateDir
from pipeline.storage import StorageOptions
from pipeline.store import OutputSettings, OutputStore
from tests.pipeline_helpers import moto_s3, s3fs_for
from tests.test_pipeline_progress import rows

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)
TASKS = ("caption",)


def _start(uri: str, opts=OPTS, verify="auto"):
    """A store opened as a run opens it: (store, resume, listings of the result files it made)."""
    settings = OutputSettings(uri, rows_per_file=2, flush_seconds=600.0, takeover=False, quarantine=False,
                              compact=False, target_bytes=1 << 20, partition_by=(), verify=verify)
    store = OutputStore(settings, opts)
    with mock.patch.object(output, "listed_files", wraps=output.listed_files) as listing:
        resume = store.open("fp", TASKS, say=lambda line: None)
    return store, resume, listing.call_count


def _write(store: OutputStore, shard: str, ids: list[str]) -> None:
    """The rows of one shard, in files of 2 rows, and the read task's report of the shard (its record follows)."""
    store.write(rows(ids, shard=shard))
    store.flush()
    store.shards_read({shard: ({"caption": len(ids)}, len(ids))}, {})


def _run(uri: str, shard: str, ids: list[str], opts=OPTS, verify="auto", commit=True):
    """A run that writes one shard; `commit` False: it stops before its commit (its close then seals nothing)."""
    store, resume, listings = _start(uri, opts, verify)
    try:
        _write(store, shard, ids)
        if commit:
            store.commit(complete=True)
    finally:
        store.close()
    return resume, listings


def _parts(out) -> list:
    return sorted(out.glob("part-*.parquet"))


def test_a_start_after_a_clean_close_lists_nothing_and_resumes_the_same(tmp_path):
    out = str(tmp_path / "out")
    first, listings = _run(out, "u#0", list("abcd"))
    assert listings == 1 and (tmp_path / "out" / "_state" / seal.SEAL).is_file()
    store, resume, listings = _start(out)
    assert listings == 0 and store.sealed_start
    assert not (tmp_path / "out" / "_state" / seal.SEAL).exists()   # taken before anything is written
    assert resume.records == {"u#0": {"caption": 4}} and not resume.scanned
    store.close()   # no commit: no seal
    assert _start(out)[2] == 1


def test_a_run_stopped_before_its_commit_makes_the_next_start_list_and_find_damage(tmp_path, caplog):
    out = tmp_path / "out"
    _run(str(out), "u#0", list("abcd"))                   # sealed
    deleted, resized = _parts(out)
    _run(str(out), "v#0", list("ef"), commit=False)       # took the seal, wrote a file, never committed
    deleted.unlink()
    resized.write_bytes(resized.read_bytes() + b"garbage")
    with caplog.at_level(logging.WARNING):
        store, resume, listings = _start(str(out))
    store.close()
    assert listings == 1 and not store.sealed_start
    assert deleted.name in caplog.text and resized.name in caplog.text
    assert "u#0" not in resume.records                    # both of its files are damaged: its pairs are redone
    assert [p.name for p in (out / "_state" / "quarantine").iterdir()] == [f"{resized.name}.quarantined"]


def test_verify_always_lists_and_finds_a_file_deleted_by_hand(tmp_path, caplog):
    out = tmp_path / "out"
    _run(str(out), "u#0", list("abcd"))
    _parts(out)[0].unlink()
    with caplog.at_level(logging.WARNING):
        store, resume, listings = _start(str(out), verify="always")
    store.close()
    assert listings == 1 and "it is gone" in caplog.text and "u#0" not in resume.records
    assert not (out / "_state" / seal.SEAL).exists()   # gone all the same: this start could have written


def _rewrite_manifest(state: StateDir) -> None:
    from pipeline import manifest
    manifest.write(state, manifest.read(state))   # as another writer (an earlier version, say) would


def _leave_sidecar(state: StateDir) -> None:
    progress.Ledger(state, "fp").note_file("part-20260101-000000-0badcafe-000000.parquet",
                                           output.manifest_row(rows(["z"]).drop_columns(["_shard"]), 9, ["w#0"]))


def _leave_plan(state: StateDir) -> None:
    state.write_json(f"{compact.PLANS}/t.json", {"tag": "20260101-000000-0badcafe", "sources": []})


@pytest.mark.parametrize("change", [_rewrite_manifest, _leave_sidecar, _leave_plan])
def test_a_seal_that_no_longer_holds_is_not_trusted(tmp_path, change):
    out = str(tmp_path / "out")
    _run(out, "u#0", list("abcd"))
    change(StateDir(out, OPTS))
    store, _, listings = _start(out)
    store.close()
    assert listings == 1 and not store.sealed_start


def test_a_foreign_file_left_under_the_prefix_is_named_at_every_start(tmp_path, caplog):
    out = tmp_path / "out"
    _run(str(out), "u#0", list("ab"))
    pq.write_table(pa.table({"x": [1]}), out / "notes.parquet")
    for verify in ("always", "auto"):   # a run that left it there seals nothing: the next start lists again
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _, listings = _run(str(out), "v#0", [f"{verify}-1"], verify=verify)
        assert listings == 1 and "notes.parquet" in caplog.text
    assert not (out / "_state" / seal.SEAL).exists()


def test_verify_takes_only_auto_or_always():
    with pytest.raises(config.ConfigError, match="output.verify: 'sometimes' is not one of auto, always"):
        config.from_dict({"input": {"uri": "in/"}, "output": {"uri": "out/", "verify": "sometimes"},
                          "model": {"path": "m"}, "run": {"tasks": ["caption"]}})


def test_on_s3_a_sealed_start_lists_nothing_and_an_unsealed_one_finds_a_deleted_file(caplog):
    with moto_s3() as endpoint:
        fs = s3fs_for(endpoint)
        fs.mkdir("seal-results")
        opts, out = StorageOptions(endpoint_url=endpoint, retries=2, retry_backoff_s=0.0), "s3://seal-results/run"
        _run(out, "u#0", list("abcd"), opts)
        first = sorted(p for p in fs.ls("seal-results/run") if p.endswith(".parquet"))[0]
        _, listings = _run(out, "v#0", list("ef"), opts, commit=False)
        assert listings == 0
        fs.rm(first)
        with caplog.at_level(logging.WARNING):
            store, resume, listings = _start(out, opts)
        store.close()
        assert listings == 1 and first.rsplit("/", 1)[-1] in caplog.text and "u#0" not in resume.records


def test_records_no_longer_trusted_mean_a_listing_for_the_scan(tmp_path):
    out = tmp_path / "out"
    _run(str(out), "u#0", list("ab"))
    (out / "_state" / progress.MARKER).unlink()   # as after run.retry_errors, or for another input: scanned whole
    store, resume, listings = _start(str(out))
    store.close()
    assert listings == 1 and resume.scanned
