"""Synthetic media for the demo, tests and benchmarks: images and short videos with visible structure
(gradients, shapes, a moving square, a line of text), written with Pillow and PyAV."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

IMAGE_FORMATS = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP", "bmp": "BMP", "gif": "GIF", "tiff": "TIFF"}


def image_array(width: int, height: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    base = rng.integers(0, 255, 3)
    img = np.stack([(x * 255 // max(1, width - 1) + base[0]) % 256, (y * 255 // max(1, height - 1) + base[1]) % 256,
                    ((x + y) * 2 + base[2]) % 256], axis=-1).astype(np.uint8)
    pil = Image.fromarray(img)
    draw = ImageDraw.Draw(pil)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, width // 2 + 1)), int(rng.integers(0, height // 2 + 1))
        draw.rectangle([x0, y0, x0 + width // 4, y0 + height // 4], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    draw.text((4, 4), f"sample {seed}", fill=(255, 255, 255))
    return np.array(pil)


def image_bytes(width: int, height: int, seed: int, ext: str = "png") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image_array(width, height, seed)).save(buf, format=IMAGE_FORMATS[ext])
    return buf.getvalue()


def video_bytes(num_frames: int, fps: int, width: int, height: int, seed: int = 0, container: str = "mp4") -> bytes:
    import av

    codec = {"mp4": "libx264", "mov": "libx264", "mkv": "libx264", "webm": "libvpx", "avi": "mpeg4"}[container]
    fmt = {"mkv": "matroska"}.get(container, container)
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        background = image_array(width, height, seed)
        for i in range(num_frames):
            frame = background.copy()
            s = max(4, min(width, height) // 5)
            x0 = (i * 7) % max(1, width - s)
            frame[height // 3: height // 3 + s, x0: x0 + s] = (255, 32, 32)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def make_demo_corpus(folder: str | Path, num_images: int = 12, num_videos: int = 3) -> Path:
    """A small mixed corpus: several image formats and sizes, a few short videos in different containers."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "videos").mkdir(parents=True, exist_ok=True)
    exts = list(IMAGE_FORMATS)
    for i in range(num_images):
        ext = exts[i % len(exts)]
        w, h = 96 + 40 * (i % 5), 80 + 32 * (i % 4)
        (folder / "images" / f"img_{i:03d}.{ext}").write_bytes(image_bytes(w, h, seed=i, ext=ext))
    containers = ["mp4", "webm", "avi", "mov", "mkv"]
    for i in range(num_videos):
        c = containers[i % len(containers)]
        (folder / "videos" / f"clip_{i:02d}.{c}").write_bytes(
            video_bytes(num_frames=12 + 6 * i, fps=6, width=112, height=84, seed=100 + i, container=c))
    return folder


DISTINCT_PAGES = 32   # drawn pages of a synthetic PDF; longer ones repeat them (PDFium adds drawn pages in O(n))


def pdf_bytes(num_pages: int, seed: int = 0, width_pt: float = 612, height_pt: float = 792,
              picture: tuple[int, int] = (64, 48)) -> bytes:
    """A PDF of `num_pages` pages (US Letter by default), each showing a small picture (image_array of seed +
    page, repeating after DISTINCT_PAGES pages): a few KB a page, a 2,000-page one made in a second."""
    import pypdfium2 as pdfium

    doc = pdfium.PdfDocument.new()
    try:
        for n in range(min(num_pages, DISTINCT_PAGES)):
            _draw_page(doc, width_pt, height_pt, image_array(*picture, seed=seed + n))
        drawn = len(doc)
        while len(doc) < num_pages:
            doc.import_pages(doc, list(range(min(drawn, num_pages - len(doc)))))
        buf = io.BytesIO()
        doc.save(buf)
        return buf.getvalue()
    finally:
        doc.close()


def _draw_page(doc, width_pt: float, height_pt: float, picture: np.ndarray) -> None:
    import pypdfium2 as pdfium

    page = doc.new_page(width_pt, height_pt)
    image = pdfium.PdfImage.new(doc)
    bitmap = pdfium.PdfBitmap.from_pil(Image.fromarray(picture))
    image.set_bitmap(bitmap)
    bitmap.close()
    image.set_matrix(pdfium.PdfMatrix().scale(width_pt * 0.8, height_pt * 0.4).translate(width_pt * 0.1,
                                                                                            height_pt * 0.5))
    page.insert_obj(image)
    page.gen_content()
    page.close()
