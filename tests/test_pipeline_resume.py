"""Kill -9 mid-run (a model actor, then the driver and its whole local Ray), run the same command again: every
(item, task) exactly once, finished work not redone."""

import os
import re
import signal
import subprocess

import duckdb
import pandas as pd
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from tests.pipeline_helpers import PY, REPO, config_text, good_media, wait_for, write_local

NUM_IMAGES, TASKS = 80, ("caption", "ocr")
OVERRIDES = ["ray.address=local", "ray.num_cpus=2", "run.batch_size=2", "run.max_new_tokens=64",
             "output.rows_per_file=4"]


def _command(config_path):
    cmd = [PY, str(REPO / "jobs" / "caption.py"), "--config", str(config_path)]
    for o in OVERRIDES:
        cmd += ["--set", o]
    return cmd


def _files(out):
    return {p.name: p.stat().st_mtime_ns for p in out.glob("*.parquet")}


def _model_actors(session_id):
    """Pids of the model actors of one job (Ray names their processes after the actor class)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getsid(int(entry)) != session_id:
                continue
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                if b"MapBatches(Predictor)" in f.read():
                    pids.append(int(entry))
        except (OSError, ProcessLookupError):
            continue
    return pids


def test_kill_dash_9_then_resume_gives_exactly_once(tiny_gqa, tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_local(corpus, good_media(num_images=NUM_IMAGES, num_videos=0))
    config_path = tmp_path / "run.toml"
    config_path.write_text(config_text(str(corpus), str(out), str(tiny_gqa), tasks=TASKS))
    total = NUM_IMAGES * len(TASKS)

    # its own session, so the local Ray it starts can be reaped as a group after the driver is killed
    log = open(tmp_path / "first.log", "w")
    first = subprocess.Popen(_command(config_path), cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
    try:
        assert wait_for(lambda: _files(out) or first.poll() is not None, timeout=240), "no output appeared"
        ended = f"the run ended before it could be killed:\n{(tmp_path / 'first.log').read_text()}"
        assert first.poll() is None, ended
        actors = _model_actors(first.pid)
        assert actors, "no model actor process found"
        seen = len(_files(out))
        os.kill(actors[0], signal.SIGKILL)   # kill -9 of a model actor: Ray restarts it and retries its task
        assert wait_for(lambda: len(_files(out)) > seen or first.poll() is not None, timeout=120)
        assert first.poll() is None, ended
        os.kill(first.pid, signal.SIGKILL)   # kill -9 of the driver, mid-run
        first.wait(timeout=30)
    finally:
        try:
            os.killpg(first.pid, signal.SIGKILL)   # and whatever of its Ray cluster is left
        except ProcessLookupError:
            pass
        log.close()

    before = _files(out)
    # whatever a reader sees now is whole: every file opens, no duplicates, fewer rows than the full run
    rows_before = sum(pq.ParquetFile(out / name).metadata.num_rows for name in before)
    assert 0 < rows_before < total
    df = pd.read_parquet(out)
    assert len(df) == rows_before and not df.duplicated(["id", "task"]).any()
    # the other readers the README names see the same rows (run state under _state/ is skipped)
    assert pads.dataset(out, format="parquet").count_rows() == rows_before
    assert duckdb.sql(f"select count(*) from '{out}/*.parquet'").fetchall() == [(rows_before,)]

    second = subprocess.run(_command(config_path), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    skipped = int(re.search(r"skipped as already done: (\d+)", second.stdout).group(1))
    done = int(re.search(r"done: (\d+) \(item, task\) rows", second.stdout).group(1))
    assert skipped == rows_before and done == total - rows_before

    after = _files(out)
    # the first run's files that are still there are untouched; the others were merged by compaction
    assert {k: v for k, v in after.items() if k in before} == {k: v for k, v in before.items() if k in after}
    assert set(before) <= set(after) or "compacted:" in second.stdout
    df = pd.read_parquet(out)
    assert len(df) == total and not df.duplicated(["id", "task"]).any()
    assert set(df.task) == set(TASKS) and df.uri.nunique() == NUM_IMAGES and df.error.isna().all()
    assert not list((out / "_state" / "staging").glob("*"))
