"""Inputs as owners store them, end to end on one local Ray with the real tiny model: img2dataset-style Parquet
manifests with kept columns, CSV + JSONL manifests by glob, WebDataset tar shards on an S3 endpoint, Parquet
with embedded bytes; each output checked row by row. Then kill -9 mid-run and a rerun for the sharded formats:
every (item, task) exactly once."""

import io
import json
import re
import subprocess
import tarfile
from unittest import mock

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipeline import config, preflight, readers
from pipeline.items import item_id
from pipeline.run import run
from tests.pipeline_helpers import (PY, REPO, config_text, good_media, kill_mid_run, read_output, s3fs_for,
                                    write_local)


def _run(tmp_path, input_toml: str, tiny, *, tasks=("caption",), endpoint="", out=None, output_toml=""):
    out = out or str(tmp_path / "out")
    text = config_text("", out, str(tiny), tasks=tasks, endpoint=endpoint).replace('uri = ""\n', input_toml, 1)
    text = text.replace("rows_per_file = 8\n", f"rows_per_file = 8\n{output_toml}", 1)
    path = tmp_path / "run.toml"
    path.write_text(text)
    cfg = config.load(path)
    units = preflight.check(cfg)   # as jobs/caption.py does: the run reads the units preflight found
    if units is None:
        return cfg, run(cfg, out=io.StringIO())
    with mock.patch.object(readers, "find_units", side_effect=AssertionError("the input was listed twice")):
        return cfg, run(cfg, out=io.StringIO(), units=units)


def _images(n):
    media = good_media(num_images=n, num_videos=0)
    return [media[k] for k in sorted(media)]


def _tar(members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_img2dataset_parquet_manifests_keep_their_columns(local_ray, tiny_gqa, tmp_path):
    images = _images(8)
    rows = []
    for i, data in enumerate(images):
        path = tmp_path / "media" / f"{i:05d}.jpg"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        rows.append({"url": str(path), "key": f"{i:05d}", "caption": f"alt text {i}", "width": 100 + i})
    (tmp_path / "m").mkdir()
    for n in range(4):   # a folder of 4 manifests, 2 rows each, as img2dataset writes them
        pq.write_table(pa.Table.from_pylist(rows[2 * n: 2 * n + 2]), tmp_path / "m" / f"{n:05d}.parquet")
    (tmp_path / "m" / "00000_stats.json").write_text("{}")   # img2dataset's side files are not manifests
    cfg, summary = _run(tmp_path, f'manifest = "{tmp_path / "m"}"\nuri_column = "url"\n'
                                  f'keep_columns = ["key", "caption"]\n', tiny_gqa)
    df = pd.read_parquet(tmp_path / "out")
    assert summary.done == len(df) == 8 and df.error.isna().all() and not df.duplicated(["id", "task"]).any()
    for r in rows:
        row = df[df.uri == r["url"]].iloc[0]
        assert (row.key, row.caption, row.id) == (r["key"], r["caption"], item_id(r["url"]))
    table = pq.read_table(next((tmp_path / "out").glob("*.parquet")))
    assert table.schema.field("caption").type == pa.string()
    # a manifest column that is not kept never shadows ours: `width` is the image's own
    assert set(df.width) == {Image.open(io.BytesIO(d)).size[0] for d in images}


def test_csv_and_jsonl_manifests_by_glob(local_ray, tiny_gqa, tmp_path):
    images = _images(4)
    for i, data in enumerate(images):
        (tmp_path / f"{i}.png").write_bytes(data)
    (tmp_path / "a.csv").write_text("uri,prompt\n0.png,\n1.png,Count the shapes.\n")
    # 2.png twice in one file runs once; 0.png, named again by another file, runs once per file, and is counted
    (tmp_path / "b.jsonl").write_text('{"uri": "2.png"}\n{"uri": "3.png"}\n{"uri": "2.png"}\n{"uri": "./0.png"}\n')
    cfg, summary = _run(tmp_path, f'manifest = "{tmp_path}/*.*"\n', tiny_gqa)
    df = pd.read_parquet(tmp_path / "out")
    assert sorted(zip(df.uri.str.rsplit("/", n=1).str[-1], df.task)) == [
        ("0.png", "caption"), ("0.png", "caption"), ("1.png", "caption"), ("1.png", "prompt"), ("2.png", "caption"),
        ("3.png", "caption")]
    assert df[df.task == "prompt"].prompt.iloc[0] == "Count the shapes." and df.error.isna().all()
    assert (summary.repeated_items, summary.repeats_exact) == (1, True)
    assert "duplicates: 1 item(s) named in more than one manifest file" in "\n".join(summary.lines("out"))
    record = json.loads(next((tmp_path / "out" / "_state" / "runs").glob("*.json")).read_text())
    assert record["summary"]["repeated_items"] == 1


def test_webdataset_shards_on_s3(s3, local_ray, tiny_gqa, tmp_path):
    fs = s3fs_for(s3)
    fs.mkdir("wds-formats")
    images = _images(5)
    video = good_media(num_images=0, num_videos=1)["videos/clip_0.mp4"]
    fs.pipe("wds-formats/s/000000.tar", _tar([("a.jpg", images[0]), ("a.json", b"{}"), ("b.png", images[1]),
                                      ("c.mp4", video)]))
    fs.pipe("wds-formats/s/000001.tar", _tar([("a.jpg", images[2]), ("bad.jpg", b"\xff\xd8\xff garbage"),
                                      ("d.png", images[3])]))
    fs.pipe("wds-formats/s/000002.tar", _tar([("e.webp", images[4]), ("f.txt", b"no media")]))
    cfg, summary = _run(tmp_path, 'uri = "s3://wds-formats/s/"\nformat = "webdataset"\n', tiny_gqa, endpoint=s3,
                        out="s3://wds-formats/out/")
    df = read_output("s3://wds-formats/out/", s3).to_pandas()
    got = {(u.rsplit("/", 1)[-1], k): e for u, k, e in zip(df.uri, df.key, df.error)}
    assert set(got) == {("000000.tar#a", "a"), ("000000.tar#b", "b"), ("000000.tar#c", "c"),
                        ("000001.tar#a", "a"), ("000001.tar#bad", "bad"), ("000001.tar#d", "d"),
                        ("000002.tar#e", "e"), ("000002.tar#f", "f")}          # the same key in two shards: two items
    assert got[("000001.tar#bad", "bad")].startswith("s3://wds-formats/s/000001.tar#bad: ")  # a corrupt member: its row
    assert "no image, video or PDF member" in got[("000002.tar#f", "f")]
    assert sum(pd.isna(e) for e in got.values()) == 6 and summary.done == 8
    assert df[df.key == "c"].media_type.iloc[0] == "video" and df[df.key == "c"].num_frames.iloc[0] >= 2


def test_parquet_with_embedded_bytes_and_a_garbage_row(local_ray, tiny_gqa, tmp_path):
    images = _images(4)
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"key": ["k0", "k1", "k2"], "jpg": [images[0], b"garbage bytes", images[1]],
                             "caption": ["x", "y", "z"]}), tmp_path / "p" / "a.parquet")
    pq.write_table(pa.table({"key": ["k3"], "jpg": [images[2]], "caption": ["w"]}), tmp_path / "p" / "b.parquet")
    cfg, summary = _run(tmp_path, f'uri = "{tmp_path / "p"}"\nformat = "parquet"\nbytes_column = "jpg"\n'
                                  f'key_column = "key"\nkeep_columns = ["caption"]\n', tiny_gqa)
    df = pd.read_parquet(tmp_path / "out").sort_values("key")
    assert list(df.key) == ["k0", "k1", "k2", "k3"] and list(df.caption) == ["x", "y", "z", "w"]
    assert df.error.notna().tolist() == [False, True, False, False]
    assert df.error.iloc[1].startswith(f"{tmp_path / 'p' / 'a.parquet'}#k1: ")
    assert list(df.uri) == [f"{tmp_path / 'p' / n}.parquet#{k}" for n, k in
                            (("a", "k0"), ("a", "k1"), ("a", "k2"), ("b", "k3"))]


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_kill_dash_9_mid_shard_then_resume_gives_exactly_once(tiny_gqa, tmp_path, fmt):
    images = _images(12)
    n_items = 36
    (tmp_path / "in").mkdir()
    if fmt == "webdataset":
        for s in range(3):
            members = [(f"{s}{i:03d}.png", images[(s * 12 + i) % 12]) for i in range(12)]
            (tmp_path / "in" / f"{s:06d}.tar").write_bytes(_tar(members))
        input_toml = f'uri = "{tmp_path / "in"}"\nformat = "webdataset"\n'
    else:
        for s in range(3):
            keys = [f"{s}{i:03d}" for i in range(12)]
            pq.write_table(pa.table({"key": keys, "jpg": [images[i] for i in range(12)]}),
                           tmp_path / "in" / f"{s}.parquet", row_group_size=5)
        input_toml = (f'uri = "{tmp_path / "in"}"\nformat = "parquet"\nbytes_column = "jpg"\n'
                      f'key_column = "key"\n')
    out = tmp_path / "out"
    text = config_text("", str(out), str(tiny_gqa), tasks=("caption", "ocr")).replace('uri = ""\n', input_toml, 1)
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(text)
    cmd = [PY, str(REPO / "jobs" / "caption.py"), "--config", str(cfg_path), "--set", "ray.num_cpus=2",
           "--set", "run.batch_size=2", "--set", "run.max_new_tokens=48", "--set", "output.rows_per_file=4"]
    kill_mid_run(cmd, out, tmp_path / "first.log")   # the driver and its whole local Ray, mid-shard
    before = len(pd.read_parquet(out))
    assert 0 < before < n_items * 2
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    skipped = int(re.search(r"skipped as already done: (\d+)", second.stdout).group(1))
    done = int(re.search(r"done: (\d+) \(item, task\) rows", second.stdout).group(1))
    df = pd.read_parquet(out)
    assert len(df) == n_items * 2 and not df.duplicated(["id", "task"]).any() and df.error.isna().all()
    assert (skipped, done) == (before, n_items * 2 - before)
    # and a third run has nothing left to do, without reading the input again
    third = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert "3 of 3 input unit(s) finished" in third.stdout and "done: 0 (item, task) rows" in third.stdout


def test_torn_files_in_the_output_are_set_aside_and_the_rerun_completes(local_ray, tiny_gqa, tmp_path,
                                                                                   caplog):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_local(corpus, good_media(num_images=12, num_videos=0))
    input_toml = f'uri = "{corpus}"\n'
    _run(tmp_path, input_toml, tiny_gqa, output_toml="compact = false\n")   # several files, one to tear
    files = sorted(out.glob("part-*.parquet"))
    assert len(pd.read_parquet(out)) == 12 and len(files) >= 2
    files[0].write_bytes(files[0].read_bytes()[:-50])             # cut short by another tool
    pq.write_table(pa.table({"x": [1]}), out / "notes.parquet")     # someone else's file
    (out / "_state" / "progress.json").unlink()                     # as an output of an earlier version: scanned
    with caplog.at_level("WARNING"):
        cfg, summary = _run(tmp_path, input_toml, tiny_gqa)
    assert files[0].name in caplog.text and "notes.parquet" in caplog.text
    # the torn file is out of every *.parquet glob; someone else's file is named but left where it is
    assert [p.name for p in (out / "_state" / "quarantine").iterdir()] == [files[0].name + ".quarantined"]
    assert (out / "notes.parquet").exists()
    df = pd.concat(map(pd.read_parquet, out.glob("part-*.parquet")))   # every item once: the torn file's redone
    assert len(df) == 12 and not df.duplicated(["id", "task"]).any() and summary.done >= 1


def test_a_manifest_with_text_that_is_not_utf8_runs_to_the_end(local_ray, tiny_gqa, tmp_path):
    """A Latin-1 file name is that item's error row, a Latin-1 kept value is mended: the run ends, the output
    reads back."""
    (tmp_path / "0.png").write_bytes(_images(1)[0])
    (tmp_path / "m.jsonl").write_bytes(b'{"uri": "0.png", "title": "caf\xe9"}\n{"uri": "caf\xe9.png", "title": "b"}\n')
    _, summary = _run(tmp_path, f'manifest = "{tmp_path / "m.jsonl"}"\nkeep_columns = ["title"]\n', tiny_gqa)
    df = pd.read_parquet(tmp_path / "out").sort_values("title")
    assert summary.done == 2 and list(df.title) == ["b", "caf\ufffd"]
    bad = df.iloc[0]
    assert bad.uri == str(tmp_path / "caf\\xe9.png") and bad.error.startswith(f"{bad.uri}: the URI is not UTF-8")
    assert bad.finish_reason == "error" and pd.isna(df.iloc[1].error)
