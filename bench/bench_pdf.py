"""PDF corpora: the whole job's pages/s vs rendering the same pages and running transformers, in one run; the
render cost per page; the peak memory of a decode worker going through one 2,000-page PDF.

    .venv/bin/python bench/bench_pdf.py [--pages 200] [--pages-per-doc 50] [--batch-size 8] [--max-new-tokens 32] \\
        [--threads 1] [--model PATH] [--long-doc-pages 2000]

Work: `--pages` pages in PDFs of `--pages-per-doc` pages (pipeline.corpus.pdf_bytes: US Letter, a picture a page),
task `text` (GLM-OCR's "Text Recognition:"), greedy, up to `--max-new-tokens`, float32 CPU, on `--model` (default: a
tiny random GLM-OCR checkpoint made here). Sides:
- transformers: each page rendered with pypdfium2 at the resolution the job picks (pipeline.pdf.render_scale: the
  processor's pixel budget), then transformers' processor + `AutoModelForImageTextToText.generate` (the
  checkpoint's own class) in batches of `--batch-size` pages; model load and rendering inside the timed span;
- job: `jobs/caption.py` as a subprocess on the folder of PDFs, start-up included (Ray, model load, page counting,
  rendering in decode tasks, writing the Parquet and the report).
Prints pages/s per side and their ratio, peak RSS (the job: its process tree, its model actor, its largest decode
worker), render ms per page (PDFium alone, and with the processor's resize), and the peak RSS of one process that
decodes every page of a `--long-doc-pages`-page PDF block by block as the job's decode workers do, against the
same process before its first page.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "text"   # GLM-OCR's own prompt for plain text ("Text Recognition:")
REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.bench_pipeline import BASE_ENV, TreeMemory, generated_count, launch_job  # noqa: E402


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def make_corpus(folder: Path, pages: int, per_doc: int) -> list[Path]:
    from pipeline.corpus import pdf_bytes

    folder.mkdir(parents=True, exist_ok=True)
    docs = []
    for d, start in enumerate(range(0, pages, per_doc)):
        path = folder / f"doc_{d:04d}.pdf"
        path.write_bytes(pdf_bytes(min(per_doc, pages - start), seed=d))
        docs.append(path)
    return docs


def job_config(args) -> dict:
    return {
        "input": {"uri": args.corpus}, "output": {"uri": args.out, "rows_per_file": 256},
        "model": {"path": args.model, "dtype": "float32", "device": "cpu"},
        "run": {"tasks": [TASK], "batch_size": args.batch_size, "max_new_tokens": args.max_new_tokens},
        "actors": {"count": 1, "num_gpus": 0, "num_cpus": args.threads},
        "ray": {"address": "local", "num_cpus": args.threads + 1},
    }


def page_budget(model: str) -> tuple[int, int]:
    """(pixels a page is rendered to, max_input_pixels) as the job's decode stage computes them."""
    from pipeline.config import BatchingConfig
    from pipeline.media import MediaLoader

    image = MediaLoader(model).processor.image_settings
    return image.max_pixels // image.temporal_patch_size, BatchingConfig().max_input_pixels


def pages_of(corpus: str):
    """(document, 0-based page) of every page, documents in name order."""
    import pypdfium2 as pdfium

    for path in sorted(Path(corpus).glob("*.pdf")):
        with pdfium.PdfDocument(str(path)) as doc:
            count = len(doc)
        for index in range(count):
            yield path, index


def render_all(corpus: str, model: str):
    """Each page as a Pillow image at the job's resolution, one at a time."""
    import pypdfium2 as pdfium

    from pipeline import pdf

    budget, max_pixels = page_budget(model)
    scale_of = lambda w, h: pdf.render_scale(w, h, 0, budget, max_pixels)   # noqa: E731
    current, doc = None, None
    for path, index in pages_of(corpus):
        if path != current:
            if doc is not None:
                doc.close()
            current, doc = path, pdfium.PdfDocument(str(path))
        yield f"{path}#page={index + 1}", pdf.render_page(doc, index, scale_of)
    if doc is not None:
        doc.close()


def run_transformers(args) -> dict:
    import torch
    import transformers

    from pipeline.config import BUILTIN_TASKS

    torch.set_num_threads(args.threads)
    prompt = BUILTIN_TASKS[TASK][0].replace("{media}", "page")
    start = time.perf_counter()
    processor = transformers.AutoProcessor.from_pretrained(args.model)
    processor.tokenizer.padding_side = "left"
    model = transformers.AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    rows, batch = {}, []

    def flush():
        convs = [[{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": prompt}]}]
                 for _, img in batch]
        inputs = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                               return_tensors="pt", processor_kwargs={"padding": True})
        with torch.inference_mode():
            out = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        new = out[:, inputs["input_ids"].shape[1]:]
        for (uri, _), ids in zip(batch, new.tolist()):
            rows[uri] = generated_count(ids, eos)
        batch.clear()

    for uri, image in render_all(args.corpus, args.model):
        batch.append((uri, image))
        if len(batch) == args.batch_size:
            flush()
    if batch:
        flush()
    return {"seconds": time.perf_counter() - start, "peak_rss_mb": peak_rss_mb(), "pages": len(rows)}


class JobMemory(TreeMemory):
    """TreeMemory, plus the largest peak of the job's decode workers."""

    def __init__(self, root: int):
        self.decode_kb = 0
        super().__init__(root)

    def _worker(self, pid: str, status: dict[str, int]) -> None:
        super()._worker(pid, status)
        if b"decode_batch" in Path(f"/proc/{pid}/cmdline").read_bytes():
            self.decode_kb = max(self.decode_kb, status.get("VmHWM", 0))

    def stop(self) -> dict:
        return {**super().stop(), "decode_peak_rss_mb": self.decode_kb / 1024}


def run_job(args, workdir: Path) -> dict:
    import pyarrow.dataset as pads

    result = launch_job(job_config(args), workdir, JobMemory)
    table = pads.dataset(args.out, format="parquet").to_table(columns=["uri", "page", "error"])
    result["pages"] = table.num_rows
    result["errors"] = table["error"].drop_null().to_pylist()[:3]
    return result


def render_cost(args, sample: int = 100) -> dict:
    """ms per page: PDFium drawing the page at the job's resolution, then with the processor's resize on top."""
    from pipeline.media import MediaLoader

    loader = MediaLoader(args.model)
    pages = render_all(args.corpus, args.model)
    rendered, start = [], time.perf_counter()
    for _, image in pages:
        rendered.append(image)
        if len(rendered) == sample:
            break
    render_s = time.perf_counter() - start
    start = time.perf_counter()
    for image in rendered:
        loader.load("image", image)
    resize_s = time.perf_counter() - start
    size = rendered[0].size
    return {"pages": len(rendered), "render_ms": 1000 * render_s / len(rendered),
            "resize_ms": 1000 * resize_s / len(rendered), "size": size}


def long_document(args) -> dict:
    """In a process of its own: count the pages of one long PDF as a read task does, then decode every page in
    blocks of batching.decode_batch_size as decode workers do; peak RSS before the first page and at the end."""
    from pipeline import pdf
    from pipeline.config import BatchingConfig
    from pipeline.decode import DecodeSettings, decode_batch, describe_error
    from pipeline.items import Item, item_id, to_table
    from pipeline.readers import raw_table
    from pipeline.storage import StorageOptions

    path = Path(args.long_doc)
    settings = DecodeSettings(args.model, 0, 0, 0, BatchingConfig().max_input_pixels, StorageOptions(),
                              run_tag=f"bench-pdf-{os.getpid()}")
    decode_batch(to_table([]), settings)   # the processor loaded, as in a warm worker
    before = peak_rss_mb()
    start = time.perf_counter()
    rows = pdf.expand(raw_table([str(path)], ["pdf"]), settings.opts, lambda u, e: describe_error(u, e, True))
    count_s = time.perf_counter() - start
    items = [Item(item_id(r["uri"]), r["uri"], "pdf", tasks=[TASK], page=r["page"], num_pages=r["num_pages"],
                  error=r["error"]) for r in rows.to_pylist()]
    block, errors, start = BatchingConfig().decode_batch_size, 0, time.perf_counter()
    for i in range(0, len(items), block):
        out = decode_batch(to_table(items[i:i + block]), settings)
        errors += out.num_rows - out["error"].null_count
        del out
    return {"pages": len(items), "errors": errors, "count_s": count_s, "decode_s": time.perf_counter() - start,
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb(), "file_mb": path.stat().st_size / 2**20}


def in_process(args, side: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--model", args.model, "--corpus", args.corpus,
                           "--long-doc", str(args.long_doc or ""), "--side", side], capture_output=True, text=True,
                          env={**BASE_ENV, **os.environ})
    if proc.returncode != 0:
        raise RuntimeError(f"{side} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=200, help="pages in the corpus (10000 for the 1e4 figure)")
    parser.add_argument("--pages-per-doc", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the model (both sides)")
    parser.add_argument("--long-doc-pages", type=int, default=2000, help="pages of the decode-memory document")
    parser.add_argument("--model", help="checkpoint folder (default: a tiny random GLM-OCR one, made here)")
    parser.add_argument("--side", choices=["transformers", "render", "long"], help=argparse.SUPPRESS)
    parser.add_argument("--corpus", help=argparse.SUPPRESS)
    parser.add_argument("--long-doc", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main() -> int:
    args = parse_args()
    if args.side:
        fn = {"transformers": run_transformers, "render": render_cost, "long": long_document}[args.side]
        print(json.dumps(fn(args)))
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-pdf-") as tmp:
        tmp = Path(tmp)
        if not args.model:
            from glmv.testing import make_tiny_checkpoint

            args.model = str(make_tiny_checkpoint(tmp / "model", preset="ocr", family="glm46v", seed=0))
        args.corpus, args.out = str(tmp / "corpus"), str(tmp / "output")
        docs = make_corpus(Path(args.corpus), args.pages, args.pages_per_doc)
        from pipeline.corpus import pdf_bytes

        args.long_doc = tmp / "long" / "long.pdf"
        args.long_doc.parent.mkdir()
        args.long_doc.write_bytes(pdf_bytes(args.long_doc_pages, seed=99))
        (tmp / "job").mkdir()
        job = run_job(args, tmp / "job")
        print(f"[job: {job['seconds']:.1f}s]", file=sys.stderr, flush=True)
        ref = in_process(args, "transformers")
        print(f"[transformers: {ref['seconds']:.1f}s]", file=sys.stderr, flush=True)
        render = in_process(args, "render")
        long = in_process(args, "long")
    print(f"work: {args.pages} pages in {len(docs)} PDFs, task {TASK}, up to {args.max_new_tokens} new tokens, greedy, "
          f"batch {args.batch_size}, {args.threads} torch thread(s), CPU float32, model {args.model}")
    print(f"{'side':>13} {'pages/s':>8} {'wall s':>7} {'peak RSS MiB':>13}")
    for side, r in (("transformers", ref), ("job", job)):
        memory = f"{r['peak_rss_mb']:13.0f}"
        if side == "job":
            memory += (f"  (sum over its processes; model actor {r['actor_peak_rss_mb']:.0f}, largest decode worker "
                       f"{r['decode_peak_rss_mb']:.0f})")
        print(f"{side:>13} {r['pages'] / r['seconds']:8.3f} {r['seconds']:7.1f} {memory}")
    print(f"ratio job/transformers (pages/s): {(job['pages'] / job['seconds']) / (ref['pages'] / ref['seconds']):.3f}"
          f"; rows: job {job['pages']} ({len(job['errors'])} errors {job['errors']}), transformers {ref['pages']}")
    print(f"render per page ({render['size'][0]}x{render['size'][1]} px, {render['pages']} pages): PDFium "
          f"{render['render_ms']:.1f} ms, processor resize {render['resize_ms']:.1f} ms")
    print(f"long document: {long['pages']} pages ({long['file_mb']:.1f} MiB), pages counted in {long['count_s']:.2f}s, "
          f"all decoded in {long['decode_s']:.1f}s ({long['errors']} errors); decode worker peak RSS "
          f"{long['peak_rss_mb']:.0f} MiB (before the first page: {long['rss_before_mb']:.0f} MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
