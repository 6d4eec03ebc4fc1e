"""The run report: made at the end of a small real run (images, a video, bad files, a hostile file name) plus a
result file written here with boxes, a hostile caption and an extra column; read locally, over S3 (moto) and
from the command line on a killed run's output; rendered in headless Chromium."""

from __future__ import annotations

import hashlib
import io
import json
import math
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser

import numpy as np
import av
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from pipeline import config, filestats, manifest, output, storage
from pipeline.corpus import image_bytes
from pipeline.report import build_report, rows, scan, survey, thumbs, write_report
from pipeline.run import run, stop_local_ray
from pipeline.state import StateDir
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import (PY, REPO, bad_media, config_text, good_media, moto_s3, run_job, s3fs_for,
                                    write_local)
from tests.report_browser import chromium, console_messages, render_page, screenshot_is_blank

HOSTILE_NAME = 'images/<img src=x onerror=alert(1)> & "q".png'
HOSTILE_TEXT = ('<script>alert("caption")</script> \x1b & <img src="http://evil.example/x.png" onerror="alert(2)"> '
                "</pre></details></div>")
HOSTILE_THINKING = "</pre><script>alert(3)</script>"
EXTRA = "<i>extra</i> javascript:alert(4)"
BAD = ("bad/corrupt.jpg", "bad/empty.png", "bad/truncated.webm")
TASKS = ("caption", "ocr")


@pytest.fixture(scope="module")
def made(tiny_gqa, tmp_path_factory):
    """A real run's output (its end-of-run report included) plus an injected result file."""
    root = tmp_path_factory.mktemp("report")
    corpus, out_dir = root / "corpus", root / "out"
    files = good_media(num_images=4, num_videos=1)
    files[HOSTILE_NAME] = image_bytes(80, 60, seed=11, ext="png")
    write_local(corpus, files)
    write_local(corpus, {k: v for k, v in bad_media().items() if k in BAD})
    (root / "run.toml").write_text(config_text(str(corpus), str(out_dir), str(tiny_gqa), tasks=TASKS))
    cfg = config.load(root / "run.toml", [])
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        printed = io.StringIO()
        summary = run(cfg, out=printed)
    finally:
        stop_local_ray()
    hostile = _item_id(str(corpus / HOSTILE_NAME))
    video = _item_id(str(corpus / "videos/clip_0.mp4"))
    _inject(out_dir, [(hostile, str(corpus / HOSTILE_NAME), "image"), (video, str(corpus / "videos/clip_0.mp4"),
                                                                       "video")])
    return {"out": out_dir, "corpus": corpus, "printed": printed.getvalue(), "summary": summary,
            "hostile": hostile, "video": video, "items": len(files) + len(BAD)}


def _item_id(uri: str) -> str:
    """As the README defines it: the first 32 hex digits of the SHA-256 of the URI."""
    return hashlib.sha256(uri.encode()).hexdigest()[:32]


def _inject(out_dir, items) -> None:
    """A 'grounding' row per item with boxes (one non-finite), hostile text and a column the schema lacks."""
    rows = []
    for item_id, uri, media in items:
        rows.append({**output.error_row({"id": item_id, "uri": uri, "media_type": media}, "grounding", "find it",
                                        "", "tiny", "h"),
                     "error": None, "finish_reason": "eos", "text": HOSTILE_TEXT, "answer": HOSTILE_TEXT,
                     "thinking": HOSTILE_THINKING, "num_output_tokens": 12, "num_input_tokens": 40,
                     "boxes": [{"x1": 100.0, "y1": 200.0, "x2": 500.0, "y2": 600.0},
                               {"x1": math.nan, "y1": 0.0, "x2": 1.0, "y2": 1.0}],
                     "processed_at": datetime.now(timezone.utc)})
    table = pa.Table.from_pylist(rows, schema=output.SCHEMA).append_column("key", pa.array([EXTRA] * len(rows)))
    # named as a run names its files (the report reads no others); sorts last, its `key` column in no other file
    pq.write_table(table, out_dir / "part-99991231-235959-ffffffff-000000.parquet")


class Page(HTMLParser):
    """Tags, attributes and text of a page, and the gallery cards with what each one holds."""

    def __init__(self, html: str):
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.cards: list[dict] = []
        self.depth = 0   # inside a card: count of open divs
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "div" and "card" in (attrs.get("class") or "").split():
            self.cards.append({"attrs": attrs, "imgs": [], "rects": [], "text": []})
            self.depth = 1
        elif self.depth:
            self.depth += tag == "div"
            if tag == "img" or (tag == "rect" and attrs.get("class") != "halo"):
                self.cards[-1]["imgs" if tag == "img" else "rects"].append(attrs)

    def handle_endtag(self, tag):
        if self.depth and tag == "div":
            self.depth -= 1

    def handle_data(self, data):
        self.text.append(data)
        if self.depth:
            self.cards[-1]["text"].append(data)

    def card(self, uri: str) -> dict:
        return next(c for c in self.cards if c["attrs"]["data-name"] == uri.lower())


def _text_of(card: dict) -> str:
    return "".join(card["text"])


def test_the_run_writes_its_report_and_prints_where(made):
    path = made["out"] / "_state" / "report.html"
    assert f"report: {path}" in made["printed"]
    html = path.read_text()
    run_tag = next((made["out"] / "_state" / "runs").glob("*.json")).stem
    assert run_tag in html and "held this output" not in html   # its own lease is not reported as a live run
    assert made["summary"].errors == len(BAD) * len(TASKS)


def test_report_holds_every_item_escapes_untrusted_text_and_fetches_nothing(made):
    html = build_report(str(made["out"]), StorageOptions(), sample=100)
    page = Page(html)
    df = pd.read_parquet(made["out"])
    assert len(page.cards) == made["items"] == df.uri.nunique()
    assert {c["attrs"]["data-name"] for c in page.cards} == {u.lower() for u in df.uri}
    text = "".join(page.text)

    # untrusted text reaches the page as text: the parser reads it back verbatim, and never as markup
    hostile = page.card(str(made["corpus"] / HOSTILE_NAME))
    assert HOSTILE_NAME.rsplit("/", 1)[-1] in _text_of(hostile)
    assert HOSTILE_TEXT.replace("\x1b", "\\x1b") in _text_of(hostile) and "\x1b" not in html
    assert HOSTILE_THINKING in _text_of(hostile) and f"key: {EXTRA}" in _text_of(hostile)
    assert [t for t, _ in page.tags].count("script") == 1 and "alert" not in _script(html)
    assert not [a for _, attrs in page.tags for a in attrs if a.startswith("on")]   # no event handler attributes

    # nothing to fetch: every URL-bearing attribute is an embedded JPEG, no fetching element, CSP allows nothing
    fetching = {"src", "href", "srcset", "action", "formaction", "poster", "data", "background", "xlink:href"}
    for tag, attrs in page.tags:
        assert tag not in ("link", "iframe", "object", "embed", "base", "frame", "audio", "video", "source")
        for name, value in attrs.items():
            if name == "href":
                assert tag == "a" and re.fullmatch(r"#[a-z]+", value), value   # in-page links only
            elif name in fetching:
                assert tag == "img" and value.startswith("data:image/jpeg;base64,"), (tag, name, value[:80])
    css = html[html.index("<style>"): html.index("</style>")]
    assert "url(" not in css and "@import" not in css
    csp = next(a["content"] for t, a in page.tags if t == "meta" and a.get("http-equiv") == "Content-Security-Policy")
    assert csp.startswith("default-src 'none'; img-src data:;")

    # thumbnails, boxes (the non-finite one left out), a video's frame strip, errors without a picture
    assert len(hostile["imgs"]) == 1 and len(hostile["rects"]) == 1
    assert {k: hostile["rects"][0][k] for k in ("x", "y", "width", "height")} == {
        "x": "100.0", "y": "200.0", "width": "400.0", "height": "400.0"}
    video = page.card(str(made["corpus"] / "videos/clip_0.mp4"))
    assert len(video["imgs"]) == 4 and len(video["rects"]) == 1
    for rel in BAD[:2]:
        bad = page.card(str(made["corpus"] / rel))
        assert not bad["imgs"] and "no preview" in _text_of(bad) and bad["attrs"]["data-error"] == "1"
    for uri in df[df.media_type == "image"].uri:
        assert all(img["src"].startswith("data:image/jpeg;base64,") for img in page.card(uri)["imgs"])

    # errors by kind, with their counts; the summary's numbers; every task's output-token plot
    for kind in ("empty file", "not a decodable image", "truncated video"):
        assert re.search(rf"{kind}</td><td class=\"num\">{len(TASKS)}</td>", html), kind
    assert f"{len(df):,}" in text and "error rows" in text
    for task in TASKS + ("grounding",):
        assert f"output tokens: {task}" in text


def _script(html: str) -> str:
    return html[html.index("<script>"): html.index("</script>")]


def _scan(out, sample: int) -> tuple[scan.Scan, list]:
    scanned = survey(str(out), StorageOptions(), sample)
    return scanned, [(path, why) for path, why in scanned.left_out if why == output.FOREIGN_NAME]


def test_the_sample_covers_every_stratum(made):
    scanned, foreign = _scan(made["out"], sample=2)
    assert not foreign and not scanned.left_out and scanned.rows == len(pd.read_parquet(made["out"]))
    strata = set(scanned.strata)
    assert ("caption", "image", "error") in strata and ("ocr", "video", "ok") in strata
    picked = set(scan.pick_sample(scanned.candidates, len(strata)))
    assert len(picked) <= len(strata)
    for stratum, ids in scanned.candidates.items():
        assert picked & set(ids), stratum
    html = build_report(str(made["out"]), StorageOptions(), sample=3)
    assert len(Page(html).cards) == 3


STRAYS = {   # someone else's Parquet files next to the results: sorting first or last, or named as ours
    "0-notes.parquet": (pa.table({"x": [1, 2]}), "foreign name"),
    "0-ids.parquet": (pa.table({"id": ["0" * 32]}), "foreign name"),
    "zz-notes.parquet": (pa.table({"id": [1, 2], "uri": ["a", "b"]}), "foreign name"),
    "part-00000000-000000-00000000-000001.parquet": (pa.table({"id": [1, 2], "task": ["caption", "ocr"]}),
                                                     "column 'id' is int64, not string"),
}


def _assert_counts_of_the_rows(scanned: scan.Scan, out, exact_items: bool = True) -> None:
    """The report's numbers are those of a direct pandas read of the output."""
    df = pd.read_parquet(out)
    df["media_type"] = df.media_type.fillna("")
    df["status"] = np.where(df.error.isna(), "ok", "error")
    assert scanned.rows == len(df) and scanned.files == len(list(out.glob("*.parquet")))
    assert dict(scanned.strata) == df.groupby(["task", "media_type", "status"]).size().to_dict()
    assert dict(scanned.finish) == df.groupby(["task", df.finish_reason.fillna("")]).size().to_dict()
    assert dict(scanned.models) == df.groupby(["model", "run_config_hash"]).size().to_dict()
    errors = df[df.status == "error"]
    kinds = [filestats.error_kind(u, e) for u, e in zip(errors.uri, errors.error)]
    assert {k: n for k, (n, _) in scanned.errors.items()} == dict(pd.Series(kinds, dtype=object).value_counts())
    ok = df[df.status == "ok"]
    for task, group in ok.groupby("task"):
        width, total, hist = scanned.out_tokens[task]
        assert total == group.num_output_tokens.sum()
        assert np.array_equal(hist, np.bincount(group.num_output_tokens // width, minlength=len(hist)))
    for media, group in ok.groupby("media_type"):
        bins = np.floor(np.log2(group.num_input_tokens.clip(lower=1))).astype(int)
        assert np.array_equal(scanned.in_tokens[media], np.bincount(bins))
    assert sum(r for _, points in scanned.times.values() for _, r, _ in points) == df.processed_at.notna().sum()
    if exact_items:
        assert scanned.exact and scanned.items() == df.id.nunique()
    else:
        assert not scanned.exact and abs(scanned.items() - df.id.nunique()) <= 0.02 * df.id.nunique()


def test_the_reports_counts_are_those_of_the_rows_and_come_from_the_manifest(made):
    scanned = survey(str(made["out"]), StorageOptions(), sample=100)
    _assert_counts_of_the_rows(scanned, made["out"])
    # the run's files were summarized when written; only the file injected since (not in the manifest) was read
    assert scanned.read == 1 and scanned.files >= 2   # the run's files (merged at its end) and the injected one
    held = manifest.read(StateDir(str(made["out"]), StorageOptions()))
    assert len(held) == scanned.files - 1 and all(filestats.loads(row["stats"]) for row in held.values())


def test_a_manifest_of_an_earlier_version_without_summaries(made, tmp_path):
    """Its files are read for the report (the same counts); a run's report keeps their summaries in the manifest,
    so the next report reads none of them."""
    out = tmp_path / "old-manifest"
    shutil.copytree(made["out"], out)
    state = StateDir(str(out), StorageOptions())
    old = state.read_table(manifest.MANIFEST).drop_columns(["stats"])
    state.write_table(manifest.MANIFEST, old)
    assert all(row["stats"] is None for row in manifest.read(state).values())
    scanned = survey(str(out), StorageOptions(), sample=100)
    _assert_counts_of_the_rows(scanned, out)
    assert scanned.read == scanned.files
    before = build_report(str(out), StorageOptions(), sample=100)
    assert all(row["stats"] is None for row in manifest.read(state).values())   # not a run's: the manifest untouched
    write_report(str(out), StorageOptions(), sample=100, current_run="r-now")   # as the run's end does
    assert all(filestats.loads(row["stats"]) for row in manifest.read(state).values())
    again = survey(str(out), StorageOptions(), sample=100)
    assert again.read == 1   # the injected file, which the manifest does not hold
    _assert_counts_of_the_rows(again, out)
    assert len(Page(before).cards) == made["items"]


def _synthetic_output(out, files: int, rows_per_file: int) -> None:
    """Result files and their manifest (summaries included) as a run leaves them, written here directly."""
    rng = np.random.default_rng(7)
    state = StateDir(str(out), StorageOptions())
    held, item = {}, 0
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for k in range(files):
        rows = []
        for r in range(rows_per_file):
            task = TASKS[r % 2]
            uri = f"/nowhere/{item}.{'mp4' if item % 9 == 0 else 'jpg'}"
            failed = rng.random() < 0.05
            rows.append({**output.error_row({"id": _item_id(uri), "uri": uri,
                                             "media_type": "video" if item % 9 == 0 else "image"}, task, "p",
                                            f"{uri}: empty file (0 bytes)" if failed else None, "tiny", "h"),
                         "finish_reason": "error" if failed else "eos", "num_input_tokens": int(rng.integers(1, 900)),
                         "num_output_tokens": 0 if failed else int(rng.integers(1, 300)),
                         "processed_at": start + timedelta(seconds=k * 3 + r * 0.01)})
            item += r % 2
        table = pa.Table.from_pylist(rows, schema=output.SCHEMA)
        name = f"part-20260101-000000-0000000a-{k:06d}.parquet"
        pq.write_table(table, out / name, compression="zstd")
        held[name] = output.manifest_row(table, (out / name).stat().st_size, [f"s{k}"], "20260101-000000-0000000a")
    manifest.write(state, held)


def test_a_large_output_is_reported_from_its_summaries_and_a_few_files(tmp_path, monkeypatch):
    out = tmp_path / "large"
    out.mkdir()
    _synthetic_output(out, files=3 * scan.MAX_SAMPLE_FILES, rows_per_file=63)   # odd: items straddle files
    opened = []
    real = scan.read_sample
    monkeypatch.setattr(scan, "read_sample", lambda fs, root, opts, files, *a, **k: opened.extend(files) or
                        real(fs, root, opts, files, *a, **k))
    scanned = survey(str(out), StorageOptions(), sample=6)
    assert scanned.read == 0 and len(opened) <= scan.MAX_SAMPLE_FILES
    _assert_counts_of_the_rows(scanned, out, exact_items=False)
    # every stratum, the rare error ones included, has candidates from the few files read
    assert set(scanned.candidates) == set(scanned.strata)
    page = Page(build_report(str(out), StorageOptions(), sample=6))
    assert len(page.cards) == 6 and "items (estimated" in "".join(page.text)
    for c in page.cards:   # both tasks of a sampled item, found in the file read or the one beside it
        assert _text_of(c).count("no preview") == 1 and "caption" in _text_of(c) and "ocr" in _text_of(c)
    # an item whose caption row ends one file and whose ocr row starts the next: seen in the first, found in both
    first = pq.read_table(out / "part-20260101-000000-0000000a-000005.parquet")
    straddling = first["id"][-1].as_py()
    found = rows.fetch_rows(*storage.filesystem(str(out), StorageOptions()), StorageOptions(), [straddling],
                            {straddling: ["part-20260101-000000-0000000a-000005.parquet"]},
                            {p.name for p in out.glob("*.parquet")}, set())
    assert [r["task"] for r in found[straddling]] == ["caption", "ocr"]


def test_other_parquet_files_are_left_out_and_named(made, tmp_path):
    out = tmp_path / "strays"
    shutil.copytree(made["out"], out)
    for name, (table, _) in STRAYS.items():
        pq.write_table(table, out / name)
    scanned, _ = _scan(out, sample=100)
    clean, _ = _scan(made["out"], sample=100)
    assert (scanned.files, scanned.rows, scanned.items(), scanned.strata, scanned.finish) == (
        clean.files, clean.rows, clean.items(), clean.strata, clean.finish)
    assert all(scanned.out_tokens[t][:2] == h[:2] and np.array_equal(scanned.out_tokens[t][2], h[2])
               for t, h in clean.out_tokens.items())
    page = Page(build_report(str(out), StorageOptions(), sample=100))
    text = "".join(page.text)
    assert len(page.cards) == made["items"] and f"{len(STRAYS)} file(s) under the prefix were left out" in text
    for name, (_, why) in STRAYS.items():
        assert f"{out / name}: not a result file of this pipeline ({why})" in text


def test_report_over_s3(made):
    with moto_s3() as endpoint:
        fs = s3fs_for(endpoint)
        fs.mkdir("report-bucket")
        for path in made["out"].rglob("*"):
            if path.is_file():
                fs.pipe(f"report-bucket/run/{path.relative_to(made['out'])}", path.read_bytes())
        opts = StorageOptions(endpoint_url=endpoint, retries=1, retry_backoff_s=0.0)
        where = write_report("s3://report-bucket/run/", opts, sample=100)
        assert where == "s3://report-bucket/run/_state/report.html"
        page = Page(fs.cat_file("report-bucket/run/_state/report.html").decode())
        assert len(page.cards) == made["items"]
        assert sum(len(c["imgs"]) for c in page.cards) >= made["items"] - len(BAD)


def test_cli_on_a_killed_runs_output(made, tmp_path):
    """No run record for the last run, its lease left behind, a staging file, a file that is not Parquet."""
    out = tmp_path / "killed"
    shutil.copytree(made["out"], out)
    for record in (out / "_state" / "runs").glob("*.json"):
        record.unlink()
    (out / "_state" / "lease.json").write_text(json.dumps({"host": "elsewhere", "pid": 1, "run": "r-killed",
                                                           "heartbeat": 0}))
    (out / "_state" / "staging").mkdir(exist_ok=True)
    (out / "_state" / "staging" / "half.tmp").write_bytes(b"PAR1 half a file")
    broken = out / "part-00000000-000000-00000000-000000.parquet"   # named as ours, sorts first
    broken.write_bytes(b"not parquet at all")
    target = tmp_path / "r.html"
    proc = subprocess.run([PY, str(REPO / "jobs" / "report.py"), "--output", str(out), "--out", str(target),
                           "--sample", "5"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"report: {target}"
    page = Page(target.read_text())
    text = "".join(page.text)
    assert len(page.cards) == 5 and "r-killed" in text and f"{broken}: ArrowInvalid" in text
    assert "no run record" in text
    missing = subprocess.run([PY, str(REPO / "jobs" / "report.py"), "--output", str(tmp_path / "nothing")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert missing.returncode == 1 and "no such output" in missing.stderr


def test_report_renders_in_headless_chromium(made, tmp_path):
    browser = chromium()
    if browser is None:
        pytest.skip("chromium is not installed; `make test` installs it (apt-get install chromium)")
    target = tmp_path / "report.html"
    write_report(str(made["out"]), StorageOptions(), sample=100, out=str(target))
    shot, log, dom = render_page(browser, target, tmp_path)
    assert console_messages(log) == []
    assert not screenshot_is_blank(shot)
    n = made["items"]
    assert f"{n} of {n} shown" in dom   # the page's script ran

    # the same check sees what it is meant to catch: a console error, a blocked fetch, an exception
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><meta http-equiv='Content-Security-Policy' content=\"default-src 'none'; "
                   "script-src 'unsafe-inline'\"><h1>x</h1><script>console.error('boom')</script>"
                   "<img src='http://127.0.0.1:9/x.png'><script>notDefined()</script>")
    _, log, _ = render_page(browser, bad, tmp_path)
    messages = console_messages(log)
    assert len(messages) == 3 and "boom" in messages[0] and "notDefined" in messages[2], messages


@pytest.mark.parametrize("message, kind", [
    ("{u}: empty file (0 bytes)", "empty file"),
    ("{u}: decompression bomb refused: 300x300 = 90000 pixels is over the limit", "decompression bomb refused"),
    ("{u}: truncated video: stream ended before frame 12 of the 40 its header announces", "truncated video"),
    ("{u}: model failed (RuntimeError: CUDA out of memory)", "model failed (RuntimeError)"),
    ("{u}: storage error after retries (ClientError: SlowDown)", "storage error after retries (ClientError)"),
    ("{u}: image has 4000 frames", "image has # frames"),
    ("a message that names no uri", "a message that names no uri"),
])
def test_error_kind_is_the_cause_without_its_details(message, kind):
    uri = "s3://bucket/a: b (1).png"   # the URI itself holds the separators
    assert scan.error_kind(uri, message.format(u=uri)) == kind


def _audio_only_mp4(path) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("aac", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


def test_a_video_without_a_preview_says_why(tmp_path):
    _audio_only_mp4(tmp_path / "audio_only.mp4")
    (tmp_path / "zero.mp4").write_bytes(b"")
    notes = [thumbs.thumbnail(str(tmp_path / name), "video", StorageOptions()).note
             for name in ("audio_only.mp4", "zero.mp4")]
    assert notes == ["no preview: no video stream in the file (audio)", "no preview: empty file (0 bytes)"]


def test_a_decoder_that_crashes_costs_its_thumbnail_only(tmp_path, monkeypatch):
    """Thumbnails are decoded in a child process: one whose decoder segfaults (a test hook makes it) gets a note,
    the others their pictures, and the caller lives on."""
    for name, seed in (("a.png", 1), ("crash-me.png", 2), ("b.png", 3)):
        (tmp_path / name).write_bytes(image_bytes(64, 48, seed=seed, ext="png"))
    monkeypatch.setenv(thumbs.FAULT_ENV, "crash-me")
    items = [(str(tmp_path / n), "image") for n in ("a.png", "crash-me.png", "b.png")] + [("x.txt", "")]
    made = thumbs.thumbnails(items, StorageOptions(), threads=2)
    assert [len(t.frames) for t in made] == [1, 0, 1, 0]
    assert made[1].note == "no preview: the decoder crashed (SIGSEGV)" and made[3].note == "not an image or video"


def test_a_decoder_crash_while_reporting_leaves_the_run_whole(tiny_gqa, tmp_path):
    """The end of a real run: the report is written (with a note on the crashed item's card) and the job exits 0."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_local(corpus, {"images/fine.png": image_bytes(64, 48, seed=1, ext="png"),
                         "images/crash-me.png": image_bytes(64, 48, seed=2, ext="png")})
    (tmp_path / "run.toml").write_text(config_text(str(corpus), str(out), str(tiny_gqa)))
    proc = run_job(tmp_path / "run.toml", env={thumbs.FAULT_ENV: "crash-me"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"report: {out / '_state' / 'report.html'}" in proc.stdout
    page = Page((out / "_state" / "report.html").read_text())
    crashed = page.card(str(corpus / "images/crash-me.png"))
    assert not crashed["imgs"] and "no preview: the decoder crashed (SIGSEGV)" in _text_of(crashed)
    assert len(page.card(str(corpus / "images/fine.png"))["imgs"]) == 1
    # every result file was summarized when it was written: a report (a resume's with nothing to do) reads none
    assert survey(str(out), StorageOptions(), sample=0).read == 0
