"""Compaction (pipeline.compact, jobs/compact.py): finished shards' small files merged into target-size files;
readers of the manifest's snapshot see every pair exactly once before, during and after, also across kill -9 at
every step of a merge and at random moments, locally and on S3; a resume after compaction opens no result file."""

import os
import random
import signal
import subprocess
import threading
import time
from unittest import mock

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import compact, filestats, manifest, progress, snapshot, storage
from pipeline.state import StateDir
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import PY, REPO, s3fs_for
from tests.test_pipeline_damage import OPTS, _listed, _load, _rows, _write

ROWS_PER_SHARD = 40


def _rows_with_text(ids, shard, task="caption"):
    """Result rows of a run's size (a caption of ~1 KB that zstd cannot shrink much), so that a file's bytes are
    mostly rows, as in a real output, not Parquet's footer."""
    table = _rows(ids, shard, task)
    text = [os.urandom(384).hex() for _ in ids]
    return table.set_column(table.schema.get_field_index("text"), "text", pa.array(text, pa.string()))


def _output(out, shards: int = 12, opts=OPTS) -> int:
    ids = [f"item{k:06d}" for k in range(shards * ROWS_PER_SHARD)]
    with mock.patch("tests.test_pipeline_damage._rows", _rows_with_text):
        _write(out, {f"u#{j}": ids[j * ROWS_PER_SHARD:(j + 1) * ROWS_PER_SHARD] for j in range(shards)})
    return len(ids)


def _exact(out, rows: int, opts=OPTS) -> None:
    """The snapshot holds every pair once, and the manifest names exactly the files there are."""
    table = snapshot.read_table(str(out), opts, columns=["id", "task"])
    pairs = list(zip(table["id"].to_pylist(), table["task"].to_pylist()))
    assert len(pairs) == rows and len(set(pairs)) == rows


def _settled(out, rows: int, opts=OPTS) -> None:
    """After a compaction that ran to its end: no plan left, listing == manifest, globs exact too."""
    state = StateDir(str(out), opts)
    assert state.list(compact.PLANS) == []
    listed = output_listing(out, opts)
    assert sorted(manifest.read(state)) == sorted(listed)
    _exact(out, rows, opts)


def output_listing(out, opts=OPTS):
    from pipeline import output

    return output.listed_files(*storage.filesystem(str(out), opts), opts)


def test_finished_files_are_merged_to_the_target_size_and_a_resume_opens_none(tmp_path):
    out = tmp_path / "out"
    rows = _output(out)
    before = _listed(out)
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    ledger.load(before)
    ledger._reopen({"u#11"})   # one shard still open: its files stay small (a resume reads their keys)
    ledger._save()
    open_files = {n for n, row in ledger.files.items() if "u#11" in row["shards"]}
    target = 8 * max(before.values())
    compactor = compact.Compactor(ledger, str(out), OPTS, target)
    compactor.finish()
    after = _listed(out)
    merged = {n: size for n, size in after.items() if n not in before}
    assert not (set(before) - open_files) & set(after) and compactor.failed == 0
    assert open_files <= set(after) and 1 < len(merged) <= compactor.written_files
    assert sorted(merged.values())[1] >= target * compact.BIG_ENOUGH   # all but the last group reach the target
    for name in merged:
        meta = pq.ParquetFile(out / name).metadata
        assert meta.num_row_groups == 1 and meta.row_group(0).column(0).compression == "ZSTD"
    _settled(out, rows)
    # a merged file's summary for the report is its sources' merged: the same counts as its own rows give
    rows_now = manifest.read(StateDir(str(out), OPTS))
    for name in merged:
        kept, own = filestats.loads(rows_now[name]["stats"]), filestats.summarize(pq.read_table(out / name))
        assert kept["rows"] == own["rows"] and kept["strata"] == own["strata"] and kept["out"] == own["out"]
    # the records are per shard: a resume trusts them and opens only the open shard's files
    opened = []
    real = progress.read_keys
    with mock.patch.object(progress, "read_keys", side_effect=lambda s, names, lost=None: opened.extend(names) or
                           real(s, names, lost)):
        resume = _load(out)
    assert sorted(opened) == sorted(open_files) and "u#0" in resume.records and "u#11" not in resume.records
    assert len(resume.done_keys) == ROWS_PER_SHARD


def test_a_merge_whose_rows_do_not_add_up_is_undone(tmp_path, caplog):
    out = tmp_path / "out"
    rows = _output(out, shards=3)
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    ledger.load(_listed(out))
    real = compact.merge

    def lossy(uri, opts, sources, tag):   # a bug or a bad disk: the merged file misses a row
        written = real(uri, opts, sources, tag)
        written[0]["rows"] -= 1
        return written

    before = _listed(out)
    with mock.patch.object(compact, "merge", lossy), caplog.at_level("WARNING"):
        compact.Compactor(ledger, str(out), OPTS, 1 << 30).finish()
    assert "compaction of" in caplog.text and "not the sources'" in caplog.text
    assert _listed(out) == before   # the merged file is gone, the sources untouched
    _settled(out, rows)


# --- kill -9 ----------------------------------------------------------------------------------------------------

KILLER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
from pipeline import compact, progress, state

def die(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGKILL)

point = sys.argv[1]
if point == "before-merge":            # the plan is written, no merged file yet
    compact.merge = die
elif point == "before-switch":         # the merged files are written, the manifest still names the sources
    progress.Ledger.replace = die
elif point == "before-delete":         # switched: the sources are still there
    compact._delete = die
elif point == "mid-delete":            # some sources deleted
    real = state.StateDir.remove_paths
    def half(self, paths):
        real(self, paths[: len(paths) // 2])
        die()
    state.StateDir.remove_paths = half
elif point == "before-plan-removed":   # everything done but the plan's removal
    real_remove = state.StateDir.remove
    def remove(self, rel, recursive=False):
        if rel.startswith(compact.PLANS + "/"):
            die()
        real_remove(self, rel, recursive)
    state.StateDir.remove = remove
from jobs.compact import main
sys.exit(main(sys.argv[2:]))
"""


def _compact_job(out, tmp_path, point="", target_mb=0.02, endpoint="", wait=True):
    killer = tmp_path / "killer.py"
    killer.write_text(KILLER.format(repo=str(REPO)))
    args = [PY, str(killer), point or "none", "--output", str(out), "--target-file-mb", str(target_mb)]
    if endpoint:
        args += ["--endpoint-url", endpoint]
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    text, _ = proc.communicate(timeout=120)
    return proc.returncode, text


POINTS = ["before-merge", "before-switch", "before-delete", "mid-delete", "before-plan-removed"]


def _kill_at_every_step(out, tmp_path, rows, opts, endpoint="", shards=6, points=POINTS):
    """Before each kill, a later run's small files: every kill lands in a merge. Returns the output's rows."""
    for point in points:
        rows += _more(out, rows, shards, opts)
        code, text = _compact_job(out, tmp_path, point, endpoint=endpoint)
        assert code == -signal.SIGKILL, f"{point}: {text}"
        _exact(out, rows, opts)               # the manifest's snapshot is exact even right after the kill
        code, text = _compact_job(out, tmp_path, endpoint=endpoint)   # the next compaction recovers, goes on
        assert code == 0 and "compacted:" in text, text
        _settled(out, rows, opts)
        resume = progress.Ledger(StateDir(str(out), opts), "fp").load(output_listing(out, opts))
        assert not resume.scanned and len(resume.done_keys) == 0 and f"v{rows - shards * ROWS_PER_SHARD}" in resume.records
    return rows


def test_kill_at_every_step_of_a_merge_loses_and_repeats_nothing(tmp_path):
    out = tmp_path / "out"
    _kill_at_every_step(out, tmp_path, _output(out, shards=4), OPTS)


def _more(out, start: int, shards: int = 6, opts=OPTS) -> int:
    """A later run's rows (another unit), in small files again."""
    ids = [f"item{k:06d}" for k in range(start, start + shards * ROWS_PER_SHARD)]
    ledger = progress.Ledger(StateDir(str(out), opts), "fp")
    ledger.load(output_listing(out, opts))
    open_shards = progress.OpenShards(ledger, ("caption",))
    from pipeline import output

    writer = output.ResultWriter(str(out), opts, rows_per_file=2, flush_seconds=60, note_file=ledger.note_file,
                                 committed=ledger.committed, landed=open_shards.wrote)
    names = [f"v{start}#{j}" for j in range(shards)]
    open_shards.listed({s: ({"caption": ROWS_PER_SHARD}, ROWS_PER_SHARD) for s in names}, {f"v{start}": names})
    for j, shard in enumerate(names):
        writer.add(_rows_with_text(ids[j * ROWS_PER_SHARD:(j + 1) * ROWS_PER_SHARD], shard))
    writer.flush()
    ledger.fold()
    return len(ids)


def test_readers_of_the_snapshot_see_every_pair_once_while_compaction_is_killed_at_random(tmp_path):
    out = tmp_path / "out"
    rows = _output(out, shards=30)
    reads, problems, stop = [0], [], threading.Event()

    def reader():
        while not stop.is_set():
            table = snapshot.read_table(str(out), OPTS, columns=["id", "task"])
            pairs = set(zip(table["id"].to_pylist(), table["task"].to_pylist()))
            if table.num_rows != rows or len(pairs) != rows:
                problems.append((table.num_rows, len(pairs)))
            reads[0] += 1

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    rng = random.Random(7)
    try:
        for _ in range(2):
            proc = _compact_job(out, tmp_path, target_mb=0.05, wait=False)
            time.sleep(rng.uniform(0.8, 2.5))   # start-up is ~0.7 s: the kill lands among the merges
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        code, text = _compact_job(out, tmp_path, target_mb=0.05)
        assert code == 0, text
    finally:
        stop.set()
        thread.join()
    assert not problems and reads[0] >= 5
    _settled(out, rows)
    assert len(_listed(out)) < 30 * ROWS_PER_SHARD // 2 / 4   # merged: far fewer than the small files


def test_compaction_on_s3_survives_kills_between_its_writes(tmp_path, s3):
    fs = s3fs_for(s3)
    fs.mkdir("compact")
    out = "s3://compact/out"
    opts = StorageOptions(endpoint_url=s3, retries=2, retry_backoff_s=0.0)
    with mock.patch("tests.test_pipeline_damage.OPTS", opts):
        rows = _output(out, shards=1, opts=opts)
    # the steps whose state differs on a store (a merged object there and the manifest not yet switched, or
    # switched with sources left): the others are the local test's (suite time)
    _kill_at_every_step(out, tmp_path, rows, opts, endpoint=s3, shards=1,
                        points=["before-switch", "before-delete", "mid-delete"])


def test_a_job_with_nothing_to_merge_and_a_folder_that_is_no_output(tmp_path):
    out = tmp_path / "out"
    rows = _output(out, shards=2)
    code, text = _compact_job(out, tmp_path, target_mb=1024)
    assert code == 0 and "compacted: 40 result files into 1 in" in text   # the rest, smaller than the target
    code, text = _compact_job(out, tmp_path, target_mb=1024)
    assert code == 0 and "compacted: 0 result files into 0" in text
    _settled(out, rows)
    (tmp_path / "empty").mkdir()
    code, text = _compact_job(tmp_path / "empty", tmp_path)
    assert code == 2 and "config error" in text and "is this a run's output.uri" in text


# --- in a run ---------------------------------------------------------------------------------------------------


def _pipeline_run(tmp_path, corpus, out, tiny, target_mb: float):
    import io

    from pipeline import config, preflight
    from pipeline.run import run
    from tests.pipeline_helpers import config_text

    path = tmp_path / "run.toml"
    text = config_text(str(corpus), str(out), str(tiny), tasks=("caption", "ocr"))
    path.write_text(text.replace("rows_per_file = 8", f"rows_per_file = 2\ntarget_file_mb = {target_mb}"))
    cfg = config.load(path)
    preflight.check(cfg)
    printed = io.StringIO()
    return run(cfg, out=printed), printed.getvalue()


def test_a_run_merges_in_the_background_and_at_its_end_and_its_rerun_skips_every_pair(local_ray, tiny_gqa, tmp_path,
                                                                                      monkeypatch):
    import pandas as pd

    from pipeline import store
    from tests.pipeline_helpers import good_media, write_local

    monkeypatch.setattr(store, "COMPACT_EVERY_S", 0.0)   # look for merges at every poll, not every 30 s
    started = []
    real = compact.Compactor._start
    monkeypatch.setattr(compact.Compactor, "_start", lambda self, sources: started.append(
        (self.submit is not None, len(sources))) or real(self, sources))
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_local(corpus, good_media(num_images=16, num_videos=0))
    summary, printed = _pipeline_run(tmp_path, corpus, out, tiny_gqa, target_mb=0.02)
    assert summary.done == 32 and summary.compacted > 0 and "compacted:" in printed
    assert summary.admitted == summary.items == 16 and "redone:" not in printed   # no window was lost
    assert started and all(on_ray for on_ray, _ in started)   # Ray tasks, not the driver
    assert len(_listed(out)) < 16   # 32 rows were written as 16 files of 2
    _settled(out, 32)
    frame = pd.read_parquet(out)    # a glob reader after the run: exact too
    assert len(frame) == 32 and len(frame.groupby(["id", "task"])) == 32
    with mock.patch.object(progress, "read_keys", side_effect=AssertionError("a result file was opened")):
        again, _ = _pipeline_run(tmp_path, corpus, out, tiny_gqa, target_mb=0.02)
    assert again.done == 0 and again.skipped == 32


# --- in hive folders (output.partition_by) ----------------------------------------------------------------------


def test_merges_stay_in_their_hive_folder_and_a_run_cannot_switch_layouts(tmp_path, tiny_gqa):
    import io

    import pandas as pd

    from pipeline import config, output
    from pipeline.errors import ConfigError
    from pipeline.run import run
    from tests.pipeline_helpers import config_text, good_media, write_local

    out = tmp_path / "out"
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    ledger.load({})
    ledger.mark_trusted()
    shards = progress.OpenShards(ledger, ("caption", "ocr"))
    writer = output.ResultWriter(str(out), OPTS, rows_per_file=6, flush_seconds=60, note_file=ledger.note_file,
                                 committed=ledger.committed, landed=shards.wrote, partition_by=("task",))
    ids = [f"i{k:03d}" for k in range(60)]
    shards.listed({f"u#{j}": ({"caption": 10, "ocr": 10}, 20) for j in range(6)}, {"u": [f"u#{j}" for j in range(6)]})
    for j in range(6):
        writer.add(pa.concat_tables([_rows(ids[j * 10:(j + 1) * 10], f"u#{j}", task) for task in ("caption", "ocr")]))
    writer.flush()
    ledger.fold()
    small = _listed(out)
    assert all(n.startswith(("task=caption/part-", "task=ocr/part-")) for n in small) and len(small) > 4
    assert "task" not in pq.read_schema(out / sorted(small)[0]).names   # the folder holds it
    compact.Compactor(ledger, str(out), OPTS, 1 << 20).finish()
    merged = sorted(_listed(out))
    assert [n.split("/")[0] for n in merged] == ["task=caption", "task=ocr"]   # one merged file per folder
    _settled(out, 120)
    frame = pd.read_parquet(out)
    assert len(frame) == 120 and frame.groupby("task", observed=True).size().to_dict() == {"caption": 60, "ocr": 60}
    resume = _load(out)
    assert len(resume.done_keys) == 0 and "u" in resume.records

    corpus = tmp_path / "corpus"
    write_local(corpus, good_media(num_images=2, num_videos=0))
    path = tmp_path / "run.toml"
    path.write_text(config_text(str(corpus), str(out), str(tiny_gqa)))   # partition_by left at []
    with pytest.raises(ConfigError, match=r"holds result files in hive folders .* new output.uri"):
        run(config.load(path), out=io.StringIO())
    with pytest.raises(ConfigError, match="cannot be folder names"):
        config.load(path, ['output.partition_by=["task"]', 'tasks.a/b.prompt="x"', 'run.tasks=["a/b"]'])
    with pytest.raises(ConfigError, match="output.partition_by: expected a list of distinct columns"):
        config.load(path, ['output.partition_by=["model"]'])
