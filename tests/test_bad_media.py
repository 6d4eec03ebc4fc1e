"""Every kind of bad media raises glmv.errors.MediaError naming the input and the cause, quickly."""

import io
import pickle
import struct
import time
import zlib

import av
import numpy as np
import pytest
from PIL import Image
from test_processor_media import TINY_IMAGE, TINY_VIDEO, make_video

from glmv.errors import MediaError
from glmv.image import PatchSettings, load_image
from glmv.processor import Glm4vProcessor
from glmv.video import VideoSettings, load_video

IMAGE = PatchSettings(**TINY_IMAGE)
VIDEO = VideoSettings(**TINY_VIDEO)


def _png_bytes(h=40, w=60):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _png_header_only(width, height):
    """A PNG whose header announces width x height but holds almost no data (a decompression bomb's header)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


@pytest.fixture
def timed():
    start = time.perf_counter()
    yield
    assert time.perf_counter() - start < 10, "bad input must fail fast, never hang"


def _raises(fn, source, *message_parts):
    with pytest.raises(MediaError) as info:
        fn(source)
    text = str(info.value)
    for part in message_parts:
        assert part in text, text
    return info.value


def load_img(source, **kw):
    return load_image(source, IMAGE, **kw)


def load_vid(source):
    return load_video(source, VIDEO)


@pytest.mark.parametrize("loader,cause", [(load_img, "not a decodable image"), (load_vid, "not a decodable video")])
def test_corrupt_bytes(tmp_path, timed, loader, cause):
    path = tmp_path / "noise.bin"
    path.write_bytes(np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes())
    _raises(loader, path, str(path), cause)
    _raises(loader, path.read_bytes(), "<bytes: 5000 bytes>", cause)


@pytest.mark.parametrize("loader", [load_img, load_vid])
def test_zero_bytes(tmp_path, timed, loader):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")
    _raises(loader, path, str(path), "empty file (0 bytes)")
    _raises(loader, b"", "<bytes: 0 bytes>", "empty file (0 bytes)")
    _raises(loader, io.BytesIO(b""), "empty file (0 bytes)")


def test_unsupported_format(tmp_path, timed):
    svg = tmp_path / "drawing.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="5"/></svg>')
    _raises(load_img, svg, str(svg), "unsupported format")
    _raises(load_vid, svg, str(svg), "unsupported format")
    pdf = tmp_path / "doc.pdf"
    pdf.write_bytes(b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\ntrailer << /Root 1 0 R >>\n%%EOF\n")
    _raises(load_img, pdf, str(pdf), "unsupported format")


def test_aspect_ratio_over_200(tmp_path, timed):
    path = tmp_path / "strip.png"
    Image.new("RGB", (1200, 5)).save(path)  # blown up to 28 x 6720 -> ratio 240
    err = _raises(load_img, path, str(path), "aspect ratio 240.0 is over the limit of 200")
    assert err.source == str(path)
    ok = tmp_path / "ok_strip.png"
    Image.new("RGB", (5000, 30)).save(ok)  # ratio 166: accepted
    assert load_img(ok).pixels.shape[0] == 28


def test_decompression_bomb_refused_before_decoding(tmp_path, timed):
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header_only(100_000, 100_000))  # 10^10 pixels, ~100 bytes on disk
    _raises(load_img, bomb, str(bomb), "decompression bomb", "10000000000 pixels")
    bomb.write_bytes(_png_header_only(12_000, 12_000))  # under Pillow's threshold, over ours
    _raises(lambda s: load_img(s, max_image_pixels=100_000_000), bomb, "12000x12000 = 144000000 pixels")
    # the limit is configurable
    small = _png_bytes(40, 60)
    assert load_img(small, max_image_pixels=2400).pixels.dtype == np.uint8
    _raises(lambda s: load_img(s, max_image_pixels=2399), small, "decompression bomb", "40 = 2400 pixels",
            "limit of 2399")


def test_truncated_image(tmp_path, timed):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(2).integers(0, 256, (300, 400, 3), dtype=np.uint8)).save(buf, "JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    _raises(load_img, path, str(path), "truncated")


def test_video_without_video_stream(tmp_path, timed):
    path = tmp_path / "speech.wav"
    with av.open(str(path), "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), dtype=np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)
    _raises(load_vid, path, str(path), "no video stream", "audio")


@pytest.mark.parametrize("fmt,kwargs", [("mp4", {"faststart": True}), ("mkv", {"fmt": "matroska"})])
def test_truncated_video(tmp_path, timed, fmt, kwargs):
    full = make_video(tmp_path / f"full.{fmt}", 90, 30, **kwargs)
    cut = tmp_path / f"cut.{fmt}"
    cut.write_bytes(full.read_bytes()[: int(full.stat().st_size * 0.3)])
    _raises(load_vid, cut, str(cut), "truncated video", "of the 90")


def test_truncated_mp4_without_index(tmp_path, timed):
    full = make_video(tmp_path / "full.mp4", 90, 30)  # index (moov) written last: a cut file loses it
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    _raises(load_vid, cut, str(cut), "not a decodable video")


def test_missing_file_and_credentials_not_leaked(tmp_path, timed):
    _raises(load_img, tmp_path / "nope.png", "nope.png", "file not found")
    _raises(load_vid, str(tmp_path / "nope.mp4"), "file not found")
    err = _raises(load_img, "http://user:secret@127.0.0.1:9/x.png?X-Amz-Signature=abc", "download failed")
    assert "secret" not in str(err) and "Signature" not in str(err) and "127.0.0.1:9/x.png" in str(err)


def test_processor_reports_the_bad_item_and_error_survives_pickling(tiny_gqa, tmp_path, timed):
    processor = Glm4vProcessor.from_pretrained(tiny_gqa)
    good, bad = tmp_path / "good.png", tmp_path / "bad.png"
    good.write_bytes(_png_bytes())
    bad.write_bytes(b"not an image at all")
    conversation = [{"role": "user", "content": [{"type": "image", "path": str(good)},
                                                 {"type": "image", "path": str(bad)},
                                                 {"type": "text", "text": "Compare."}]}]
    with pytest.raises(MediaError) as info:
        processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True)
    assert info.value.source == str(bad)
    clone = pickle.loads(pickle.dumps(info.value))
    assert type(clone) is MediaError and str(clone) == str(info.value)
