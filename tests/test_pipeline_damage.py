"""A finished output damaged between runs (a result file cut in half, one with garbage appended, one deleted,
someone else's file dropped in) or compacted by its user, then the same run again: damage is named, its pairs are
redone exactly once, nothing else is touched; a merge of the parts is adopted (runs here check with
`output.verify = "always"`: a start after a clean close takes the manifest's word). The manifest's start-up logic
(pipeline.manifest) without Ray at the end."""

import io
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import config, manifest, output, preflight, progress, readers
from pipeline.errors import OutputChanged
from pipeline.items import key_hash
from pipeline.run import run
from pipeline.state import TABLE, StateDir
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import config_text, good_media, s3fs_for, write_local

TASKS = ("caption", "ocr")
N_IMAGES = 12
OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)


def _run(tmp_path, corpus, out, tiny, endpoint="", extra="", verify="always"):
    """`verify`: "always" by default here, since damage done by hand between runs is what a start after a clean
    close takes the manifest's word for (pipeline.seal)."""
    path = tmp_path / "run.toml"
    text = config_text(str(corpus), out, str(tiny), tasks=TASKS, endpoint=endpoint, extra=extra)
    # several files to damage, left small
    path.write_text(text.replace("rows_per_file = 8", f"rows_per_file = 4\ncompact = false\nverify = {verify!r}"))
    cfg = config.load(path)
    units = preflight.check(cfg)
    if units is None:   # a listed prefix: its units are found by the run
        return run(cfg, out=io.StringIO())
    with mock.patch.object(readers, "find_units", side_effect=AssertionError("the input was listed twice")):
        return run(cfg, out=io.StringIO(), units=units)


def _finished(tmp_path, tiny, out, endpoint=""):
    corpus = tmp_path / "corpus"
    write_local(corpus, good_media(num_images=N_IMAGES, num_videos=0))
    first = _run(tmp_path, corpus, out, tiny, endpoint)
    assert first.done == N_IMAGES * len(TASKS)
    return corpus


def _exactly_once(table: pa.Table) -> None:
    pairs = list(zip(table["id"].to_pylist(), table["task"].to_pylist()))
    assert len(pairs) == N_IMAGES * len(TASKS) and len(set(pairs)) == len(pairs)


def test_damaged_files_are_named_and_only_their_pairs_redone_once(local_ray, tiny_gqa, tmp_path, caplog):
    out = tmp_path / "out"
    corpus = _finished(tmp_path, tiny_gqa, str(out))
    files = sorted(out.glob("part-*.parquet"))
    assert len(files) >= 4
    halved, appended, deleted, *kept = files
    lost_rows = sum(pq.ParquetFile(f).metadata.num_rows for f in (halved, appended, deleted))
    halved.write_bytes(halved.read_bytes()[: halved.stat().st_size // 2])
    appended.write_bytes(appended.read_bytes() + b"garbage" * 10)
    deleted.unlink()
    pq.write_table(pa.table({"x": [1]}), out / "notes.parquet")
    untouched = {f.name: f.read_bytes() for f in kept} | {"notes.parquet": (out / "notes.parquet").read_bytes()}

    with caplog.at_level("WARNING"):
        again = _run(tmp_path, corpus, str(out), tiny_gqa)
    for name in (halved.name, appended.name, deleted.name, "notes.parquet"):
        assert name in caplog.text
    assert again.done == lost_rows and again.errors == 0          # exactly the damaged files' pairs
    assert {f.name: f.read_bytes() for f in kept} == {k: v for k, v in untouched.items() if k != "notes.parquet"}
    assert (out / "notes.parquet").read_bytes() == untouched["notes.parquet"]   # left where it is
    assert sorted(p.name for p in (out / "_state" / "quarantine").iterdir()) == sorted(
        f"{f.name}.quarantined" for f in (halved, appended))
    _exactly_once(pa.concat_tables(pq.read_table(f) for f in out.glob("part-*.parquet")))

    # nothing is damaged any more: the next start says nothing but the foreign file, and redoes nothing
    caplog.clear()
    with caplog.at_level("WARNING"):
        third = _run(tmp_path, corpus, str(out), tiny_gqa)
    assert third.done == 0 and "is damaged" not in caplog.text and "notes.parquet" in caplog.text


def test_a_rerun_after_a_clean_run_takes_the_manifests_word_and_verify_always_finds_hand_damage(
        local_ray, tiny_gqa, tmp_path, caplog):
    out = tmp_path / "out"
    corpus = _finished(tmp_path, tiny_gqa, str(out))   # its close sealed the output
    deleted = sorted(out.glob("part-*.parquet"))[0]
    lost_rows = pq.ParquetFile(deleted).metadata.num_rows
    deleted.unlink()
    with mock.patch.object(output, "listed_files", wraps=output.listed_files) as listed:
        assert _run(tmp_path, corpus, str(out), tiny_gqa, verify="auto").done == 0
        # neither the start nor the run's report listed: the file deleted by hand is not seen (README: Output state)
        assert listed.call_count == 0
        with caplog.at_level("WARNING"):
            again = _run(tmp_path, corpus, str(out), tiny_gqa, verify="always")
        assert listed.call_count == 1   # the start's; the report takes the manifest the run seals
    assert deleted.name in caplog.text and again.done == lost_rows
    _exactly_once(pa.concat_tables(pq.read_table(f) for f in out.glob("part-*.parquet")))


def test_a_merge_of_all_parts_by_the_user_is_adopted(local_ray, tiny_gqa, tmp_path, caplog):
    out = tmp_path / "out"
    corpus = _finished(tmp_path, tiny_gqa, str(out))
    parts = sorted(out.glob("part-*.parquet"))
    merged = pa.concat_tables(pq.read_table(p) for p in parts)
    pq.write_table(merged, out / "compacted-000.parquet")
    for p in parts:
        p.unlink()
    with caplog.at_level("WARNING"):
        again = _run(tmp_path, corpus, str(out), tiny_gqa)
    assert "compacted-000.parquet" in caplog.text and "adopted" in caplog.text
    assert again.done == 0 and again.skipped == N_IMAGES * len(TASKS)
    assert sorted(p.name for p in out.glob("*.parquet")) == ["compacted-000.parquet"]
    _exactly_once(pq.read_table(out / "compacted-000.parquet"))
    # adopted for good: the next start has nothing to say about it
    caplog.clear()
    with caplog.at_level("WARNING"):
        assert _run(tmp_path, corpus, str(out), tiny_gqa).done == 0
    assert "compacted-000.parquet" not in caplog.text


def test_retry_errors_reruns_only_the_error_pairs_without_scanning_the_output(local_ray, tiny_gqa, tmp_path):
    out = tmp_path / "out"
    corpus = tmp_path / "corpus"
    write_local(corpus, {**good_media(num_images=N_IMAGES - 1, num_videos=0),
                         "bad/corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 2})
    first = _run(tmp_path, corpus, str(out), tiny_gqa)
    assert first.done == N_IMAGES * len(TASKS) and first.errors == len(TASKS)
    opened = []
    real = progress.read_keys
    with mock.patch.object(progress, "read_keys", lambda s, names, lost=None: opened.extend(names) or
                           real(s, names, lost)):
        again = _run_retry(tmp_path, corpus, str(out), tiny_gqa)
    # the two error pairs ran again (and failed again: the file is still corrupt); the good pairs were skipped
    # from the trusted records, reading only the files that held rows of the corrupt item's shards
    assert again.done == len(TASKS) and again.errors == len(TASKS) and again.skipped == (N_IMAGES - 1) * len(TASKS)
    assert 0 < len(set(opened)) < len(list(out.glob("part-*.parquet"))) + 1
    _exactly_once(pa.concat_tables(pq.read_table(f) for f in out.glob("part-*.parquet")))


def _run_retry(tmp_path, corpus, out, tiny):
    path = tmp_path / "run.toml"
    text = config_text(str(corpus), out, str(tiny), tasks=TASKS)
    path.write_text(text.replace("rows_per_file = 8", "rows_per_file = 4\ncompact = false").replace(
        "max_new_tokens = 6", "max_new_tokens = 6\nretry_errors = true"))
    return run(config.load(path), out=io.StringIO())


def test_damage_on_s3_is_redone_once(local_ray, tiny_gqa, tmp_path, s3, caplog):
    fs = s3fs_for(s3)
    fs.mkdir("damage")
    out = "s3://damage/out"
    corpus = _finished(tmp_path, tiny_gqa, out, endpoint=s3)
    files = sorted(p for p in fs.ls("damage/out") if p.endswith(".parquet"))
    lost_rows = 0
    for path in files[:2]:
        with fs.open(path, "rb") as f:
            lost_rows += pq.ParquetFile(f).metadata.num_rows
    fs.pipe(files[0], fs.cat_file(files[0])[:100])                # cut short
    fs.rm(files[1])
    with caplog.at_level("WARNING"):
        again = _run(tmp_path, corpus, out, tiny_gqa, endpoint=s3)
    assert files[0].rsplit("/", 1)[1] in caplog.text and files[1].rsplit("/", 1)[1] in caplog.text
    assert again.done == lost_rows
    tables = []
    for path in (p for p in fs.ls("damage/out") if p.endswith(".parquet")):
        with fs.open(path, "rb") as f:
            tables.append(pq.read_table(f))
    _exactly_once(pa.concat_tables(tables))


# --- the manifest without Ray ---------------------------------------------------------------------------------


def _rows(ids, shard, task="caption") -> pa.Table:
    out = [output.error_row({"id": i, "uri": f"/x/{i}.png"}, task, "p", "", "m", "h") for i in ids]
    table = pa.Table.from_pylist(out, schema=output.SCHEMA)
    return table.append_column("_shard", pa.array([shard] * len(ids), pa.string()))


def _write(out, shards: dict[str, list[str]], fold=True):
    """Rows of these shards written as a run would: sidecars, files, records; folded unless killed before."""
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    ledger.load(_listed(out))
    ledger.mark_trusted()
    open_shards = progress.OpenShards(ledger, ("caption",))
    writer = output.ResultWriter(str(out), OPTS, rows_per_file=2, flush_seconds=60, note_file=ledger.note_file,
                                 committed=ledger.committed, landed=open_shards.wrote)
    open_shards.listed({s: ({"caption": len(ids)}, len(ids)) for s, ids in shards.items()},
                       {"u": sorted(shards)})
    for shard, ids in shards.items():
        writer.add(_rows(ids, shard))
    writer.flush()
    if fold:
        ledger.fold()
    return ledger


def _listed(out):
    from pipeline import storage

    return output.listed_files(*storage.filesystem(str(out), OPTS), OPTS)


def _load(out, **kwargs):
    return progress.Ledger(StateDir(str(out), OPTS), "fp", **kwargs).load(_listed(out))


def test_a_file_landed_before_a_kill_is_kept_and_a_sidecar_without_its_file_costs_nothing(tmp_path, caplog):
    out = tmp_path / "out"
    _write(out, {"u#0": list("abc"), "u#1": list("de")}, fold=False)   # killed before its manifest rows
    assert manifest.read(StateDir(str(out), OPTS)) == {}
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    ledger.note_file("part-x-000009.parquet", {"size": 9, "rows": 1, "digest": 0, "shards": ["u#1"],
                                               "tasks": ["caption"]})   # a file that never landed
    with caplog.at_level("WARNING"):
        resume = _load(out)
    # every landed file is in the manifest from its sidecar; u#1, named by the file that never landed, is read
    # again, its pairs found in the files that hold them (files of 2 rows: ab, cd, e): no warning
    assert sorted(manifest.read(StateDir(str(out), OPTS))) == sorted(_listed(out)) and not caplog.text
    assert sorted(resume.done_keys) == sorted(key_hash(list("cde"), ["caption"] * 3))
    assert "u#0" in resume.records and "u#1" not in resume.records and "u" not in resume.records
    assert not list((out / "_state" / "inflight").iterdir())


def test_an_output_of_an_earlier_version_resumes_and_its_damage_means_one_scan(tmp_path, caplog):
    out = tmp_path / "out"
    _write(out, {"u#0": list("abcd")})
    (out / "_state" / f"{manifest.MANIFEST}{TABLE}").unlink()   # as the version before the manifest left it
    with mock.patch.object(progress, "read_keys", side_effect=AssertionError("a result file was opened")):
        resume = _load(out)
    assert not resume.scanned and resume.records["u"] == {"caption": 4}
    assert manifest.read(StateDir(str(out), OPTS))[sorted(_listed(out))[0]]["shards"] is None
    sorted(out.glob("part-*.parquet"))[0].unlink()               # a file whose shards nobody knows
    with caplog.at_level("WARNING"):
        resume = _load(out)
    assert resume.scanned and sorted(resume.done_keys) == sorted(key_hash(list("cd"), ["caption"] * 2))
    assert "earlier version" in caplog.text


def test_a_merge_with_other_rows_is_refused_or_moved_aside_when_asked(tmp_path, caplog):
    from jobs.caption import report

    out = tmp_path / "out"
    _write(out, {"u#0": list("abcd")})
    parts = sorted(out.glob("part-*.parquet"))
    merged = pa.concat_tables(pq.read_table(p) for p in parts)
    pq.write_table(merged.slice(1), out / "compacted-000.parquet")   # a row lost on the way
    for p in parts:
        p.unlink()
    with pytest.raises(OutputChanged, match="compacted-000.parquet hold.* 3 result rows .* move them out") as e:
        _load(out)
    assert report(e.value) == 6
    assert (out / "compacted-000.parquet").exists()
    resume = _load(out, move_foreign=True)                      # output.quarantine = true: set aside, redone
    assert "u#0" not in resume.records and len(resume.done_keys) == 0
    assert [p.name for p in (out / "_state" / "quarantine").iterdir()] == ["compacted-000.parquet.quarantined"]
