"""The job with `model.tensor_parallel = 2` on this CPU: one model actor over two gloo ranks (rank 0 the Ray Data
actor, rank 1 a follower process it starts, pipeline.tp) writes the same texts as one rank, in float32 (the split
model's logits differ from one rank's by float32 rounding, tests/test_tensor_parallel.py: a near-tie flip would be
a rare exception, none happens on this corpus); kill -9 of rank 1 mid-run ends the actor as a crash does, and the
run recovers with every (item, task) written exactly once."""

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import torch

from glmv.testing import make_fp8_checkpoint, make_tiny_checkpoint
from pipeline import config, memory_plan, preflight
from pipeline.config import ActorsConfig, ConfigError
from pipeline.preflight import check_resources, plan_actors
from pipeline.tp import rank_memory
from tests.pipeline_helpers import PY, REPO, config_text, good_media, run_job, wait_for, write_local

# windows of 2 items (4 sequences): results arrive window by window, so a kill lands mid-run
TAG = "GLMV_TP_TEST_JOB"
SETTINGS = ("ray.num_cpus=2", "actors.num_cpus=0.5", "run.max_new_tokens=12", 'run.tasks=["caption", "ocr"]',
            "batching.sort_window=1")


def _texts(out) -> dict:
    df = pd.read_parquet(out)
    assert df.error.isna().all(), df.error.dropna().tolist()
    assert not df.duplicated(["id", "task"]).any()
    return {(r.uri, r.task): r.text for r in df.itertuples()}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("tp-corpus")
    files = good_media(num_images=10, num_videos=1)
    write_local(root, files)
    return root, len(files)


def _config(tmp_path, corpus, checkpoint, name: str) -> tuple[Path, Path]:
    out, cfg = tmp_path / f"out-{name}", tmp_path / f"{name}.toml"
    cfg.write_text(config_text(str(corpus), str(out), str(checkpoint)))
    return cfg, out


@pytest.fixture(scope="module")
def one_rank(tiny_gqa, corpus, tmp_path_factory):
    """The texts of one rank."""
    cfg, out = _config(tmp_path_factory.mktemp("tp-one"), corpus[0], tiny_gqa, "one")
    result = run_job(cfg, *SETTINGS)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    texts = _texts(out)
    assert len(texts) == corpus[1] * 2 and any(texts.values())
    return texts


def test_two_ranks_write_the_texts_of_one(tiny_gqa, corpus, one_rank, tmp_path):
    cfg, out = _config(tmp_path, corpus[0], tiny_gqa, "two")
    result = run_job(cfg, *SETTINGS, "model.tensor_parallel=2")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "CPU each of 2 ranks" in result.stdout and "memory plan per rank (2 rank(s)" in result.stdout
    assert _texts(out) == one_rank


def test_an_actor_whose_ranks_cannot_load_stops_the_run_in_one_line(tiny_gqa, tmp_path):
    """As with one rank (test_pipeline_e2e): what only the model actor's load finds ends the run as itself, one line
    and exit 2, though rank 0 had started its follower; none is left behind."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_gqa, checkpoint)
    settings = json.loads((checkpoint / "preprocessor_config.json").read_text())
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({**settings, "patch_size": 16}))
    corpus = tmp_path / "corpus"
    write_local(corpus, good_media(num_images=2, num_videos=0))
    cfg, out = _config(tmp_path, corpus, checkpoint, "bad")
    result = run_job(cfg, "ray.num_cpus=2", "actors.num_cpus=0.5", "model.tensor_parallel=2",
                     env={TAG: str(tmp_path)})
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    # the driver's own last line (Ray forwards its workers' output, "(ActorName pid=...) ...", whenever it arrives)
    own = [line for line in result.stderr.strip().splitlines() if not re.match(r"(\x1b\[\d+m)?\(\w", line)]
    assert own[-1].startswith("model error: the image processor's patch_size"), own[-6:]
    assert not list(out.glob("*.parquet")) and not _followers(str(tmp_path))


def _followers(tag: str) -> list[int]:
    """Pids of the tensor-parallel followers (`python -m pipeline.tp`) of the job whose environment has this tag
    (Ray's workers are not the driver's descendants, but they inherit its environment)."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
            if b"pipeline.tp" in argv and f"{TAG}={tag}".encode() in Path(f"/proc/{entry}/environ").read_bytes():
                found.append(int(entry))
        except (OSError, ValueError):
            continue
    return found


def test_kill_9_of_rank_1_mid_run_recovers_exactly_once(tiny_gqa, corpus, one_rank, tmp_path):
    cfg, out = _config(tmp_path, corpus[0], tiny_gqa, "killed")
    cmd = [PY, str(REPO / "jobs" / "caption.py"), "--config", str(cfg)]
    for o in (*SETTINGS, "model.tensor_parallel=2"):
        cmd += ["--set", o]
    log = tmp_path / "job.log"
    with open(log, "w") as sink:
        job = subprocess.Popen(cmd, cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True,
                               env={**os.environ, TAG: str(tmp_path)})
        try:
            # mid-run: the first result file is written, more rows are on their way
            assert wait_for(lambda: list(out.glob("*.parquet")) or job.poll() is not None, timeout=240)
            first = _followers(str(tmp_path))
            assert job.poll() is None and len(first) == 1, log.read_text()[-3000:]
            os.kill(first[0], signal.SIGKILL)
            # the actor ended as a crashed one, and its restart started a follower of its own
            assert wait_for(lambda: set(_followers(str(tmp_path))) - set(first), timeout=120), log.read_text()[-3000:]
            assert job.wait(timeout=300) == 0, log.read_text()[-3000:]
        finally:
            if job.poll() is None:
                os.killpg(job.pid, signal.SIGKILL)
    assert "tensor parallel rank 0: " in log.read_text() and "ending this process" in log.read_text()
    assert wait_for(lambda: not _followers(str(tmp_path)), timeout=30)   # none left behind by the job
    assert _texts(out) == one_rank


@pytest.mark.parametrize("preset", ["gqa", "moe", "ocr", "fp8"])
def test_a_one_rank_plan_from_the_headers_counts_what_the_model_holds(tmp_path, preset):
    """The driver's one-rank CPU plan (read from the safetensors headers, no torch) holds exactly the parameters of
    the model built on the meta device: the MTP layer of MoE and OCR files and FP8 block scales left out."""
    if preset == "fp8":
        path = make_fp8_checkpoint(make_tiny_checkpoint(tmp_path / "src", "moe"), tmp_path / "fp8", block=(16, 16))
    else:
        path = make_tiny_checkpoint(tmp_path / preset, preset)
    for dtype in ("float32", "bfloat16"):
        from_headers = memory_plan.one_rank_from_headers(str(path), dtype)
        assert from_headers == rank_memory(str(path), 1, getattr(torch, dtype))


def test_a_checkpoint_whose_headers_do_not_read_is_refused_in_one_line(tmp_path, tiny_gqa):
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_gqa, broken)
    next(broken.glob("*.safetensors")).write_bytes(b"\xff" * 7)
    with pytest.raises(ConfigError, match=r"model\.path: .*\.safetensors is not a readable safetensors file"):
        memory_plan.one_rank_from_headers(str(broken), "float32")


def test_memory_plan_and_actor_sizing_count_the_ranks(tiny_gqa):
    """Weights per rank shrink with the ranks (the decoder is split, the vision tower and embeddings are not), the
    KV cache per position halves, a plan that cannot fit is refused in one line, and "auto" makes GPUs / N actors
    each asking for N times the per-rank resources."""
    one, two = rank_memory(str(tiny_gqa), 1, torch.float32), rank_memory(str(tiny_gqa), 2, torch.float32)
    assert one.weights / 2 < two.weights < one.weights
    assert two.kv_per_position * 2 == one.kv_per_position
    assert "2 rank(s) per model actor" in two.describe(0.5, on_gpu=False)
    with pytest.raises(ConfigError, match="of weights per rank do not fit"):
        two.check_fits(two.weights - 1, "a small GPU")
    two.check_fits(two.weights + 1, "a GPU")
    cluster = {"GPU": 8.0, "CPU": 64.0}
    planned = plan_actors(cluster, ActorsConfig(), "auto", ranks=2)
    assert (planned.count, planned.num_gpus) == (4, 1.0)
    assert check_resources(cluster, planned, ranks=2) == []
    with pytest.raises(ConfigError, match="4 actor\\(s\\) x 2 ranks x actors.num_gpus 1 = 8 GPUs, the cluster has 6"):
        check_resources({"GPU": 6.0, "CPU": 64.0}, planned, ranks=2)


def test_tensor_parallel_is_validated_at_the_edge(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(config_text("/in", "/out", "/ckpt"))
    assert config.load(path).model.tensor_parallel == 1
    for value, message in (("0", "must be > 0"), ("1.5", "expected an integer"), ("65", "above the most")):
        with pytest.raises(ConfigError, match=message):
            config.load(path, [f"model.tensor_parallel={value}"])
    with pytest.raises(ConfigError, match="needs batching.mode = 'refill'"):
        config.load(path, ["model.tensor_parallel=2", "batching.mode=static"])
    # where the model runs, not what it writes: the same result hash
    assert config.load(path, ["model.tensor_parallel=2"]).result_hash() == config.load(path).result_hash()


def test_a_split_the_checkpoint_cannot_take_is_refused_before_ray_starts(tiny_gqa, tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(config_text(str(tmp_path), str(tmp_path / "out"), str(tiny_gqa)))
    preflight.check_model(config.load(path, ["model.tensor_parallel=2"]))   # divides: no error
    with pytest.raises(ConfigError, match="model.tensor_parallel: tensor_parallel=3 does not divide text_config"):
        preflight.check_model(config.load(path, ["model.tensor_parallel=3"]))
    fp8 = make_fp8_checkpoint(tiny_gqa, tmp_path / "fp8", block=(32, 32))
    path.write_text(config_text(str(tmp_path), str(tmp_path / "out"), str(fp8)))
    with pytest.raises(ConfigError, match="is an FP8 release, which runs on one rank"):
        preflight.check_model(config.load(path, ["model.tensor_parallel=2"]))
