"""PDF documents as items, one per page, rendered with PDFium (pypdfium2).

Read side (`expand`): a raw row naming a PDF becomes one row per page, uri `<document uri>#page=<n>` (1-based), with
`page` and `num_pages`; each page has its own item id, so exactly-once and resume work page by page. Only the page
count is read there, through a file handle that PDFium reads on demand (its cross-reference table and page tree:
14% of a flat 2,000-page document). A PDF embedded in the input (a tar member, Parquet bytes) is split into one-page
PDFs, so that its pages travel as separate rows too. A document that cannot be opened (encrypted, corrupt, no pages)
is one error row naming it and the cause; one that kills the read task's worker, too (pipeline.poison).

Decode side (`Pages`): a page is rendered when its decode task reaches it, at the resolution that fills the model's
pixel budget (or `input.pdf_dpi`), handed to the processor and dropped; a block's pages of one document share one
open document, and a document on a store is copied to the worker's disk once (`LocalCopies`). PDFium is not
thread-safe: every call into it holds one lock.
"""

from __future__ import annotations

import atexit
import collections
import contextlib
import hashlib
import io
import math
import os
import shutil
import tempfile
import threading

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import storage
from pipeline.poison import CrashGuard, crash_message, inject_crash
from pipeline.storage import StorageOptions

PAGE_MARK = "#page="
POINTS_PER_INCH = 72.0
# bytes per read of a document on a store: s3fs reads 50 MiB blocks by default, the whole of most PDFs for the page
# count alone; PDFium reads the cross-reference table, the page tree and the page drawn, a few small ranges
READ_BLOCK = 1 << 20
_LOCK = threading.RLock()
_ERR_FORMAT, _ERR_PASSWORD, _ERR_SECURITY = 3, 4, 5
NO_PAGES = "PDF has no pages"


class DocumentError(ValueError):
    """A PDF that cannot be read or a page that cannot be rendered; `cause` is said after its URI."""

    def __init__(self, cause: str):
        super().__init__(cause)
        self.cause = cause


def page_uri(document: str, page: int) -> str:
    return f"{document}{PAGE_MARK}{page}"


def document_uri(uri: str) -> str:
    return uri.rsplit(PAGE_MARK, 1)[0]


def _open(source):
    """A pypdfium2 document from bytes or a seekable handle; raises DocumentError saying why not.

    Loaded through PDFium's own calls: pypdfium2's constructor takes a document without pages for a failed load and
    reports PDFium's last error, which is then the error of an earlier document (PDFium only sets it on failure)."""
    import pypdfium2 as pdfium
    import pypdfium2.internal as pdfium_i
    import pypdfium2.raw as pdfium_c

    with _LOCK:
        hold = (source,)
        if isinstance(source, bytes):
            raw = pdfium_c.FPDF_LoadMemDocument64(source, len(source), None)
        else:
            access, held = pdfium_i.get_bufreader(source)
            hold += (access, *held)
            raw = pdfium_c.FPDF_LoadCustomDocument(access, None)
        if not raw:
            code = pdfium_c.FPDF_GetLastError()
            if code in (_ERR_PASSWORD, _ERR_SECURITY):
                raise DocumentError("encrypted PDF: it needs a password to open")
            what = "corrupt PDF" if code == _ERR_FORMAT else "unreadable PDF"
            raise DocumentError(f"{what} (PDFium: {pdfium_i.ErrorToStr.get(code, code)})")
        doc = pdfium.PdfDocument(raw)
        doc.held_inputs = hold   # what PDFium reads from, alive as long as the document
        if len(doc) == 0:
            doc.close()
            raise DocumentError(NO_PAGES)
        return doc


@contextlib.contextmanager
def opened(uri: str, data: bytes | None, opts: StorageOptions):
    """The open document of `uri` (or of its embedded bytes), closed on exit. A file is read through a seekable
    handle: PDFium reads only the parts it needs (its cross-reference table, the page tree, the pages drawn)."""
    if data is not None:
        handle, doc = None, _open(data)
    else:
        fs, path = storage.filesystem(uri, opts)
        handle = storage.fetch_with_retries(lambda: fs.open(path, "rb", block_size=READ_BLOCK), uri, opts)
        try:
            doc = storage.fetch_with_retries(lambda: _open(handle), uri, opts)
        except BaseException:
            handle.close()
            raise
    try:
        yield doc
    finally:
        with _LOCK:
            doc.close()
        if handle is not None:
            handle.close()


# --- read side -----------------------------------------------------------------------------------------------


def expand(table: pa.Table, opts: StorageOptions, describe, run_tag: str = "") -> pa.Table:
    """Raw rows with each PDF row (media_type 'pdf', no error yet) replaced by its page rows, or by one error row.
    `describe(uri, exc)`: an item error's text. An outage of the store raises (the run stops, nothing recorded). A
    document that killed the read task's worker while it was opened (pipeline.poison) is an error row too."""
    if not pc.any(pc.equal(table["media_type"], "pdf")).as_py():   # most pieces: no PDF, nothing converted
        return table
    types, errors = table["media_type"].to_pylist(), table["error"].to_pylist()
    uris, data = table["uri"].to_pylist(), table["data"].to_pylist()
    guard = CrashGuard(run_tag, "read", [u for u, k, e in zip(uris, types, errors) if k == "pdf" and e is None])
    take, new_uris, new_data, new_errors, pages, counts = [], [], [], [], [], []
    for row, (uri, kind, blob, error) in enumerate(zip(uris, types, data, errors)):
        if kind == "pdf" and error is None and guard.gave_up(str(row)):
            error = crash_message(storage.redact(uri), "opening the PDF", guard.poisoned(str(row)))
        if kind != "pdf" or error is not None:
            take.append(row), new_uris.append(uri), new_data.append(blob), new_errors.append(error)
            pages.append(None), counts.append(None)
            continue
        guard.at(str(row))
        inject_crash("read", uri)
        for page, count, page_data, page_error in _document_rows(uri, blob, opts, describe):
            take.append(row), new_data.append(page_data), new_errors.append(page_error)
            new_uris.append(page_uri(uri, page) if page else uri)
            pages.append(page), counts.append(count)
    guard.finished()
    out = table.take(pa.array(take, pa.int64()))
    for name, values, kind in (("uri", new_uris, pa.string()), ("data", new_data, pa.large_binary()),
                               ("error", new_errors, pa.string())):
        out = out.set_column(out.column_names.index(name), name, pa.array(values, kind))
    return out.append_column("page", pa.array(pages, pa.int32())).append_column("num_pages",
                                                                               pa.array(counts, pa.int32()))


def _document_rows(uri: str, data: bytes | None, opts: StorageOptions, describe):
    """(page, num_pages, one-page PDF bytes or None, error) per page of the document; (None, count, None, error)
    once when it cannot be opened."""
    try:
        with opened(uri, data, opts) as doc:
            count = len(doc)
            if data is None:   # fetched page by page when decoded
                return [(n, count, None, None) for n in range(1, count + 1)]
            rows = []
            for n in range(1, count + 1):
                page_data, cause = _one_page(doc, n)
                rows.append((n, count, page_data, cause and f"{storage.redact(page_uri(uri, n))}: {cause}"))
            return rows
    except Exception as e:  # noqa: BLE001 - the document's own failure is its error row; an outage stops the run
        if storage.classify(e) is storage.Fault.OUTAGE:
            raise
        count = 0 if isinstance(e, DocumentError) and e.cause == NO_PAGES else None
        return [(None, count, None, describe(uri, e))]


def _one_page(doc, page: int) -> tuple[bytes | None, str | None]:
    """Page `page` of an embedded document as a PDF of its own (its fonts and images come along), or why not."""
    import pypdfium2 as pdfium

    with _LOCK:
        single = pdfium.PdfDocument.new()
        try:
            single.import_pages(doc, [page - 1])
            buf = io.BytesIO()
            single.save(buf)
            return buf.getvalue(), None
        except Exception as e:  # noqa: BLE001 - one page's failure is that page's error row
            return None, f"page could not be taken out of the document ({type(e).__name__}: {e})"
        finally:
            single.close()


# --- decode side ---------------------------------------------------------------------------------------------


class LocalCopies:
    """Documents on a store, copied whole to this process's temporary folder when a page of theirs is first drawn,
    the last `keep` of them kept. PDFium finds a page by walking the page tree, which in a flat one (one /Kids list
    of every page) loads the page objects before it: through a store handle, drawing page 1,500 of a 2,000-page
    document read 87% of it, again in every decode task holding some of its pages; a copy is read once per worker.
    A copy is known by the object's size and version, so a document rewritten since is copied again."""

    def __init__(self, keep: int = 4):
        self.keep, self.folder, self.files = keep, None, collections.OrderedDict()

    def local(self, uri: str, opts: StorageOptions) -> str:
        fs, path = storage.filesystem(uri, opts)
        if storage.is_local(fs):
            return uri
        info = storage.fetch_with_retries(lambda: fs.info(path), uri, opts)
        key = hashlib.sha256(f"{uri}\0{storage.file_stamp(info)}".encode()).hexdigest()[:32]
        if key in self.files:
            self.files.move_to_end(key)
            return self.files[key]
        if self.folder is None:
            self.folder = tempfile.mkdtemp(prefix="glmv-pdf-")
            atexit.register(shutil.rmtree, self.folder, True)
        target = os.path.join(self.folder, f"{key}.pdf")
        storage.fetch_with_retries(lambda: fs.get_file(path, target), uri, opts)
        self.files[key] = target
        while len(self.files) > self.keep:
            _, old = self.files.popitem(last=False)
            with contextlib.suppress(OSError):
                os.remove(old)
        return target


_COPIES = LocalCopies()   # one per decode worker process


def render_scale(width_pt: float, height_pt: float, dpi: float, budget: int, max_pixels: int) -> float:
    """Pixels per point: `dpi` / 72, or (dpi 0) the scale whose render fills `budget` pixels (the processor's own
    limit per image: rendering more would only be thrown away by its resize) and `max_pixels`
    (batching.max_input_pixels). Raises DocumentError where `dpi` would make a render over `max_pixels`."""
    area = max(width_pt * height_pt, 1e-6)
    if dpi:
        scale = dpi / POINTS_PER_INCH
    else:
        scale = math.sqrt(min(budget, max_pixels) / area)
        # PDFium rounds each side to whole pixels: leave room for that half pixel a side
        scale *= math.sqrt(area * scale * scale / ((width_pt * scale + 1) * (height_pt * scale + 1)))
    if area * scale * scale > max_pixels:
        raise DocumentError(f"rendering this {width_pt:.0f}x{height_pt:.0f} pt page at {scale * 72:.0f} dpi makes "
                            f"{area * scale * scale:.0f} pixels, over batching.max_input_pixels = {max_pixels}")
    return scale


class Pages:
    """Renders the pages of one decode task's items; keeps the last document opened, as a block holds runs of one
    document's pages in order. Use as a context manager (closes it)."""

    def __init__(self, opts: StorageOptions, dpi: float, budget: int, max_pixels: int):
        self.opts, self.dpi, self.budget, self.max_pixels = opts, dpi, budget, max_pixels
        self.uri, self.doc, self.stack = None, None, contextlib.ExitStack()

    def __enter__(self) -> "Pages":
        return self

    def __exit__(self, *exc) -> None:
        self._close()

    def _close(self) -> None:
        self.stack.close()
        self.uri, self.doc = None, None

    def image(self, uri: str, page: int, data: bytes | None):
        """The page as an RGB Pillow image. `data`: a one-page PDF of it (embedded input), else the document at
        `uri` is opened (once for its run of pages)."""
        if data is not None:
            with opened(uri, data, self.opts) as doc:
                return self._render(doc, 0)
        document = document_uri(uri)
        if document != self.uri:
            self._close()
            self.doc = self.stack.enter_context(opened(_COPIES.local(document, self.opts), None, self.opts))
            self.uri = document
        if not 1 <= page <= len(self.doc):
            raise DocumentError(f"the document has {len(self.doc)} pages now (changed since it was read?)")
        return self._render(self.doc, page - 1)

    def _render(self, doc, index: int):
        return render_page(doc, index, lambda w, h: render_scale(w, h, self.dpi, self.budget, self.max_pixels))


def render_page(doc, index: int, scale_of):
    """Page `index` (0-based) as an RGB Pillow image, at the scale `scale_of(width_pt, height_pt)` gives."""
    with _LOCK:
        page = doc[index]
        try:
            scale = scale_of(*page.get_size())
            try:
                bitmap = page.render(scale=scale, may_draw_forms=True)
                image = bitmap.to_pil().convert("RGB")   # a copy: the bitmap's buffer goes with it
                bitmap.close()
            except Exception as e:  # noqa: BLE001 - PDFium's failure to draw one page
                raise DocumentError(f"page failed to render ({type(e).__name__}: {e})") from None
            return image
        finally:
            page.close()


def page_of(uri: str) -> int | None:
    """The page number a page item's uri ends with, or None."""
    tail = uri.rsplit(PAGE_MARK, 1)[1] if PAGE_MARK in uri else ""
    return int(tail) if tail.isdigit() else None
