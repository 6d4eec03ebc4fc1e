"""End to end on one shared local Ray: a corpus on a real S3 endpoint (moto's server on 127.0.0.1) with every
kind of bad file, the real tiny glmv model, results written back to S3 and checked row by row; then a rerun that
skips everything, a manifest run, and bad inputs at the storage level."""

import io
import shutil
import json

import pandas as pd
import pyarrow.parquet as pq
from PIL import Image

from pipeline import config, output
from pipeline.decode import decode_one
from pipeline.items import Item, item_id
from pipeline.media import MediaLoader
from pipeline.readers import Unit
from pipeline.run import run
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import (S3_ENV, bad_media, config_text, good_media, read_output, run_job,
                                    s3fs_for, write_local)

TASKS = ("caption", "reasoning")


def _cfg(tmp_path, text, *overrides):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return config.load(path, list(overrides))


def _sizes(files):
    out = {}
    for rel, data in files.items():
        if rel.startswith("images/"):
            out[rel] = Image.open(io.BytesIO(data)).size
    return out


def test_s3_corpus_to_s3_output_row_by_row(s3, local_ray, tiny_gqa, tmp_path):
    fs = s3fs_for(s3)
    fs.mkdir("media-bucket")
    good = good_media(num_images=20, num_videos=3)
    bad = bad_media()
    for rel, data in good.items():
        fs.pipe(f"media-bucket/corpus/{rel}", data)
    for rel, (data, _) in bad.items():
        fs.pipe(f"media-bucket/corpus/{rel}", data)
    fs.pipe("media-bucket/corpus/notes.txt", b"not media: not listed")

    text = config_text("s3://media-bucket/corpus/", "s3://media-bucket/results/", str(tiny_gqa), endpoint=s3,
                       tasks=TASKS)
    cfg = _cfg(tmp_path, text)
    out = io.StringIO()
    summary = run(cfg, out=out)
    n_items = len(good) + len(bad)
    assert (summary.done, summary.errors, summary.skipped) == (n_items * 2, len(bad) * 2, 0)
    assert "items/s" in out.getvalue() and "generated tokens/s" in out.getvalue()
    assert "testing-secret-value" not in out.getvalue()

    table = read_output("s3://media-bucket/results/", s3)
    df = table.to_pandas()
    assert table.schema.equals(output.SCHEMA, check_metadata=False)
    assert len(df) == n_items * 2 and not df.duplicated(["id", "task"]).any()
    sizes = _sizes(good)
    for rel in good:
        uri = f"s3://media-bucket/corpus/{rel}"
        rows = df[df.uri == uri]
        assert sorted(rows.task) == sorted(TASKS), uri
        for row in rows.itertuples():
            assert row.id == item_id(uri) and pd.isna(row.error)
            assert row.finish_reason in ("eos", "length") and 1 <= row.num_output_tokens <= 6
            assert row.num_input_tokens > 10 and isinstance(row.text, str)
            assert row.answer is not None and row.thinking is not None and row.boxes is not None
            assert row.model == tiny_gqa.name and row.run_config_hash == cfg.result_hash()
            assert row.prompt and pd.notna(row.processed_at)
            if rel.startswith("images/"):
                assert row.media_type == "image" and (row.width, row.height) == sizes[rel]
                assert row.num_frames == 1 and pd.isna(row.duration_s)
            else:
                assert row.media_type == "video" and (row.width, row.height) == (64, 48)
                assert row.num_frames >= 2 and row.num_frames % 2 == 0 and row.duration_s > 1
    for rel, (_, word) in bad.items():
        uri = f"s3://media-bucket/corpus/{rel}"
        rows = df[df.uri == uri]
        assert len(rows) == 2 and (rows.finish_reason == "error").all(), uri
        for message in rows.error:
            assert message.startswith(uri) and word in message, message
    # pandas straight on the prefix, through s3fs, sees the same rows (the _state/ folder is skipped)
    opts = {"client_kwargs": {"endpoint_url": s3}}
    assert len(pd.read_parquet("s3://media-bucket/results/", storage_options=opts)) == n_items * 2
    assert fs.ls("media-bucket/results/_state/runs")

    # the same command again: everything is already done, nothing new is written
    before = sorted(fs.ls("media-bucket/results/"))
    again = run(cfg, out=io.StringIO())
    assert (again.done, again.skipped) == (0, n_items * 2)
    assert sorted(fs.ls("media-bucket/results/", refresh=True)) == before

    # one more task later on: only the new (item, task) pairs run
    more = run(_cfg(tmp_path, text, 'run.tasks=["caption", "reasoning", "ocr"]'), out=io.StringIO())
    assert (more.done, more.skipped) == (n_items, n_items * 2)
    df = read_output("s3://media-bucket/results/", s3).to_pandas()
    assert len(df) == n_items * 3 and not df.duplicated(["id", "task"]).any()


def test_manifest_with_own_prompts_and_local_output(local_ray, tiny_gqa, tmp_path):
    corpus = tmp_path / "corpus"
    files = good_media(num_images=4, num_videos=1)
    write_local(corpus, files)
    rows = [{"uri": rel, "prompt": "What shape is largest?" if i == 0 else ""} for i, rel in enumerate(files)]
    rows.append({"uri": "images/missing.png", "prompt": ""})      # named, but not there (nothing was listed)
    rows.append({"uri": "docs/readme.txt", "prompt": ""})          # not an image, video or PDF
    (corpus / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    text = config_text("", str(tmp_path / "out"), str(tiny_gqa), tasks=("ocr",)).replace(
        'uri = ""\n', f'manifest = "{corpus / "manifest.jsonl"}"\n', 1)
    summary = run(_cfg(tmp_path, text), out=io.StringIO())
    df = pd.read_parquet(tmp_path / "out")
    assert summary.done == len(df) == len(files) + 2 + 1   # one ocr row per item, plus one manifest prompt
    own = df[df.task == "prompt"]
    assert len(own) == 1 and own.prompt.iloc[0] == "What shape is largest?" and pd.isna(own.error.iloc[0])
    missing = df[df.uri.str.endswith("missing.png")].error.iloc[0]
    assert missing == f"{corpus / 'images' / 'missing.png'}: object not found"
    assert "unsupported file type" in df[df.uri.str.endswith("readme.txt")].error.iloc[0]
    assert all(pq.ParquetFile(p).metadata.num_rows > 0 for p in (tmp_path / "out").glob("*.parquet"))


def test_listing_again_after_deleting_the_snapshot_runs_new_objects_once(local_ray, tiny_gqa, tmp_path):
    """The README's way to pick up objects added to a listed prefix: delete `_state/listing/` and rerun. The new
    listing numbers its partitions and parts afresh (here b/ lands where c/ was), so the completion records made
    over the old one are not trusted: the output is scanned once, and each pair stays in it exactly once."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    files = good_media(num_images=4, num_videos=0)
    for folder, rel in zip(("a", "a", "c", ""), files):
        write_local(corpus / folder, {rel.rsplit("/", 1)[-1]: files[rel]})
    cfg = _cfg(tmp_path, config_text(str(corpus), str(out), str(tiny_gqa), tasks=("caption",)))
    assert run(cfg, out=io.StringIO()).done == 4
    write_local(corpus / "b", {"new.png": files[next(iter(files))]})   # a new partition, sorting before c/
    shutil.rmtree(out / "_state" / "listing")
    printed = io.StringIO()
    summary = run(cfg, out=printed)
    assert (summary.done, summary.skipped) == (1, 4), printed.getvalue()
    assert "whole output scanned" in printed.getvalue()
    df = pd.read_parquet(out)
    assert len(df) == 5 and not df.duplicated(["id", "task"]).any() and df.uri.str.endswith("b/new.png").any()
    printed = io.StringIO()
    assert (run(cfg, out=printed).done, run(cfg, out=io.StringIO()).skipped) == (0, 5)   # records trusted again
    assert "4 of 4 input unit(s) finished" in printed.getvalue()


def test_max_items_counts_items_already_done_and_says_so(local_ray, tiny_gqa, tmp_path):
    """The first max_items items of the input, done or not: a rerun with the same limit finds them done, also
    where they filled a whole unit (a/, finished and recorded) and part of the next (b/, cut short)."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    files = good_media(num_images=6, num_videos=0)
    for i, rel in enumerate(files):
        write_local(corpus / ("a" if i < 3 else "b"), {rel.rsplit("/", 1)[-1]: files[rel]})
    text = config_text(str(corpus), str(out), str(tiny_gqa), tasks=("caption",))
    assert run(_cfg(tmp_path, text, "input.max_items=4"), out=io.StringIO()).done == 4
    again = run(_cfg(tmp_path, text, "input.max_items=4"), out=io.StringIO())
    assert (again.done, again.skipped) == (0, 4)   # it said "skipped: 0", and a/'s record let it run 2 more of b/
    rest = run(_cfg(tmp_path, text), out=io.StringIO())
    assert (rest.done, rest.skipped) == (2, 4)
    assert run(_cfg(tmp_path, text), out=io.StringIO()).skipped == 6   # the records kept their counts
    df = pd.read_parquet(out)
    assert len(df) == 6 and not df.duplicated(["id", "task"]).any()


def test_web_answers_are_error_rows_and_url_credentials_never_land(local_ray, tiny_gqa, tmp_path):
    """A manifest of web URLs (img2dataset's case): a 403 (hotlink protection), a 410 or a dead domain is that
    item's error row, not an outage that no rerun could ever get past; a password or a signature in a URL is in no written row, file
    or printed line."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    class Site(SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def send_head(self):
            for name, status in (("forbidden", 403), ("gone", 410)):
                if name in self.path:
                    self.send_error(status)
                    return None
            return super().send_head()

    files = good_media(num_images=2, num_videos=0)
    write_local(tmp_path / "www", files)
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Site, directory=str(tmp_path / "www")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://alice:pw-SECRET-1@127.0.0.1:{server.server_address[1]}"
        urls = [f"{base}/{rel}?X-Amz-Signature=SIG-SECRET-2&w=1" for rel in files]
        dead = "http://dead-host.invalid/x.jpg"   # a domain that no longer exists: DNS says no such name
        (tmp_path / "m.csv").write_text("url\n" + "".join(f"{u}\n" for u in urls + [f"{base}/forbidden.jpg",
                                                                                    f"{base}/gone.jpg", dead]))
        text = config_text("", str(tmp_path / "out"), str(tiny_gqa), tasks=("ocr",)).replace(
            'uri = ""\n', f'manifest = "{tmp_path / "m.csv"}"\nuri_column = "url"\n', 1)
        printed = io.StringIO()
        summary = run(_cfg(tmp_path, text), out=printed)
    finally:
        server.shutdown()
        server.server_close()
    df = pd.read_parquet(tmp_path / "out")
    assert summary.done == len(df) == 5 and df.error.isna().sum() == 2
    errors = dict(zip(df.uri.str.rsplit("/", n=1).str[-1], df.error))
    assert errors["forbidden.jpg"].endswith("the web server answered HTTP 403 Forbidden")
    assert errors["gone.jpg"].endswith("the web server answered HTTP 410 Gone")
    assert errors["x.jpg"].endswith("the host name dead-host.invalid does not resolve (DNS: no such name)")
    web = df[df.uri != dead]
    assert all(u.startswith("http://***@127.0.0.1:") for u in web.uri) and web.uri.str.contains("&w=1").sum() == 2
    written = [df.to_csv(), printed.getvalue()] + [p.read_text(errors="replace") for p in (tmp_path / "out").rglob("*")
                                                  if p.is_file() and p.suffix != ".parquet"]
    assert not [t for t in written if "SECRET" in t]


def test_deleted_object_and_unreachable_store_become_error_rows(s3, tiny_gqa):
    fs = s3fs_for(s3)
    fs.mkdir("flaky")
    fs.pipe("flaky/a.png", good_media(1, 0)["images/sub/img_00.jpg"])
    loader = MediaLoader(str(tiny_gqa))
    opts = StorageOptions(endpoint_url=s3, retries=1, retry_backoff_s=0.0)
    listed = f"{Unit('listing', 's3://flaky/', 0).id}#0"   # the shard of an item found by listing the prefix

    def item():
        return Item("x", "s3://flaky/a.png", "image", tasks=["caption"], shard=listed)

    assert decode_one(item(), loader, opts).error is None
    fs.rm("flaky/a.png")   # deleted between listing and reading
    assert decode_one(item(), loader, opts).error == "s3://flaky/a.png: object not found (deleted after listing?)"
    # nothing listens on port 9 of 127.0.0.1: a transient error, retried, then an error row
    dead = StorageOptions(endpoint_url="http://127.0.0.1:9", retries=1, retry_backoff_s=0.0)
    unreachable = decode_one(item(), loader, dead)
    assert unreachable.error.startswith("s3://flaky/a.png: ") and "EndpointConnectionError" in unreachable.error
    assert unreachable.outage      # not about the item: never recorded as its result (the circuit breaker's)
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in unreachable.error


def test_a_model_actor_that_cannot_load_stops_the_run_in_one_line(tiny_gqa, tmp_path):
    """What only the model actor's load finds (here a processor patch size the vision tower cannot take; on a
    cluster, a checkpoint missing on the actor's node) ends the run as itself: one line, exit 2, no traceback, and
    no item recorded as failed. Ray reports an actor that dies in its constructor by traceback text only."""
    checkpoint = tmp_path / "ckpt"
    shutil.copytree(tiny_gqa, checkpoint)
    settings = json.loads((checkpoint / "preprocessor_config.json").read_text())
    (checkpoint / "preprocessor_config.json").write_text(json.dumps({**settings, "patch_size": 16}))
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_local(corpus, good_media(num_images=3, num_videos=0))
    cfg = tmp_path / "run.toml"
    cfg.write_text(config_text(str(corpus), str(out), str(checkpoint)))
    result = run_job(cfg, "ray.num_cpus=2", "run.max_new_tokens=2")
    assert result.returncode == 2, result.stdout[-3000:] + result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("model error: the image processor's patch_size") and last.endswith("spatial_merge_size)")
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(out.glob("*.parquet"))
