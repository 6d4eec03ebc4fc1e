"""The job with `model.tensor_parallel = 2` on this CPU: one model actor over two gloo ranks (rank 0 the Ray Data
actor, rank 1 a follower process it starts, pipeline.tp) writes the same texts as one rank, in float32 (the split
model's logits differ from one rank's by float32 rounding, tests/test_tensor_parallel.py: a near-tie flip would be
a rare exception, none happens on this corpus)."""

import pandas as pd

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
    assert "CPU each of 2 ranks" in result.stdout
    assert len(texts[1]) == len(files) * 2 and any(texts[1].values())
    assert texts[2] == texts[1]
