"""The read side without Ray: listing snapshots (local and S3), manifests of every kind, WebDataset tars, Parquet
with embedded bytes, stable ids, duplicates, and the shard counts the read tasks report."""

import io
import json
import os
import tarfile
from dataclasses import replace

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import listing, readers, storage
from pipeline.config import ConfigError
from pipeline.errors import StorageUnavailable
from pipeline.items import canonical_uri, item_id, key_hash, media_type_of
from pipeline.sources import Budget, Repeats, SeenIds, TaskPlan, UnitWork, pending_items
from pipeline.state import StateDir
from pipeline.storage import StorageOptions
from tests.faults import FaultProxy
from tests.pipeline_helpers import good_media, moto_s3, s3fs_for, unchecked_strings, write_local

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)
PLAN = TaskPlan(("caption", "ocr"), "")


class FakeTracker:
    """Stands in for the Ray actor: `tracker.shard.remote(...)` records the call."""

    def __init__(self):
        self.shards, self.units, self.cut = {}, {}, {}
        tracker = self

        class Method:
            def __init__(self, store):
                self.store = store

            def remote(self, name, *args):
                self.store[name] = args

        self.shard, self.unit, self.cut_short = Method(tracker.shards), Method(tracker.units), Method(tracker.cut)


def spec_for(out, *, uri="", manifest="", fmt="files", uri_column="uri", keep=(), bytes_column="", key_column="",
             include=("*",), exclude=(), opts=OPTS, keep_schema=None):
    return readers.ReadSpec(uri, fmt, manifest, uri_column, bytes_column, key_column, tuple(keep), tuple(include),
                            tuple(exclude), opts, StateDir(str(out), opts), keep_schema)


def read_all(spec, plan=PLAN, done=None, records=None, budget=None, tracker=None):
    """Every pending item of every unit, and what the fake tracker heard."""
    tracker, rows = tracker or FakeTracker(), []
    done = np.zeros(0, np.uint64) if done is None else done
    for unit in readers.find_units(spec):
        work = UnitWork(unit, (records or {}).get(unit.id, {}))
        for block in pending_items(work, spec, plan, done, tracker, budget):
            rows += block.to_pylist()
    return rows, tracker


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        yield endpoint


def test_canonical_uris_give_one_id_per_file(tmp_path):
    path = tmp_path / "a.png"
    assert canonical_uri(f"file://{path}") == canonical_uri(str(tmp_path / "x" / ".." / "a.png")) == str(path)
    assert canonical_uri("s3://b/x/../y/./a.png") == "s3://b/y/a.png"
    assert canonical_uri("https://h/p/../a.jpg?sig=1") == "https://h/a.jpg?sig=1"
    assert media_type_of("https://h/b/a.jpg?X-Amz-Signature=abc.def") == "image"
    assert media_type_of("s3://bucket/clips/v.MP4") == "video" and media_type_of("/data/photos.v2/readme") is None


def test_seen_ids_finds_repeats_across_many_runs():
    seen, rng = SeenIds(), np.random.default_rng(0)
    ids = [f"{v:016x}{v:016x}" for v in rng.integers(2**60, 2**63, 5000)]
    firsts = [seen.first(ids[i:i + 100]) for i in range(0, 5000, 100)]
    assert all(m.all() for m in firsts) and len(seen.runs) <= 8            # merged, not one run per call
    again = seen.first(ids[::7] + ["f" * 32, "f" * 32])
    assert not again[:-2].any() and again[-2] and not again[-1]          # repeats within one call too


def test_repeats_across_units_are_counted_exactly_until_the_cap_then_as_a_lower_bound():
    keys = lambda *v: np.array(v, np.uint64)  # noqa: E731 - a unit's distinct ids, as its read task reports them
    repeats = Repeats(max_ids=5)
    repeats.add("m/a.csv", keys(1, 2, 3))
    repeats.add("m/b.csv", keys(3, 4))
    repeats.add("m/b.csv", keys(3, 4))               # a retried read task reports its unit again: once
    repeats.add("m/c.csv", keys(1, 3, 5))            # 1 and 3 again: 3 is now in three files, read three times
    assert repeats.result() == (3, True) and repeats.seen.size == 5
    repeats.add("m/d.csv", keys(6, 7, 2))            # full: 6 and 7 are not kept, 2 is still found
    repeats.add("m/e.csv", keys(6))                  # a repeat of an id past the cap is missed
    assert repeats.result() == (4, False) and repeats.seen.size == 5


def test_local_listing_is_snapshotted_in_key_order_and_resumes_after_the_last_part(tmp_path, monkeypatch):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    files = good_media(num_images=8, num_videos=2)
    write_local(corpus, files)
    (corpus / "notes.txt").write_text("not media")
    (corpus / "top.png").write_bytes(files["images/sub/img_00.jpg"])
    (corpus / "images" / "UPPER.JPG").write_bytes(files["images/sub/img_00.jpg"])
    spec = spec_for(out, uri=str(corpus))
    rows, tracker = read_all(spec)
    uris = [r["uri"] for r in rows]
    assert len(rows) == 12 and str(corpus / "notes.txt") not in uris
    assert all(r["id"] == item_id(r["uri"]) and r["tasks"] == ["caption", "ocr"] for r in rows)
    # partitions: the root's own files, then each folder; keys in byte order within each
    units = readers.find_units(spec)
    assert [(u.prefix, u.recursive) for u in units] == [("", False), ("images/", True), ("videos/", True)]
    assert [u for u in uris if "/images/" in u] == sorted(u for u in uris if "/images/" in u)
    assert {name: args[1] for name, args in tracker.shards.items()} == {
        f"{units[0].id}#0": 2, f"{units[1].id}#0": 18, f"{units[2].id}#0": 4}   # pending pairs per shard
    # the snapshot is read back, not listed again: new files are not seen, deleted ones still are
    (corpus / "images" / "late.png").write_bytes(files["images/sub/img_00.jpg"])
    assert len(read_all(spec)[0]) == 12
    # include / exclude filter at read time
    assert all("/images/sub/" in r["uri"] for r in read_all(spec_for(out, uri=str(corpus),
                                                                     include=["images/sub/*"]))[0])
    assert len(read_all(spec_for(out, uri=str(corpus), exclude=["videos/*"]))[0]) == 10
    # a partition listed part-way (killed after its first part): listing goes on after the part's last key
    monkeypatch.setattr(listing, "PART_ROWS", 3)
    out2 = tmp_path / "out2"
    snapshot = listing.ListingSnapshot(StateDir(str(out2), OPTS), str(corpus))
    parts = snapshot.partitions(OPTS)
    images = parts.index(listing.Partition("images/", True))
    first = list(listing.walk(str(corpus), OPTS, parts[images]))[:3]
    snapshot.write_part(images, 0, first)
    walked = []
    real_walk = listing.walk
    monkeypatch.setattr(listing, "walk", lambda *a: walked.append(a[3]) or real_walk(*a))
    rows2, _ = read_all(spec_for(out2, uri=str(corpus)))
    assert sorted(r["uri"] for r in rows2) == sorted(uris + [str(corpus / "images" / "late.png")])
    assert first[-1] in walked                            # continued after the snapshot's last key
    assert snapshot.parts(images) == ([0, 1, 2, 3], True)   # 10 image keys, 3 a part
    with pytest.raises(ConfigError, match="not a folder"):
        readers.find_units(spec_for(tmp_path / "out3", uri=str(tmp_path / "missing")))


def test_s3_listing_fans_out_over_prefixes_pages_and_starts_after(s3, tmp_path):
    fs = s3fs_for(s3)
    fs.mkdir("corpus")
    files = good_media(num_images=20, num_videos=3)
    for rel, data in files.items():
        fs.pipe(f"corpus/media/{rel}", data)
    fs.pipe("corpus/media/readme.txt", b"x")
    opts = StorageOptions(endpoint_url=s3, retries=1)
    assert listing.plan_partitions("s3://corpus/media/", opts) == [
        listing.Partition("", False), listing.Partition("images/", True), listing.Partition("videos/", True)]
    # one page at a time, and StartAfter skips what a snapshot already holds
    calls = []
    fs2, root = storage.filesystem("s3://corpus/media/", opts)
    real = fs2.call_s3
    fs2.call_s3 = lambda *a, **k: calls.append(k) or real(*a, **k)
    keys = list(listing._walk_s3(fs2, root, "images/", True, "", opts, page_size=5))
    assert keys == sorted(k for k in files if k.startswith("images/")) and len(calls) == 4
    after = list(listing._walk_s3(fs2, root, "images/", True, keys[9], opts, page_size=5))
    assert after == keys[10:] and calls[-1]["StartAfter"] == "media/" + keys[9]
    rows, _ = read_all(spec_for(tmp_path / "out", uri="s3://corpus/media/", opts=opts))
    assert sorted(r["uri"] for r in rows) == sorted(f"s3://corpus/media/{k}" for k in files)


def _manifest(path, rows, fmt):
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "csv":
        pd.DataFrame(rows).to_csv(path, index=False)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.mark.parametrize("fmt", ["parquet", "csv", "jsonl"])
def test_manifests_resolve_relative_uris_keep_columns_and_drop_repeats(tmp_path, fmt):
    write_local(tmp_path / "m", good_media(num_images=3, num_videos=1))
    rows = [{"url": "images/sub/img_00.jpg", "prompt": "What colour dominates?", "n": 1},
            {"url": str(tmp_path / "m" / "images" / "img_01.png"), "prompt": "", "n": 2},
            {"url": "videos/clip_0.mp4", "prompt": "", "n": 3},
            {"url": "docs/file.txt", "prompt": "", "n": 4},
            {"url": f"file://{tmp_path / 'm' / 'images' / 'sub' / 'img_00.jpg'}", "prompt": "", "n": 5},  # repeat
            {"url": "images/../images/img_01.png", "prompt": "", "n": 6}]                                   # repeat
    path = tmp_path / "m" / f"manifest.{fmt}"
    _manifest(path, rows, fmt)
    spec = spec_for(tmp_path / "out", manifest=str(path), uri_column="url", keep=["n"])
    items, tracker = read_all(spec, TaskPlan(("caption", "ocr"), "prompt"))
    assert [i["uri"] for i in items] == [str(tmp_path / "m" / p) for p in
                                         ("images/sub/img_00.jpg", "images/img_01.png", "videos/clip_0.mp4",
                                          "docs/file.txt")]
    assert [i["input:n"] for i in items] == [1, 2, 3, 4]                 # kept columns ride along, typed
    assert items[0]["prompt"] == "What colour dominates?" and items[0]["tasks"] == ["caption", "ocr", "prompt"]
    assert items[1]["tasks"] == ["caption", "ocr"]
    assert [i["media_type"] for i in items] == ["image", "image", "video", ""]   # a manifest keeps what it names
    (name, (counts, pending, skipped, *_)), = tracker.shards.items()
    assert counts == {"caption": 4, "ocr": 4, "prompt": 1} and pending == 9 and skipped == 0


def test_manifest_errors_name_the_file_and_columns_never_row_contents(tmp_path):
    bad = tmp_path / "m.parquet"
    pq.write_table(pa.table({"url": ["a.jpg"], "jpg": [b"\xff\xd8" + b"SECRET-BYTES" * 10]}), bad)
    with pytest.raises(ConfigError, match=r"has no 'uri' column \(columns: url, jpg\); set input.uri_column") as e:
        read_all(spec_for(tmp_path / "out", manifest=str(bad)))
    assert "SECRET" not in str(e.value)
    with pytest.raises(ConfigError, match="does not exist"):
        readers.find_units(spec_for(tmp_path / "out", manifest=str(tmp_path / "missing.csv")))
    (tmp_path / "m.xlsx").write_text("x")
    with pytest.raises(ConfigError, match=r"no .*\.parquet.* files"):
        readers.find_units(spec_for(tmp_path / "out", manifest=str(tmp_path / "m.xlsx")))


def test_manifest_glob_folder_and_row_group_shards(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "MANIFEST_SHARD_ROWS", 4)
    write_local(tmp_path / "media", good_media(num_images=10, num_videos=0))
    media = sorted(str(p) for p in (tmp_path / "media").rglob("*.*"))
    (tmp_path / "m").mkdir()
    _manifest(tmp_path / "m" / "a.csv", [{"uri": u} for u in media[:5]], "csv")
    _manifest(tmp_path / "m" / "b.jsonl", [{"uri": u} for u in media[5:]], "jsonl")
    _manifest(tmp_path / "m" / "_c.csv", [{"uri": "/elsewhere/x.png"}], "csv")        # hidden: not a manifest
    spec = spec_for(tmp_path / "out", manifest=str(tmp_path / "m" / "*.*"))
    assert [u.uri.rsplit("/", 1)[-1] for u in readers.find_units(spec)] == ["a.csv", "b.jsonl"]
    rows, tracker = read_all(spec)
    assert sorted(r["uri"] for r in rows) == media
    assert sorted(n.rsplit("/", 1)[-1] for n in tracker.shards) == ["a.csv#0", "a.csv#1", "b.jsonl#0", "b.jsonl#1"]
    # Parquet: shards are row ranges inside row groups; a finished shard is not returned, and one whose record
    # lacks a task gets only that task
    big = tmp_path / "big.parquet"
    pq.write_table(pa.table({"uri": media}), big, row_group_size=6)
    spec = spec_for(tmp_path / "out", manifest=str(big))
    unit = readers.find_units(spec)[0]
    rows, tracker = read_all(spec)
    assert sorted(n.rsplit("#", 1)[1] for n in tracker.shards) == ["0.0", "0.1", "1.0"]
    records = {unit.id: {"0.0": {"caption": 4, "ocr": 4}, "0.1": {"caption": 2}}}
    rows, tracker = read_all(spec, records=records)
    assert [r["uri"] for r in rows] == media[4:]
    assert [r["tasks"] for r in rows] == [["ocr"]] * 2 + [["caption", "ocr"]] * 4
    # counts only of the tasks a record lacks: reported as zeros, a finished shard's record lost its counts
    assert tracker.shards[f"{unit.id}#0.0"][:3] == ({}, 0, 8)   # skipped whole: 8 pairs
    assert tracker.shards[f"{unit.id}#0.1"][:3] == ({"ocr": 2}, 2, 2)


def test_done_keys_and_budget(tmp_path):
    write_local(tmp_path / "c", good_media(num_images=6, num_videos=0))
    spec = spec_for(tmp_path / "out", uri=str(tmp_path / "c"))
    rows, _ = read_all(spec)
    first = rows[0]["id"]
    done = np.sort(key_hash([first, rows[1]["id"]], ["ocr", "ocr"]))
    again, tracker = read_all(spec, done=done)
    assert [r["tasks"] for r in again[:3]] == [["caption"], ["caption"], ["caption", "ocr"]]
    assert sum(args[2] for args in tracker.shards.values()) == 2
    cut, tracker = read_all(spec, done=done, budget=Budget(4))
    assert len(cut) == 4 and not tracker.units and not tracker.shards   # a shard cut short is never finished
    assert sum(args[0] for args in tracker.cut.values()) == 2   # but its pairs found done are counted


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_a_tar_member_name_that_is_not_utf8_is_its_samples_error_row(tmp_path):
    media = good_media(num_images=2, num_videos=0)
    imgs = [v for k, v in sorted(media.items()) if k.startswith("images/")]
    (tmp_path / "w").mkdir()
    with tarfile.open(tmp_path / "w" / "000.tar", "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        for name, data in (("good.png", imgs[0]), ("caf\xe9.png", imgs[1])):   # written as the byte 0xE9
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    rows, _ = read_all(spec_for(tmp_path / "out", uri=str(tmp_path / "w"), fmt="webdataset"))
    shard = str(tmp_path / "w" / "000.tar")
    bad = f"{shard}#caf\\xe9: the member name is not UTF-8 (its bad bytes are shown as \\xNN)"
    assert [(r["key"], r["error"]) for r in rows] == [("good", None), ("caf\\xe9", bad)]


def test_webdataset_shards_on_s3(s3, tmp_path):
    fs = s3fs_for(s3)
    fs.mkdir("wds-inputs")
    media = good_media(num_images=4, num_videos=1)
    imgs = [v for k, v in sorted(media.items()) if k.startswith("images/")]
    video = next(v for k, v in media.items() if k.startswith("videos/"))
    fs.pipe("wds-inputs/shards/000.tar", _tar([("000/a.jpg", imgs[0]), ("000/a.json", b"{}"), ("000/b.png", imgs[1]),
                                         ("000/b.txt", b"caption b"), ("000/c.mp4", video)]))
    fs.pipe("wds-inputs/shards/001.tar", _tar([("000/a.jpg", imgs[2]), ("001/broken.jpg", b"\xff\xd8garbage"),
                                         ("001/meta.json", b"{}")]))
    whole = _tar([("002/x.png", imgs[3]), ("002/y.png", imgs[0])])
    fs.pipe("wds-inputs/shards/002.tar", whole[:700])          # cut inside the first member's bytes
    fs.pipe("wds-inputs/shards/readme.md", b"not a shard")
    spec = spec_for(tmp_path / "out", uri="s3://wds-inputs/shards/", fmt="webdataset",
                    opts=StorageOptions(endpoint_url=s3, retries=1))
    rows, tracker = read_all(spec)
    by_uri = {r["uri"]: r for r in rows}
    shard = "s3://wds-inputs/shards/{}.tar#{}".format
    assert by_uri[shard("000", "000/a")]["media_type"] == "image" and by_uri[shard("000", "000/a")]["data"] == imgs[0]
    assert by_uri[shard("000", "000/c")]["media_type"] == "video"
    # the same key in two shards is two items
    assert by_uri[shard("001", "000/a")]["data"] == imgs[2] and by_uri[shard("001", "000/a")]["key"] == "000/a"
    assert by_uri[shard("001", "001/broken")]["error"] is None          # bad bytes: found out when decoding
    assert "no image, video or PDF member (members: json)" in by_uri[shard("001", "001/meta")]["error"]
    corrupt = by_uri["s3://wds-inputs/shards/002.tar"]["error"]
    assert corrupt.startswith("s3://wds-inputs/shards/002.tar: corrupt tar after 0 samples")
    assert len(tracker.shards) == 3 and len(tracker.units) == 3


def test_parquet_with_embedded_bytes_and_an_hf_image_struct(tmp_path):
    media = good_media(num_images=3, num_videos=1)
    imgs = [v for k, v in sorted(media.items()) if k.startswith("images/")]
    video = next(v for k, v in media.items() if k.startswith("videos/"))
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"key": ["k0", "k1", "k2", "k3", "k0"], "jpg": [imgs[0], b"garbage", None, video, imgs[1]],
                             "caption": ["a", "b", "c", "d", "e"]}), tmp_path / "p" / "part-0.parquet")
    struct = pa.array([{"bytes": imgs[2], "path": "x.png"}], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct}), tmp_path / "hf.parquet")
    spec = spec_for(tmp_path / "out", uri=str(tmp_path / "p"), fmt="parquet", bytes_column="jpg", key_column="key",
                    keep=["caption"])
    rows, _ = read_all(spec)
    unit = str(tmp_path / "p" / "part-0.parquet")
    assert [(r["uri"], r["key"], r["input:caption"]) for r in rows] == [
        (f"{unit}#k0", "k0", "a"), (f"{unit}#k1", "k1", "b"), (f"{unit}#k2", "k2", "c"), (f"{unit}#k3", "k3", "d")]
    assert [r["media_type"] for r in rows] == ["image", "image", "", "video"]   # sniffed from the bytes (none: "")
    assert rows[2]["error"] == f"{unit}#k2: no media bytes in column 'jpg'" and rows[1]["error"] is None
    hf, _ = read_all(spec_for(tmp_path / "out", uri=str(tmp_path / "hf.parquet"), fmt="parquet",
                              bytes_column="image"))
    assert hf[0]["data"] == imgs[2] and hf[0]["uri"].endswith("hf.parquet#0")


def _store_inputs(fs, bucket: str) -> dict[str, dict]:
    """One small input of each sharded kind on S3, and the spec arguments that read it."""
    imgs = [v for k, v in sorted(good_media(num_images=3, num_videos=0).items())]
    fs.mkdir(bucket)
    fs.pipe(f"{bucket}/wds/000.tar", _tar([(f"{i:03d}.jpg", imgs[i % 3]) for i in range(6)]))
    sink = io.BytesIO()
    pq.write_table(pa.table({"jpg": imgs * 2}), sink)
    fs.pipe(f"{bucket}/pq/x.parquet", sink.getvalue())
    fs.pipe(f"{bucket}/m/m.csv", b"uri\n" + b"".join(b"%d.jpg\n" % i for i in range(6)))
    return {"webdataset": dict(uri=f"s3://{bucket}/wds/", fmt="webdataset"),
            "parquet": dict(uri=f"s3://{bucket}/pq/", fmt="parquet", bytes_column="jpg"),
            "manifest": dict(manifest=f"s3://{bucket}/m/m.csv")}


@pytest.mark.parametrize("fmt", ["webdataset", "parquet", "manifest"])
def test_a_store_failing_mid_read_stops_the_read_and_finishes_nothing(s3, tmp_path, fmt):
    inputs = _store_inputs(s3fs_for(s3), f"outage-{fmt}")
    with FaultProxy(s3) as proxy:
        opts = StorageOptions(endpoint_url=proxy.url, retries=2, retry_backoff_s=0.0)
        spec = spec_for(tmp_path / "out", opts=opts, **inputs[fmt])
        readers.find_units(spec)
        proxy.burst("read", 2, "slowdown")        # within the retries: read whole
        rows, tracker = read_all(spec)
        assert len(rows) == 6 and all(r["error"] is None for r in rows) and len(tracker.units) == 1
        for fault in ("denied", "slowdown"):      # an outage, and throttling past the retries
            proxy.set("read", **{fault: 1.0})
            tracker = FakeTracker()
            with pytest.raises(StorageUnavailable, match="AccessDenied|SlowDown|reduce your request rate"):
                read_all(spec, tracker=tracker)
            assert not tracker.units and not tracker.shards   # nothing reported finished, no error row


def test_a_transient_error_mid_stream_reopens_and_skips_what_was_read(tmp_path):
    path = tmp_path / "f"
    path.write_bytes(b"abcdef")
    failures = [OSError(16, "Please reduce your request rate.")]

    def read(f):
        for i, byte in enumerate(iter(lambda: f.read(1), b"")):
            if i == 3 and failures:
                raise failures.pop()
            yield byte

    assert b"".join(readers._reread(str(path), OPTS, read)) == b"abcdef"
    failures[:] = [OSError(16, "busy")] * 3   # more than OPTS.retries without progress
    with pytest.raises(StorageUnavailable, match="after 3 attempts"):
        list(readers._reread(str(path), OPTS, read))


def test_parquet_rows_without_a_key_are_items_of_their_own(tmp_path):
    imgs = [v for k, v in sorted(good_media(num_images=3, num_videos=0).items())]
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"key": ["a", None, None, "None", "2"], "jpg": imgs + imgs[:2]}),
                   tmp_path / "p" / "x.parquet")
    rows, _ = read_all(spec_for(tmp_path / "out", uri=str(tmp_path / "p"), fmt="parquet", bytes_column="jpg",
                                key_column="key"))
    unit = str(tmp_path / "p" / "x.parquet")
    assert [(r["uri"], r["key"]) for r in rows] == [(f"{unit}#a", "a"), (f"{unit}#<row 1>", None),
                                                    (f"{unit}#<row 2>", None), (f"{unit}#None", "None"),
                                                    (f"{unit}#2", "2")]
    assert [r["data"] for r in rows] == imgs + imgs[:2]


def test_a_cut_parquet_file_is_an_error_row_and_a_bytes_column_of_another_type_a_config_error(tmp_path):
    imgs = [v for k, v in sorted(good_media(num_images=3, num_videos=0).items())]
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"jpg": imgs, "n": [1, 2, 3]}), tmp_path / "p" / "000.parquet")
    sink = io.BytesIO()
    pq.write_table(pa.table({"jpg": imgs, "n": [4, 5, 6]}), sink)
    cut = tmp_path / "p" / "001.parquet"
    cut.write_bytes(sink.getvalue()[: len(sink.getvalue()) // 2])     # a writer that died
    spec = spec_for(tmp_path / "out", uri=str(tmp_path / "p"), fmt="parquet", bytes_column="jpg", keep=["n"])
    rows, tracker = read_all(spec)
    assert [r["error"] for r in rows[:3]] == [None] * 3 and [r["input:n"] for r in rows] == [1, 2, 3, None]
    assert rows[3]["uri"] == str(cut) and rows[3]["error"].startswith(f"{cut}: corrupt Parquet file (ArrowInvalid")
    assert f"{cut}#error" in tracker.shards and len(tracker.units) == 2   # finished: a rerun skips the row
    for values in ([1, 2], ["aGVsbG8="], [[1, 2]], [{"path": "x.png"}]):
        pq.write_table(pa.table({"jpg": values}), tmp_path / "p" / "000.parquet")
        with pytest.raises(ConfigError, match=r"input.bytes_column: .*000.parquet: column 'jpg' is .*, not binary"):
            read_all(spec_for(tmp_path / "out", uri=str(tmp_path / "p" / "000.parquet"), fmt="parquet",
                              bytes_column="jpg"))


def test_hostile_manifests_are_read_or_refused_in_one_line(tmp_path):
    """Types inferred from a text manifest's first block hold for its first megabyte only."""
    plan = TaskPlan(("caption",), "prompt")
    late = [{"uri": f"/x/{i:06d}/a-long-enough-file-name.jpg", "prompt": None} for i in range(40_000)]
    late.append({"uri": "/x/late.jpg", "prompt": "What is shown?"})
    for fmt in ("csv", "jsonl"):   # a prompt column empty for its first megabyte, then set
        _manifest(tmp_path / f"late.{fmt}", late, fmt)
        rows, _ = read_all(spec_for(tmp_path / "out", manifest=str(tmp_path / f"late.{fmt}")), plan)
        assert len(rows) == len(late) and rows[-1]["prompt"] == "What is shown?"
        _manifest(tmp_path / f"url.{fmt}", [{"url": "http://h/a.jpg", "prompt": "hi"}], fmt)
        rows, _ = read_all(spec_for(tmp_path / "out", manifest=str(tmp_path / f"url.{fmt}"), uri_column="url",
                                    keep=["url", "prompt"]), plan)   # img2dataset's url kept as it is
        assert [(r["uri"], r["input:url"], r["input:prompt"]) for r in rows] == [("http://h/a.jpg",) * 2 + ("hi",)]
        (tmp_path / f"empty.{fmt}").write_bytes(b"")
        assert read_all(spec_for(tmp_path / "out", manifest=str(tmp_path / f"empty.{fmt}")))[0] == []
    drift = [{"uri": f"/x/{i:06d}/a-long-enough-file-name.jpg", "n": i} for i in range(40_000)]
    drift.append({"uri": "/x/late.jpg", "n": "SECRET"})
    (tmp_path / "array.json").write_text(json.dumps([{"uri": "a.jpg"}]))
    (tmp_path / "mixed.jsonl").write_text('{"uri": 12}\n{"uri": "a.jpg"}\n')
    for name, keep, match in (("drift.csv", ["n"], "conversion error to int64"),
                              ("drift.jsonl", ["n"], "changed from number to string"),
                              ("array.json", [], "one object per line, not an array"),
                              ("mixed.jsonl", [], "changed from number to string")):
        if name.startswith("drift"):
            _manifest(tmp_path / name, drift, name.rsplit(".", 1)[1])
        with pytest.raises(ConfigError, match=f"input.manifest: {tmp_path / name} cannot be read .*{match}") as e:
            read_all(spec_for(tmp_path / "out", manifest=str(tmp_path / name), keep=keep))
        assert "SECRET" not in str(e.value)


def test_names_that_are_not_utf8_are_skipped_and_counted(tmp_path, caplog):
    corpus = tmp_path / "corpus"
    files = good_media(num_images=3, num_videos=0)
    write_local(corpus, files)
    image = next(iter(files.values()))
    os.mkdir(os.path.join(os.fsencode(corpus), b"d\xe9j\xe0"))                     # a whole folder, and files
    for name in (b"caf\xe9.jpg", b"images/\xff.png", b"d\xe9j\xe0/x.png"):
        with open(os.path.join(os.fsencode(corpus), name), "wb") as f:
            f.write(image)
    with caplog.at_level("WARNING"):
        rows, _ = read_all(spec_for(tmp_path / "out", uri=str(corpus)))
    assert sorted(r["uri"] for r in rows) == sorted(str(corpus / k) for k in files)
    assert "skipped 2 name(s) in" in caplog.text                                    # the folder and the file
    assert "skipped 1 name(s) in" in caplog.text and "e.g. '\\udcff.png'" in caplog.text


def test_inputs_under_underscore_or_dot_folders_are_not_read(tmp_path):
    table = pa.table({"uri": ["a.jpg"]})
    for rel in ("p/a.parquet", "p/sub/c.parquet", "p/_state/listing/p0/000000.parquet", "p/out/_state/x.parquet",
                "p/.cache/b.parquet", "p/sub/_temporary/0/d.parquet", "p/_e.parquet"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, tmp_path / rel)
    for uri in (tmp_path / "p", tmp_path / "p" / "**" / "*.parquet"):
        spec = spec_for(tmp_path / "out", uri=str(uri), fmt="parquet", bytes_column="jpg")
        assert [u.uri for u in readers.find_units(spec)] == [str(tmp_path / "p" / "a.parquet"),
                                                           str(tmp_path / "p" / "sub" / "c.parquet")]


def test_kept_column_types_skip_unreadable_files_and_a_missing_column_stops_at_start(tmp_path):
    """A cut first Parquet file or an empty first manifest is the readers' to report (an error row, zero rows);
    choosing the kept columns' types must not crash the run on it before they can. A file without a kept column
    stops the run before it starts, not when a read task reaches it hours in."""
    from types import SimpleNamespace

    from pipeline.run import kept_columns

    good = tmp_path / "b.parquet"
    pq.write_table(pa.table({"jpg": [b"x"], "n": pa.array([1], pa.int16())}), good)
    cut = tmp_path / "a.parquet"
    cut.write_bytes(good.read_bytes()[: len(good.read_bytes()) // 2])
    (tmp_path / "a.csv").write_text("")
    (tmp_path / "b.csv").write_text("uri,n\nx.jpg,1\n")
    cfg = SimpleNamespace(input=SimpleNamespace(keep_columns=["n"]))
    spec = spec_for(tmp_path / "out")
    for first, second, kind in ((cut, good, "parquet"), (tmp_path / "a.csv", tmp_path / "b.csv", "manifest")):
        units = [readers.Unit(kind, str(first)), readers.Unit(kind, str(second))]
        assert kept_columns(cfg, spec, units).names == ["n"]
    with pytest.raises(ConfigError, match="none of the 1 input file"):
        kept_columns(cfg, spec, [readers.Unit("parquet", str(cut))])
    pq.write_table(pa.table({"jpg": [b"x"]}), tmp_path / "c.parquet")
    for files in ((cut, tmp_path / "c.parquet"), (good, tmp_path / "c.parquet")):
        with pytest.raises(ConfigError, match=r"c.parquet has no column\(s\) \['n'\]"):
            kept_columns(cfg, spec, [readers.Unit("parquet", str(p)) for p in files])


def _kept_manifests(tmp_path, columns: list[dict]) -> list[str]:
    """One Parquet manifest per dict of kept columns (two rows each), in name order."""
    paths = []
    for n, kept in enumerate(columns):
        path = tmp_path / "m" / f"{n}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"uri": [f"/x/{n}-a.jpg", f"/x/{n}-b.jpg"], "jpg": [b"x", b"y"], **kept}), path)
        paths.append(str(path))
    return paths


def test_kept_column_types_are_unified_across_input_files(tmp_path, caplog):
    """A later manifest whose score is a float where the first one's is an int, or a first manifest whose column
    is all null, stopped the run when a read task reached it (its values did not cast to the first file's type)."""
    from types import SimpleNamespace

    from pipeline.run import kept_columns

    _kept_manifests(tmp_path, [{"score": pa.array([1, 2]), "note": pa.nulls(2)},
                               {"score": pa.array([0.5, 1.5]), "note": pa.array(["x", None])}])
    spec = spec_for(tmp_path / "out", manifest=str(tmp_path / "m"), keep=["score", "note"])
    cfg = SimpleNamespace(input=SimpleNamespace(keep_columns=["score", "note"]))
    schema = kept_columns(cfg, spec, readers.find_units(spec))
    assert schema == pa.schema([("score", pa.float64()), ("note", pa.string())])
    rows, _ = read_all(replace(spec, keep_schema=schema), TaskPlan(("caption",), ""))
    assert [(r["input:score"], r["input:note"], r["error"]) for r in rows] == [
        (1.0, None, None), (2.0, None, None), (0.5, "x", None), (1.5, None, None)]


def test_a_kept_column_whose_types_cannot_be_unified_makes_error_rows_of_that_files_items(tmp_path, caplog):
    from types import SimpleNamespace

    from pipeline.run import kept_columns

    paths = _kept_manifests(tmp_path, [{"score": pa.array([1, 2])}, {"score": pa.array(["high", "low"])},
                                       {"score": pa.array([3.5, 4.0])}])
    spec = spec_for(tmp_path / "out", manifest=str(tmp_path / "m"), keep=["score"])
    cfg = SimpleNamespace(input=SimpleNamespace(keep_columns=["score"]))
    with caplog.at_level("WARNING"):
        schema = kept_columns(cfg, spec, readers.find_units(spec))
    assert schema == pa.schema([("score", pa.float64())])
    assert f"column 'score' is string in {paths[1]}, int64 in the files before it" in caplog.text
    rows, tracker = read_all(replace(spec, keep_schema=schema), TaskPlan(("caption",), ""))
    assert [r["input:score"] for r in rows] == [1.0, 2.0, None, None, 3.5, 4.0]
    conflict = f"input.keep_columns: column 'score' is string in {paths[1]} and double in the other input files"
    assert [r["error"] for r in rows] == [None, None, f"/x/1-a.jpg: {conflict}: no one type holds both",
                                          f"/x/1-b.jpg: {conflict}: no one type holds both", None, None]
    assert sum(args[1] for args in tracker.shards.values()) == 6   # the error rows are written, and count as done
    # the same for Parquet files of embedded media
    spec = spec_for(tmp_path / "out", uri=str(tmp_path / "m"), fmt="parquet", bytes_column="jpg", keep=["score"])
    rows, _ = read_all(replace(spec, keep_schema=schema), TaskPlan(("caption",), ""))
    assert [r["error"] for r in rows] == [None, None, f"{paths[1]}#0: {conflict}: no one type holds both",
                                          f"{paths[1]}#1: {conflict}: no one type holds both", None, None]


def test_kept_text_that_is_not_utf8_is_mended_with_one_warning_per_file_and_column(tmp_path, caplog):
    """Latin-1 bytes in a kept column or a prompt reached the output as they were, and no reader could open it."""
    (tmp_path / "m.jsonl").write_bytes(b'{"uri": "/x/a.jpg", "prompt": "caf\xe9?", "title": "caf\xe9"}\n'
                                       b'{"uri": "/x/b.jpg", "prompt": "ok", "title": "na\xefve"}\n')
    (tmp_path / "m.csv").write_bytes(b"uri,prompt,title\n/x/a.jpg,caf\xe9?,caf\xe9\n/x/b.jpg,ok,na\xefve\n")
    pq.write_table(pa.table({"uri": ["/x/a.jpg", "/x/b.jpg"], "prompt": unchecked_strings([b"caf\xe9?", b"ok"]),
                             "title": unchecked_strings([b"caf\xe9", b"na\xefve"])}), tmp_path / "m.parquet")
    pq.write_table(pa.table({"jpg": [b"x", b"y"], "title": unchecked_strings([b"caf\xe9", b"na\xefve"])}),
                   tmp_path / "media.parquet")
    plan = TaskPlan(("caption",), "prompt")
    for name in ("m.jsonl", "m.csv", "m.parquet", "media.parquet"):
        caplog.clear()
        fmt = "parquet" if name == "media.parquet" else "files"
        manifest, uri = ("", str(tmp_path / name)) if fmt == "parquet" else (str(tmp_path / name), "")
        with caplog.at_level("WARNING"):
            rows, _ = read_all(spec_for(tmp_path / "out", manifest=manifest, uri=uri, fmt=fmt, bytes_column="jpg",
                                        keep=["title"]), plan)
        assert [r["input:title"] for r in rows] == ["caf\ufffd", "na\ufffdve"], name
        if fmt == "files":
            assert [r["prompt"] for r in rows] == ["caf\ufffd?", "ok"], name
        warned = [r.getMessage() for r in caplog.records if "not UTF-8" in r.getMessage()]
        assert warned[-1] == f"{tmp_path / name}: column 'title' holds text that is not UTF-8; its bad bytes are " \
                            f"written as U+FFFD", name
        assert len(warned) == (2 if fmt == "files" else 1), name             # once per column, 'prompt' the other
    nested = pa.ListArray.from_arrays(pa.array([0, 1], pa.int32()), unchecked_strings([b"caf\xe9"]))
    pq.write_table(pa.table({"uri": ["/x/a.jpg"], "tags": nested}), tmp_path / "nested.parquet")
    with pytest.raises(ConfigError, match=r"nested.parquet: column 'tags' holds text that is not UTF-8 inside list"):
        read_all(spec_for(tmp_path / "out", manifest=str(tmp_path / "nested.parquet"), keep=["tags"]))


def test_a_manifest_uri_that_is_not_utf8_is_an_error_row_under_a_stable_escaped_uri(tmp_path):
    """One Latin-1 file name in a manifest stopped the whole run (a UnicodeDecodeError; a config error for CSV)."""
    good, bad = b"/x/a.jpg", b"/x/caf\xe9.jpg"
    (tmp_path / "m.csv").write_bytes(b"uri\n" + good + b"\n" + bad + b"\n")
    (tmp_path / "m.jsonl").write_bytes(b'{"uri": "%s"}\n{"uri": "%s"}\n' % (good, bad))
    pq.write_table(pa.table({"uri": unchecked_strings([good, bad])}), tmp_path / "m.parquet")
    pq.write_table(pa.table({"uri": [good, bad]}), tmp_path / "b.parquet")          # a binary uri column
    for name in ("m.csv", "m.jsonl", "m.parquet", "b.parquet"):
        spec = spec_for(tmp_path / "out", manifest=str(tmp_path / name))
        rows, _ = read_all(spec)
        error = "/x/caf\\xe9.jpg: the URI is not UTF-8 (its bad bytes are shown as \\xNN)"
        assert [(r["uri"], r["error"]) for r in rows] == [("/x/a.jpg", None), ("/x/caf\\xe9.jpg", error)], name
        assert rows[1]["id"] == item_id("/x/caf\\xe9.jpg") == read_all(spec)[0][1]["id"]   # the same in every run


def test_a_parquet_key_or_image_path_that_is_not_utf8_is_that_rows_business(tmp_path):
    """Embedded media named by a Latin-1 key crashed the read task (UnicodeDecodeError), as a manifest URI did."""
    image = next(iter(good_media(num_images=1, num_videos=0).values()))
    pq.write_table(pa.table({"key": unchecked_strings([b"a", b"caf\xe9"]), "jpg": [image, image]}),
                   tmp_path / "k.parquet")
    struct = pa.StructArray.from_arrays([pa.array([image]), unchecked_strings([b"caf\xe9.png"])], ["bytes", "path"])
    pq.write_table(pa.table({"image": struct}), tmp_path / "hf.parquet")
    unit = tmp_path / "k.parquet"
    spec = spec_for(tmp_path / "out", uri=str(unit), fmt="parquet", bytes_column="jpg", key_column="key")
    rows, _ = read_all(spec)
    assert [(r["uri"], r["key"], r["error"]) for r in rows] == [
        (f"{unit}#a", "a", None),
        (f"{unit}#caf\\xe9", "caf\\xe9", f"{unit}#caf\\xe9: the key is not UTF-8 (its bad bytes are shown as \\xNN)")]
    hf, _ = read_all(spec_for(tmp_path / "out", uri=str(tmp_path / "hf.parquet"), fmt="parquet",
                              bytes_column="image"))
    assert hf[0]["media_type"] == "image" and hf[0]["error"] is None
