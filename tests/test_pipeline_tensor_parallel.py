"""The job with `model.tensor_parallel = 2` on this CPU: one model actor over two gloo ranks (rank 0 the Ray Data
actor, rank 1 a follower process it starts, pipeline.tp) writes the same texts as one rank, in float32 (the split
model's logits differ from one rank's by float32 rounding, tests/test_tensor_parallel.py: a near-tie flip would be
a rare exception, none happens on this corpus)."""

import pandas as pd
import pytest
import torch

from pipeline import config
from pipeline.config import ActorsConfig, ConfigError
from pipeline.preflight import check_resources, plan_actors
from pipeline.tp import rank_memory
from tests.pipeline_helpers import config_text, good_media, run_job, write_local

SETTINGS = ("ray.num_cpus=2", "actors.num_cpus=0.5", "run.max_new_tokens=8", 'run.tasks=["caption", "ocr"]')


def _texts(out) -> dict:
    df = pd.read_parquet(out)
    assert df.error.isna().all(), df.error.dropna().tolist()
    assert not df.duplicated(["id", "task"]).any()
    return {(r.uri, r.task): r.text for r in df.itertuples()}


def test_two_ranks_write_the_texts_of_one(tiny_gqa, tmp_path):
    corpus = tmp_path / "corpus"
    files = good_media(num_images=5, num_videos=1)
    write_local(corpus, files)
    texts = {}
    for ranks in (1, 2):
        out = tmp_path / f"out{ranks}"
        cfg = tmp_path / f"run{ranks}.toml"
        cfg.write_text(config_text(str(corpus), str(out), str(tiny_gqa)))
        result = run_job(cfg, *SETTINGS, f"model.tensor_parallel={ranks}")
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        texts[ranks] = _texts(out)
    assert "CPU each of 2 ranks" in result.stdout and "memory plan per rank (2 rank(s)" in result.stdout
    assert len(texts[1]) == len(files) * 2 and any(texts[1].values())
    assert texts[2] == texts[1]


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
