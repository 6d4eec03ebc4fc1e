"""An item that kills its worker process (here a real SIGSEGV from a test hook on a marked file, as a native
decoder's segfault would) becomes that item's error row; the run goes on and ends."""

import pandas as pd
import pytest

from pipeline.poison import CRASHES_TO_GIVE_UP, CrashGuard
from tests.pipeline_helpers import config_text, good_media, run_job, write_local


def test_crash_guard_counts_deaths_per_position(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    ids = ["a", "b", "c"]
    first = CrashGuard("run1", "decode", ids)
    first.at("1")                                   # ... and the process dies here
    second = CrashGuard("run1", "decode", ids)      # Ray's retry of the same block
    assert second.poisoned("1") == 1 and not second.gave_up("1") and second.poisoned("0") == 0
    second.at("1")                                  # dies again
    third = CrashGuard("run1", "decode", ids)
    assert third.gave_up("1") and CRASHES_TO_GIVE_UP == 2
    assert CrashGuard("run2", "decode", ids).poisoned("1") == 0   # another run's notes never count
    third.finished()
    # Ray may run a finished block again: it must still know its poison, not crash on it anew
    assert CrashGuard("run1", "decode", ids).gave_up("1")
    clean = CrashGuard("run1", "decode", ["x", "y"])
    clean.at("0")
    clean.finished()
    assert not list((tmp_path / "glmv-crash" / "run1").glob(f"{clean.note.stem}.*")), "a clean block leaves nothing"


@pytest.mark.parametrize("stage, doing", [("decode", "decoding"), ("model", "running the model")])
def test_a_worker_killed_by_a_signal_on_one_item_gives_an_error_row_and_the_run_ends(tiny_gqa, tmp_path, stage,
                                                                                      doing):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    files = good_media(num_images=6, num_videos=0)
    write_local(corpus, files)
    (corpus / "images" / "poison.png").write_bytes(next(iter(files.values())))
    cfg = tmp_path / "run.toml"
    cfg.write_text(config_text(str(corpus), str(out), str(tiny_gqa)))
    result = run_job(cfg, "ray.num_cpus=2", "run.max_new_tokens=3", env={"GLMV_TEST_CRASH_ON": f"{stage}:poison.png"},
                     timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    df = pd.read_parquet(out)
    assert len(df) == 7 and not df.duplicated(["id", "task"]).any()
    bad = df[df.uri.str.endswith("poison.png")].error.iloc[0]
    assert bad.startswith(str(corpus / "images" / "poison.png")) and f"worker crashed while {doing}" in bad
    innocent_errors = df[~df.uri.str.endswith("poison.png")].error.dropna().tolist()
    assert not innocent_errors, innocent_errors
