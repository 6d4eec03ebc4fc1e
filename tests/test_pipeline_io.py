"""Listing (local and S3 with a real endpoint), manifests, stable ids, the done-set, whole-file output, retries.
No Ray here: these are the parts the graph is built from."""

import errno
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import listing, output, storage
from pipeline.config import ConfigError
from pipeline.errors import StorageUnavailable
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import good_media, moto_s3, read_output, s3fs_for, write_local

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)


def make_source(uri="", manifest="", include=("*",), exclude=(), tasks=("caption", "ocr"), max_items=0, opts=OPTS):
    return listing.Source(uri, manifest, tuple(include), tuple(exclude), tuple(tasks), "prompt", max_items, opts)


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


def test_local_listing_picks_media_with_stable_ids(tmp_path):
    files = good_media(num_images=8, num_videos=2)
    write_local(tmp_path, files)
    (tmp_path / "notes.txt").write_text("not media")
    (tmp_path / "images" / "UPPER.JPG").write_bytes(files["images/sub/img_00.jpg"])
    items = list(listing.iter_items(make_source(str(tmp_path))))
    uris = {i["uri"] for i in items}
    assert len(items) == 11 and str(tmp_path / "notes.txt") not in uris
    assert {i["media_type"] for i in items if i["uri"].endswith(".webm")} == {"video"}
    assert all(i["id"] == listing.item_id(i["uri"]) and len(i["id"]) == 32 for i in items)
    again = list(listing.iter_items(make_source(str(tmp_path))))
    assert [i["id"] for i in again] == [i["id"] for i in items]
    only_sub = list(listing.iter_items(make_source(str(tmp_path), include=["images/sub/*"])))
    assert only_sub and all("/images/sub/" in i["uri"] for i in only_sub)
    no_video = list(listing.iter_items(make_source(str(tmp_path), exclude=["videos/*"])))
    assert len(no_video) == 9
    assert len(list(listing.iter_items(make_source(str(tmp_path), max_items=3)))) == 3
    with pytest.raises(ConfigError, match="not a folder"):
        list(listing.iter_items(make_source(str(tmp_path / "missing"))))


def test_s3_listing_is_paged_and_matches_the_bucket(s3):
    fs = s3fs_for(s3)
    fs.mkdir("corpus")
    files = good_media(num_images=20, num_videos=3)
    for rel, data in files.items():
        fs.pipe(f"corpus/media/{rel}", data)
    fs.pipe("corpus/media/readme.txt", b"x")
    opts = StorageOptions(endpoint_url=s3)
    pages = []
    real_call = fs.call_s3

    listed = list(listing.list_prefix("s3://corpus/media/", opts, page_size=5))
    assert sorted(rel for _, rel in listed) == sorted([*files, "readme.txt"])
    assert all(uri.startswith("s3://corpus/media/") for uri, _ in listed)
    # the listing asks for one page at a time
    fs2, _ = storage.filesystem("s3://corpus/media/", opts)
    fs2.call_s3 = lambda *a, **k: pages.append(k.get("ContinuationToken")) or real_call(*a, **k)
    assert len(list(listing._walk_s3(fs2, "corpus/media", 5, opts))) == len(files) + 1
    assert len(pages) == 5   # 24 objects, 5 a page
    items = list(listing.iter_items(make_source("s3://corpus/media/", opts=opts)))
    assert len(items) == 23 and all(i["id"] == listing.item_id(i["uri"]) for i in items)


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_manifests(tmp_path, fmt):
    write_local(tmp_path / "m", good_media(num_images=3, num_videos=1))
    rows = [{"uri": "images/sub/img_00.jpg", "prompt": "What colour dominates?"},
            {"uri": str(tmp_path / "m" / "images" / "img_01.png"), "prompt": ""},
            {"uri": "videos/clip_0.mp4", "prompt": ""},
            {"uri": "docs/file.pdf", "prompt": ""}]
    path = tmp_path / "m" / f"manifest.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    listing.check_manifest(str(path), OPTS)
    items = list(listing.iter_items(make_source(manifest=str(path))))
    assert [i["uri"] for i in items][1] == str(tmp_path / "m" / "images" / "img_01.png")
    assert items[0]["uri"] == str(tmp_path / "m" / "images" / "sub" / "img_00.jpg")   # relative to the manifest
    assert items[0]["prompt"] == "What colour dominates?" and items[1]["prompt"] == ""
    assert [i["media_type"] for i in items] == ["image", "image", "video", ""]   # a manifest keeps what it names
    blocks = list(listing.pending_blocks(make_source(manifest=str(path)), np.zeros(0, np.uint64)))
    tasks = [r["tasks"] for b in blocks for r in b.to_pylist()]
    assert tasks[0] == ["caption", "ocr", "prompt"] and tasks[1] == ["caption", "ocr"]


def test_manifest_errors(tmp_path):
    bad = tmp_path / "m.csv"
    bad.write_text("path,prompt\na.jpg,x\n")
    with pytest.raises(ConfigError, match="no 'uri' column"):
        listing.check_manifest(str(bad), OPTS)
    with pytest.raises(ConfigError, match="does not exist"):
        listing.check_manifest(str(tmp_path / "missing.csv"), OPTS)
    with pytest.raises(ConfigError, match=r"\.parquet, \.csv or \.jsonl"):
        listing.check_manifest(str(tmp_path / "m.xlsx"), OPTS)


def _result_row(item_id, task, error=None):
    return {**output.error_row({"id": item_id, "uri": f"/x/{item_id}.png", "media_type": "image"}, task, "p",
                               error or "", "m", "h"), "error": error}


def test_writer_files_are_whole_and_done_set_filters_pending(tmp_path):
    out = tmp_path / "out"
    writer = output.ResultWriter(str(out), OPTS, rows_per_file=3, flush_seconds=60)
    writer.add([_result_row("a", "caption"), _result_row("a", "ocr")])
    assert not list(out.glob("*.parquet"))          # buffered: nothing half-written appears
    writer.add([_result_row("b", "caption"), _result_row("a", "caption")])   # a repeated row is written once
    assert len(list(out.glob("*.parquet"))) == 1
    writer.flush()
    writer.write_run_record({"ok": True})
    files = sorted(out.glob("*.parquet"))
    assert len(files) == 1 and writer.rows == 3
    assert list((out / "_state" / "runs").glob("*.json"))
    assert not list((out / "_state" / "staging").glob("*"))   # staged files were renamed into place
    table = read_output(str(out))
    assert table.schema.equals(output.SCHEMA, check_metadata=False)
    assert sorted(zip(table["id"].to_pylist(), table["task"].to_pylist())) == [
        ("a", "caption"), ("a", "ocr"), ("b", "caption")]
    assert pq.ParquetFile(files[0]).metadata.row_group(0).column(0).compression == "ZSTD"
    assert len(pd.read_parquet(out)) == 3           # pandas on the prefix skips _state/

    done = output.load_done(str(out), OPTS)
    assert len(done) == 3 and np.all(np.diff(done.astype(np.float64)) > 0)
    src = make_source(str(tmp_path / "corpus"), tasks=("caption", "ocr"))
    write_local(tmp_path / "corpus", good_media(num_images=2, num_videos=0))
    items = list(listing.iter_items(src))
    first = items[0]["id"]
    done = np.sort(np.concatenate([done, listing.key_hash([first], ["ocr"])]))
    pending = [r for b in listing.pending_blocks(src, done) for r in b.to_pylist()]
    assert [r["tasks"] for r in pending if r["id"] == first] == [["caption"]]
    assert all(r["tasks"] == ["caption", "ocr"] for r in pending if r["id"] != first)


def test_retry_errors_reopens_only_error_rows_file_by_file(tmp_path):
    out = tmp_path / "out"
    writer = output.ResultWriter(str(out), OPTS, rows_per_file=2, flush_seconds=60)
    writer.add([_result_row("a", "caption"), _result_row("b", "caption", error="/x/b.png: model failed (OOM)"),
                _result_row("c", "caption", error="/x/c.png: corrupt"), _result_row("d", "caption", error="x")])
    writer.flush()
    assert len(output.load_done(str(out), OPTS)) == 4      # error rows count as done
    before = sorted(out.glob("*.parquet"))
    assert len(before) == 2
    assert output.reopen_errors(str(out), OPTS, writer.staging) == 3
    table = read_output(str(out))
    assert table["id"].to_pylist() == ["a"] and table["error"].null_count == 1
    assert len(sorted(out.glob("*.parquet"))) == 1           # the file of only error rows is gone
    assert list(output.load_done(str(out), OPTS)) == list(listing.key_hash(["a"], ["caption"]))
    assert output.reopen_errors(str(out), OPTS, writer.staging) == 0
    assert not list((out / "_state" / "staging").glob("*"))


def test_s3_writer_and_done_set(s3):
    fs = s3fs_for(s3)
    fs.mkdir("results")
    opts = StorageOptions(endpoint_url=s3)
    writer = output.ResultWriter("s3://results/run1", opts, rows_per_file=2, flush_seconds=60)
    writer.add([_result_row(i, "caption") for i in "abcde"])
    writer.flush()
    assert len(fs.ls("results/run1")) == 3          # 2 + 2 + 1 rows; no staging objects on S3
    assert len(read_output("s3://results/run1", s3)) == 5
    assert len(output.load_done("s3://results/run1", opts)) == 5
    with pytest.raises(ConfigError, match="bucket 'resluts' does not exist"):   # a typo makes no new bucket
        output.ResultWriter("s3://resluts/run1", opts, rows_per_file=2, flush_seconds=60)
    assert not fs.exists("resluts")


@pytest.mark.parametrize("error, attempts", [
    (ConnectionResetError(errno.ECONNRESET, "connection reset by peer"), 5),   # transient: retried, then raised
    (TimeoutError("read timed out"), 5),
    (FileNotFoundError("s3://b/k"), 1),                                         # a missing object is not retried
    (OSError("HTTP 503 Service Unavailable"), 5),
    (RuntimeError("503, message='Service Unavailable', url='http://h/k.jpg'"), 5),
    (OSError(errno.EINVAL, "cannot decode photos/2500.jpg at offset 5000"), 1),  # digits in a key are no status
])
def test_retries_only_transient_errors(error, attempts):
    calls = []

    def failing():
        calls.append(1)
        raise error

    # spent retries on a transient error: the store is unavailable; an error about the object is raised as it is
    with pytest.raises(StorageUnavailable if attempts > 1 else type(error)):
        storage.with_retries(failing, "s3://b/k", StorageOptions(retries=4), sleep=lambda s: None)
    assert len(calls) == attempts


def test_backoff_grows_and_a_recovered_call_returns():
    calls, sleeps = [], []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError(errno.ECONNRESET, "connection reset by peer")
        return b"ok"

    opts = StorageOptions(retries=4, retry_backoff_s=0.1)
    assert storage.with_retries(flaky, "s3://b/k", opts, sleep=sleeps.append) == b"ok"
    assert len(calls) == 3 and len(sleeps) == 2 and 0.05 <= sleeps[0] <= 0.1 <= sleeps[1] <= 0.2


def test_media_type_ignores_url_queries_such_as_presigned_signatures():
    assert listing.media_type_of("https://h/b/a.jpg?X-Amz-Signature=abc.def") == "image"
    assert listing.media_type_of("s3://bucket/clips/v.MP4") == "video"
    assert listing.media_type_of("/data/photos.v2/readme") is None
    assert listing.media_type_of("/data/a.b/photo.webp") == "image"
