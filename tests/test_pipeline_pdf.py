"""PDFs as input, one item per page: a corpus of multi-page PDFs, an encrypted one, a corrupt one, one with no pages
and images, read as loose files (locally and on S3), from a manifest, inside WebDataset shards (on S3) and from a
Parquet bytes column, end to end with the tiny model; each output checked page by page. Then kill -9 in the middle
of a long document and a rerun: every page exactly once, the finished ones not redone."""

import io
import math
import os
import re
import subprocess

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import config, pdf
from pipeline.corpus import image_bytes, pdf_bytes
from pipeline.decode import DecodeSettings, decode_batch
from pipeline.items import Item, from_table, item_id, to_table
from pipeline.readers import raw_table
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import (PY, REPO, config_text, kill_mid_run, read_output, run_job, s3fs_for,
                                    write_local)
from tests.test_pipeline_formats import _run, _tar

PAGES = {"docs/a.pdf": 3, "docs/b.pdf": 2, "docs/sub/c.pdf": 4}   # the readable documents and their pages
CAUSES = {"docs/locked.pdf": "encrypted PDF", "docs/broken.pdf": "corrupt PDF", "docs/empty.pdf": "PDF has no pages"}
IMAGES = ("img/one.png", "img/two.jpg")


def encrypted_pdf() -> bytes:
    """A two-page PDF that needs a password (pypdfium2 writes no encryption: pypdf does, RC4 as old writers did)."""
    from pypdf import PdfWriter

    writer = PdfWriter(clone_from=io.BytesIO(pdf_bytes(2, seed=7)))
    writer.encrypt("user-secret", "owner-secret", algorithm="RC4-128")
    buf = io.BytesIO()
    writer.write(buf)
    return buf.getvalue()


def empty_pdf() -> bytes:
    """A well-formed PDF whose page tree has no pages (PDFium writes none such: it is written by hand)."""
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [] /Count 0 >>"]
    out, offsets = io.BytesIO(), []
    out.write(b"%PDF-1.4\n")
    for number, body in enumerate(objects, 1):
        offsets.append(out.tell())
        out.write(b"%d 0 obj\n%s\nendobj\n" % (number, body))
    xref = out.tell()
    out.write(b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1))
    out.write(b"".join(b"%010d 00000 n \n" % o for o in offsets))
    out.write(b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref))
    return out.getvalue()


def corpus() -> dict[str, bytes]:
    files = {name: pdf_bytes(n, seed=10 * i, width_pt=612 - 100 * i) for i, (name, n) in enumerate(PAGES.items())}
    files["docs/locked.pdf"] = encrypted_pdf()
    files["docs/broken.pdf"] = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage, no xref, no trailer"
    files["docs/empty.pdf"] = empty_pdf()
    files[IMAGES[0]] = image_bytes(64, 48, seed=1, ext="png")
    files[IMAGES[1]] = image_bytes(72, 56, seed=2, ext="jpg")
    return files


def check_rows(df: pd.DataFrame, name_of, tasks=("caption",)) -> None:
    """One row per page and task (uri <document>#page=<n>, page, num_pages), one error row per unopenable document
    naming it and the cause, and the images as ever. `name_of(uri)`: the corpus name a row's document stands for."""
    assert not df.duplicated(["id", "task"]).any() and set(df.task) == set(tasks)
    df = df[df.task == tasks[0]]
    pages = df[df.page.notna()]
    got = sorted((name_of(pdf.document_uri(u)), int(p), int(n)) for u, p, n in zip(pages.uri, pages.page,
                                                                                 pages.num_pages))
    assert got == sorted((name, p, n) for name, n in PAGES.items() for p in range(1, n + 1))
    assert all(u.endswith(f"#page={int(p)}") for u, p in zip(pages.uri, pages.page))
    assert pages.error.isna().all() and (pages.media_type == "pdf").all() and (pages.num_output_tokens > 0).all()
    assert (pages.width > 0).all() and (pages.height > pages.width).all()   # portrait pages, rendered
    failed = df[df.page.isna() & (df.media_type == "pdf")]
    assert sorted(name_of(u) for u in failed.uri) == sorted(CAUSES)   # one row per document, its own URI
    for uri, error, count in zip(failed.uri, failed.error, failed.num_pages):
        assert error.startswith(f"{uri}: ") and CAUSES[name_of(uri)] in error, error
        assert (count == 0) if name_of(uri) == "docs/empty.pdf" else pd.isna(count)
    images = df[df.media_type == "image"]
    assert sorted(map(name_of, images.uri)) == sorted(IMAGES) and images.error.isna().all()
    assert images.page.isna().all() and len(df) == sum(PAGES.values()) + len(CAUSES) + len(IMAGES)


# --- rendering and expanding, no Ray ---------------------------------------------------------------------------


def test_render_scale_fills_the_pixel_budget_and_dpi_overrides_it():
    # within 0.5% of the budget (PDFium's rounding to whole pixels is left room for), never over it
    assert pdf.render_scale(612, 792, 0, 1_000_000, 10**8) == pytest.approx(math.sqrt(1e6 / (612 * 792)), rel=5e-3)
    assert pdf.render_scale(612, 792, 0, 10**7, 200_000) == pytest.approx(math.sqrt(2e5 / (612 * 792)), rel=5e-3)
    assert pdf.render_scale(612, 792, 144, 1_000, 10**8) == 2.0   # input.pdf_dpi wins over the budget
    with pytest.raises(pdf.DocumentError, match="over batching.max_input_pixels"):
        pdf.render_scale(612, 792, 2400, 1_000, 10**8)


def test_pdf_dpi_is_validated_and_counts_as_a_result_setting(tmp_path):
    text = config_text(str(tmp_path), str(tmp_path / "out"), str(tmp_path))
    for bad, why in (("-1", "must be >= 0"), ("9000", "above the most"), ('"high"', "expected a number")):
        path = tmp_path / "bad.toml"
        path.write_text(text.replace("[input]\n", f"[input]\npdf_dpi = {bad}\n"))
        with pytest.raises(config.ConfigError, match=f"input.pdf_dpi.*{why}|{why}.*input.pdf_dpi|input.pdf_dpi"):
            config.load(path)
    path = tmp_path / "ok.toml"
    path.write_text(text)
    plain = config.load(path)
    path.write_text(text.replace("[input]\n", "[input]\npdf_dpi = 150\n"))
    assert config.load(path).input.pdf_dpi == 150 and config.load(path).result_hash() != plain.result_hash()


def test_expand_gives_page_rows_and_one_error_row_per_unreadable_document(tmp_path):
    files = corpus()
    write_local(tmp_path, files)
    names = ["docs/a.pdf", "img/one.png", "docs/locked.pdf", "docs/broken.pdf", "docs/empty.pdf", "gone.pdf"]
    uris = [str(tmp_path / n) for n in names]
    embedded = pdf_bytes(3, seed=5)
    table = raw_table(uris + ["shard.tar#k"], ["pdf", "image", "pdf", "pdf", "pdf", "pdf", "pdf"],
                      data=[None] * 6 + [embedded])
    out = pdf.expand(table, StorageOptions(), lambda uri, e: f"{uri}: {getattr(e, 'cause', type(e).__name__)}")
    rows = out.to_pylist()
    assert [r["uri"] for r in rows] == [f"{uris[0]}#page={p}" for p in (1, 2, 3)] + uris[1:] + \
        [f"shard.tar#k#page={p}" for p in (1, 2, 3)]
    assert [r["page"] for r in rows] == [1, 2, 3, None, None, None, None, None, 1, 2, 3]
    assert [r["num_pages"] for r in rows] == [3, 3, 3, None, None, None, 0, None, 3, 3, 3]
    errors = {r["uri"]: r["error"] for r in rows if r["error"]}
    assert set(errors) == set(uris[2:])
    assert "encrypted PDF" in errors[uris[2]] and "corrupt PDF" in errors[uris[3]]
    assert "no pages" in errors[uris[4]] and "FileNotFoundError" in errors[uris[5]]
    # an embedded document travels as one-page PDFs, one per row; a loose one is opened when its page is decoded
    import pypdfium2

    singles = [r["data"] for r in rows[-3:]]
    assert all(len(pypdfium2.PdfDocument(d)) == 1 for d in singles) and rows[0]["data"] is None


def test_decode_renders_each_page_and_a_page_that_fails_is_its_own_error(tiny_gqa, tmp_path):
    doc = tmp_path / "d.pdf"
    doc.write_bytes(pdf_bytes(3, seed=1))
    items = [Item(item_id(pdf.page_uri(str(doc), p)), pdf.page_uri(str(doc), p), "pdf", tasks=["caption"], page=p,
                  num_pages=3) for p in (1, 2, 3, 4)]   # page 4: the document has 3 now (rewritten since read)
    settings = DecodeSettings(str(tiny_gqa), 0, 0, 0, 10**8, StorageOptions())
    got = from_table(decode_batch(to_table(items), settings))
    assert [g.error is None for g in got] == [True, True, True, False]
    assert got[3].error == f"{doc}#page=4: the document has 3 pages now (changed since it was read?)"
    budget = 401408 // 2   # the tiny checkpoint's max_pixels, counted over its temporal patch of 2 frames
    for g in got[:3]:
        assert g.frames_shape[0] == 1 and g.width * g.height <= budget and g.width * g.height > 0.95 * budget
        assert g.page in (1, 2, 3) and g.num_pages == 3
    assert got[0].frames != got[1].frames   # each page its own picture
    # input.pdf_dpi: a fixed resolution, whatever the budget
    fixed = DecodeSettings(str(tiny_gqa), 0, 0, 0, 10**8, StorageOptions(), pdf_dpi=36)
    one = from_table(decode_batch(to_table(items[:1]), fixed))[0]
    assert (one.width, one.height) == (306, 396)


# --- end to end ------------------------------------------------------------------------------------------------


def test_loose_pdfs_and_a_manifest_locally(local_ray, tiny_gqa, tmp_path):
    root = tmp_path / "corpus"
    write_local(root, corpus())
    name_of = lambda uri: os.path.relpath(uri, root)   # noqa: E731
    _, summary = _run(tmp_path, f'uri = "{root}"\n', tiny_gqa, tasks=("caption", "ocr"))
    check_rows(pd.read_parquet(tmp_path / "out"), name_of, tasks=("caption", "ocr"))
    # the run's report: a thumbnail of each page, named by its document and page
    html = (tmp_path / "out" / "_state" / "report.html").read_text()
    for name, count in PAGES.items():
        for page in range(1, count + 1):
            label = f"{name.rsplit('/', 1)[-1]} · page {page} of {count}"
            assert re.search(f'<img src="data:image/jpeg;base64,[^"]+" alt="{re.escape(label)}"', html), label
    assert "no preview: encrypted PDF" in html
    # the same files named by a manifest
    names = sorted(corpus())
    pd.DataFrame({"uri": [str(root / n) for n in names]}).to_csv(tmp_path / "m.csv", index=False)
    _run(tmp_path, f'manifest = "{tmp_path / "m.csv"}"\n', tiny_gqa, out=str(tmp_path / "out2"))
    check_rows(pd.read_parquet(tmp_path / "out2"), name_of)


def test_loose_pdfs_and_webdataset_shards_on_s3(s3, local_ray, tiny_gqa, tmp_path):
    fs, files = s3fs_for(s3), corpus()
    fs.mkdir("pdfs")
    for name, data in files.items():
        fs.pipe(f"pdfs/loose/{name}", data)
    _run(tmp_path, 'uri = "s3://pdfs/loose/"\n', tiny_gqa, endpoint=s3, out="s3://pdfs/out-loose/")
    check_rows(read_output("s3://pdfs/out-loose/", s3).to_pandas(), lambda u: u.split("/loose/", 1)[1])
    # in WebDataset shards: a member's key names the document
    names = sorted(files)
    for s, part in enumerate((names[:5], names[5:])):
        fs.pipe(f"pdfs/wds/{s:06d}.tar", _tar([(n.replace("/", "_"), files[n]) for n in part]))
    _run(tmp_path, 'uri = "s3://pdfs/wds/"\nformat = "webdataset"\n', tiny_gqa, endpoint=s3, out="s3://pdfs/out-wds/")
    by_key = {n.replace("/", "_").rsplit(".", 1)[0]: n for n in names}
    df = read_output("s3://pdfs/out-wds/", s3).to_pandas()
    check_rows(df, lambda uri: by_key[uri.rsplit("#", 1)[1]])
    assert set(df.key) == set(by_key)   # every page of a document keeps its sample's key


def test_pdfs_in_a_parquet_bytes_column(local_ray, tiny_gqa, tmp_path):
    files = corpus()
    names = sorted(files)
    (tmp_path / "p").mkdir()
    pq.write_table(pa.table({"name": names, "doc": [files[n] for n in names]}), tmp_path / "p" / "a.parquet")
    _run(tmp_path, f'uri = "{tmp_path / "p"}"\nformat = "parquet"\nbytes_column = "doc"\nkey_column = "name"\n',
         tiny_gqa)
    check_rows(pd.read_parquet(tmp_path / "out"), lambda uri: uri.rsplit("#", 1)[1])   # pages sniffed as PDFs


def test_kill_dash_9_mid_document_then_resume_gives_every_page_once(tiny_gqa, tmp_path):
    pages = 32
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "long.pdf").write_bytes(pdf_bytes(pages, seed=3))
    out = tmp_path / "out"
    cfg_path = tmp_path / "run.toml"
    cfg_path.write_text(config_text(str(tmp_path / "in"), str(out), str(tiny_gqa)))
    cmd = [PY, str(REPO / "jobs" / "caption.py"), "--config", str(cfg_path), "--set", "ray.num_cpus=2",
           "--set", "run.batch_size=2", "--set", "run.max_new_tokens=32", "--set", "output.rows_per_file=4",
           "--set", "batching.decode_batch_size=4"]
    kill_mid_run(cmd, out, tmp_path / "first.log")   # the driver and its whole local Ray, mid document
    before = pd.read_parquet(out)
    assert 0 < len(before) < pages
    second = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    skipped = int(re.search(r"skipped as already done: (\d+)", second.stdout).group(1))
    done = int(re.search(r"done: (\d+) \(item, task\) rows", second.stdout).group(1))
    assert (skipped, done) == (len(before), pages - len(before))   # the finished pages are not redone
    df = pd.read_parquet(out)
    assert sorted(df.page) == list(range(1, pages + 1)) and not df.duplicated(["id", "task"]).any()
    assert df.error.isna().all() and (df.num_pages == pages).all()


def test_a_long_document_on_s3_is_counted_from_a_small_part_and_copied_once_to_draw(s3):
    """Counting the pages of a 2,000-page PDF on a store reads a small part of it; drawing pages copies it once per
    worker (PDFium walks a flat page tree through every page before the one drawn: through the store, page 1,500
    read 87% of the document), again only once it is rewritten."""
    from unittest import mock

    fs = s3fs_for(s3)
    fs.mkdir("pdf-reads")
    data = pdf_bytes(2000, seed=4)
    fs.pipe("pdf-reads/long.pdf", data)
    opts, uri = StorageOptions(endpoint_url=s3, retries=1), "s3://pdf-reads/long.pdf"
    caches, real = [], pdf._open   # each handle's read cache, which counts the bytes asked of the store
    with mock.patch.object(pdf, "_open", side_effect=lambda source: caches.append(source.cache) or real(source)):
        counted = pdf.expand(raw_table([uri], ["pdf"]), opts, lambda u, e: f"{u}: {e}")
    assert counted.num_rows == 2000 and counted["num_pages"][0].as_py() == 2000
    assert len(caches) == 1 and 0 < caches[0].total_requested_bytes < len(data) / 4, (caches, len(data))
    copies = pdf.LocalCopies(keep=1)
    with mock.patch.object(pdf, "_COPIES", copies):
        stamps = []
        for page in (1500, 3, 1999):   # three decode tasks of one worker
            with pdf.Pages(opts, 0, 200_000, 10**8) as pages:
                assert pages.image(pdf.page_uri(uri, page), page, None).width > 0
            (copy,) = copies.files.values()
            stamps.append((copy, os.stat(copy).st_mtime_ns, os.stat(copy).st_size))
        assert len(set(stamps)) == 1 and stamps[0][2] == len(data)   # copied once, whole
        fs.pipe("pdf-reads/long.pdf", pdf_bytes(3, seed=5))   # rewritten: copied again
        with pdf.Pages(opts, 0, 200_000, 10**8) as pages, pytest.raises(pdf.DocumentError, match="has 3 pages now"):
            pages.image(pdf.page_uri(uri, 1500), 1500, None)
        assert os.listdir(copies.folder) == [os.path.basename(p) for p in copies.files.values()]   # old one gone
        assert list(copies.files.values()) != [stamps[0][0]]


def test_a_document_that_kills_its_read_task_is_one_error_row(tiny_gqa, tmp_path):
    """PDFium is native code: a document it dies on while its pages are counted (a test hook sends the read task's
    worker SIGSEGV) is retried a bounded number of times, then one error row; the other documents run."""
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    (corpus / "good.pdf").write_bytes(pdf_bytes(2, seed=1))
    (corpus / "poison.pdf").write_bytes(pdf_bytes(2, seed=2))
    cfg = tmp_path / "run.toml"
    cfg.write_text(config_text(str(corpus), str(out), str(tiny_gqa)))
    result = run_job(cfg, "ray.num_cpus=2", "run.max_new_tokens=3", env={"GLMV_TEST_CRASH_ON": "read:poison.pdf"},
                     timeout=400)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    df = pd.read_parquet(out)
    assert sorted(df.uri) == [f"{corpus / 'good.pdf'}#page=1", f"{corpus / 'good.pdf'}#page=2",
                              str(corpus / "poison.pdf")]
    bad = df[df.uri == str(corpus / "poison.pdf")].error.iloc[0]
    assert bad.startswith(f"{corpus / 'poison.pdf'}: worker crashed while opening the PDF"), bad
    assert df[df.page.notna()].error.isna().all()
