"""Media decoding: frame sampling and smart_resize against the reference rules, seeking, input kinds, S3.

Also holds the media writers the other processor tests import (`make_video`, `make_images`).
"""

import fractions
import io
import math
import pathlib
import time

import av
import numpy as np
import pytest
import torch
from PIL import Image

from glmv.errors import MediaError
from glmv.image import PatchSettings, load_image, smart_resize
from glmv.video import VideoSettings, _iter_wanted_frames, load_video, sample_frame_indices

TINY_IMAGE = dict(min_pixels=12544, max_pixels=401408)
TINY_VIDEO = dict(min_pixels=12544, max_pixels=470400)


def make_video(path, n_frames, fps, size=(72, 128), codec="libx264", gop=None, fmt=None, faststart=False,
               pts_ms=None):
    """A clip whose frames all differ (moving gradients), so picking a wrong frame changes the pixels.
    `pts_ms`: each frame's presentation time in milliseconds (a variable frame rate); default every 1/fps s."""
    h, w = size
    options = {"movflags": "faststart"} if faststart else {}
    with av.open(str(path), "w", format=fmt, options=options) as container:
        stream = container.add_stream(codec, rate=fractions.Fraction(fps).limit_denominator(1000))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        if gop:
            stream.codec_context.gop_size = gop
        if pts_ms is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 1000)
        yy, xx = np.mgrid[0:h, 0:w]
        for i in range(n_frames):
            img = np.stack([(xx * 3 + i * 5) % 256, (yy * 2 + i * 11) % 256, (xx + yy + i * 7) % 256], -1)
            frame = av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")
            if pts_ms is not None:
                frame.pts, frame.time_base = pts_ms[i], fractions.Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return pathlib.Path(path)


def _noise(rng, h, w, c=3, dtype=np.uint8, high=256):
    shape = (h, w) if c == 1 else (h, w, c)
    smooth = rng.integers(0, high, size=shape, dtype=np.int64)
    return smooth.astype(dtype)


def make_images(folder) -> dict[str, pathlib.Path]:
    """The parity image set: tiny, extreme aspect ratios, over max_pixels, RGBA, grey, palette, EXIF, WebP, 16-bit."""
    folder = pathlib.Path(folder)
    rng = np.random.default_rng(0)
    out = {}

    def save(name, img, **kw):
        out[name] = folder / name
        img.save(out[name], **kw)

    save("tiny_10x10.png", Image.fromarray(_noise(rng, 10, 10)))
    save("wide_30x2000.png", Image.fromarray(_noise(rng, 30, 2000)))
    save("tall_3000x16.png", Image.fromarray(_noise(rng, 3000, 16)))
    save("large_1500x2100.jpg", Image.fromarray(_noise(rng, 1500, 2100)), quality=90)
    save("odd_333x517.png", Image.fromarray(_noise(rng, 333, 517)))
    save("rgba_200x300.png", Image.fromarray(_noise(rng, 200, 300, 4)))
    save("grey_257x190.png", Image.fromarray(_noise(rng, 257, 190, 1)))
    pal = Image.fromarray(_noise(rng, 120, 160)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 3
    save("palette_trns_120x160.png", pal, transparency=3)
    exif_img = Image.fromarray(_noise(rng, 150, 260))
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 CW to display
    save("exif_rot6_150x260.jpg", exif_img, exif=exif.tobytes(), quality=92)
    save("webp_181x243.webp", Image.fromarray(_noise(rng, 181, 243)), quality=80)
    save("gray16_140x100.png", Image.fromarray(_noise(rng, 140, 100, 1, np.uint16, 65536)))
    save("cmyk_90x120.jpg", Image.fromarray(_noise(rng, 90, 120, 4)).convert("CMYK"))
    return out


# ---- frame sampling and sizing: exhaustive comparison with the reference rules ---------------------------------


def _reference_indices(processor_cls, total, fps):
    from transformers.video_utils import VideoMetadata

    rate = fractions.Fraction(fps).limit_denominator(1000)
    metadata = VideoMetadata(total_num_frames=total, fps=float(rate), duration=float(total / rate))
    return processor_cls().sample_frames(metadata).tolist(), float(rate), float(total / rate)


@pytest.mark.parametrize("family", ["glm41v", "glm46v"])
def test_frame_sampling_matches_reference(family):
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.models.glm46v.video_processing_glm46v import Glm46VVideoProcessor

    cls = Glm4vVideoProcessor if family == "glm41v" else Glm46VVideoProcessor
    settings = VideoSettings(family=family)
    checked = 0
    # short and long clips, odd counts, NTSC and low rates, > max_duration (300 s) and > 2400 s
    for fps in (1, 2, 7.5, 23.976, 25, 29.97, 30, 60):
        for seconds in (0.2, 0.5, 1, 1.7, 3, 10.3, 29.9, 31, 95, 299, 301, 650, 2500):
            total = max(1, int(seconds * fps))
            expected, rate, duration = _reference_indices(cls, total, fps)
            if not expected:  # on purpose: the reference samples no frame under 1/6 s (glm46v); we use the first
                expected = [0, 0]
            assert sample_frame_indices(total, rate, duration, settings) == expected, (fps, seconds)
            checked += 1
    assert checked == 8 * 13


def test_glm46v_sampling_matches_reference_when_header_fields_disagree():
    """The frame walk is computed per step, not per frame: same indices as the reference's walk, including headers
    whose duration disagrees with their frame count, odd rates and clips around the rule's thresholds."""
    from transformers.models.glm46v.video_processing_glm46v import Glm46VVideoProcessor
    from transformers.video_utils import VideoMetadata

    rng = np.random.default_rng(3)
    rates = [0.1, 1 / 3, 1, 2, 3, 5.994, 6, 24000 / 1001, 25, 30000 / 1001, 59.94, 240, *rng.uniform(0.2, 120, 6)]
    for patch in (1, 2):
        reference = Glm46VVideoProcessor(temporal_patch_size=patch)
        settings = VideoSettings(family="glm46v", temporal_patch_size=patch)
        for fps in rates:
            for total in [1, 2, 5, 6, 7, 179, 180, 181, 640, 641, 1500, *rng.integers(1, 9000, 3).tolist()]:
                for duration in [0, 0.1, 1, 1.5, 29.9, 30, 30.1, 300, 301, 2500, 1e5, total / fps, (total - 1) / fps]:
                    metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=duration)
                    expected = reference.sample_frames(metadata).tolist() or [0, 0]  # none: we use the first frame
                    got = sample_frame_indices(total, fps, duration, settings)
                    assert got == expected, (patch, fps, total, duration)


@pytest.mark.parametrize("seconds", [1e7, 1e9])
def test_glm46v_sampling_of_a_header_that_lies_about_length_is_fast(seconds):
    """A file can claim any length; sampling must not cost time or memory in proportion to the claim."""
    start = time.perf_counter()
    indices = sample_frame_indices(int(seconds * 10), 10.0, seconds, VideoSettings(family="glm46v"))
    assert time.perf_counter() - start < 1
    assert len(indices) == 640 and indices[0] == 0 and indices[-1] == int(seconds * 10) - 1
    # a billion frames claimed over one second: one frame per 1/6 s (float rounding may move one a frame earlier)
    indices = sample_frame_indices(10**9, 1e9, 1.0, VideoSettings(family="glm46v"))
    assert len(indices) == 6 and all(abs(i - k * 10**9 / 6) <= 1 for k, i in enumerate(indices)), indices


def test_smart_resize_matches_reference():
    from transformers.models.glm4v.image_processing_pil_glm4v import smart_resize as reference

    rng = np.random.default_rng(1)
    settings = PatchSettings(**TINY_IMAGE)
    sizes = [(10, 10), (28, 28), (27, 5000), (5000, 27), (1, 150), (4000, 3000)] + [
        tuple(int(v) for v in rng.integers(1, 3000, size=2)) for _ in range(300)]
    for frames in (2, 3, 8, 31):
        for h, w in sizes:
            try:
                expected = reference(frames, h, w, 2, 28, settings.min_pixels, settings.max_pixels)
            except ValueError:
                with pytest.raises(ValueError, match="aspect ratio"):
                    smart_resize(frames, h, w, settings)
                continue
            assert smart_resize(frames, h, w, settings) == expected, (frames, h, w)


# ---- decoding ------------------------------------------------------------------------------------------------


def _decode_all(path):
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]


class _Spy:
    """Wraps a PyAV container to count seeks and decoded frames (optionally corrupting seek targets)."""

    def __init__(self, container, seek_shift=0, no_pts_after_seek=False):
        self.container, self.seek_shift, self.seeks, self.decoded = container, seek_shift, [], 0
        self.no_pts_after_seek = no_pts_after_seek

    def seek(self, offset, *args, **kwargs):
        self.seeks.append(offset)
        return self.container.seek(offset + self.seek_shift if offset else offset, *args, **kwargs)

    def decode(self, stream):
        for frame in self.container.decode(stream):
            self.decoded += 1
            if self.no_pts_after_seek and self.seeks and self.seeks[-1]:
                frame.pts = None   # a demuxer that gives no timestamps after a seek
            yield frame


def test_seeking_returns_the_same_frames_as_sequential_decoding(tmp_path):
    path = make_video(tmp_path / "gop.mp4", 400, 25, gop=20)
    truth = _decode_all(path)
    wanted = [0, 3, 90, 91, 200, 250, 251, 330, 399]
    with av.open(str(path)) as container:
        spy = _Spy(container)
        stream = container.streams.video[0]
        got = {k: f.to_ndarray(format="rgb24") for k, f in _iter_wanted_frames(spy, stream, wanted, 25.0, True)}
    assert len(spy.seeks) >= 3, "long gaps should be crossed by seeking"
    assert spy.decoded < 200, f"decoded {spy.decoded} of 400 frames for 9 wanted ones"
    assert sorted(got) == list(range(len(wanted)))
    for k, index in enumerate(wanted):
        np.testing.assert_array_equal(got[k], truth[index])


def test_seek_landing_far_before_its_target_decodes_forward(tmp_path):
    path = make_video(tmp_path / "long_gop.mp4", 400, 25, gop=250)  # keyframes at 0 and 250 only
    truth = _decode_all(path)
    wanted = [0, 320]
    with av.open(str(path)) as container:
        spy = _Spy(container)
        stream = container.streams.video[0]
        got = [f.to_ndarray(format="rgb24") for _, f in _iter_wanted_frames(spy, stream, wanted, 25.0, True)]
    assert len(spy.seeks) == 1, "landing on keyframe 250 for frame 320 must decode forward, not seek again"
    np.testing.assert_array_equal(np.stack(got), np.stack([truth[i] for i in wanted]))


def bursty_pts_ms(n_frames):
    """A phone screen recording's timing: bursts of 5 frames 20 ms apart, then 5 frames 300 ms apart, ..."""
    return np.cumsum([0] + [20 if (i // 5) % 2 == 0 else 300 for i in range(n_frames - 1)]).tolist()


def test_variable_frame_rate_takes_frames_by_count_as_the_reference_does(tmp_path):
    """Timestamps of a variable-frame-rate clip are not frame numbers: the reference takes the i-th decoded frame,
    so the first frame whose timestamp breaks the frame period turns seeking off and frames are counted."""
    path = make_video(tmp_path / "vfr.mp4", 400, 10, gop=20, pts_ms=bursty_pts_ms(400))
    truth = _decode_all(path)
    wanted = [0, 3, 90, 91, 200, 250, 251, 330, 399]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        got = {k: f.to_ndarray(format="rgb24") for k, f in _iter_wanted_frames(container, stream, wanted,
                                                                               float(stream.average_rate), True)}
    assert sorted(got) == list(range(len(wanted)))
    for k, index in enumerate(wanted):
        np.testing.assert_array_equal(got[k], truth[index])


def test_frames_without_timestamps_after_a_seek_fall_back_to_counting(tmp_path):
    path = make_video(tmp_path / "gop.mp4", 200, 25, gop=20)
    truth = _decode_all(path)
    wanted = [0, 120, 180]
    with av.open(str(path)) as container:
        spy = _Spy(container, no_pts_after_seek=True)
        got = {k: f.to_ndarray(format="rgb24")   # a restart yields each k again: the last one counts
               for k, f in _iter_wanted_frames(spy, container.streams.video[0], wanted, 25.0, True)}
    assert spy.seeks[-1] == 0   # could not place the landing frame: restarted from the beginning, counting
    np.testing.assert_array_equal(np.stack([got[k] for k in range(len(wanted))]), np.stack([truth[i] for i in wanted]))


def test_overshooting_seek_falls_back_to_sequential(tmp_path):
    path = make_video(tmp_path / "gop.mp4", 200, 25, gop=50)
    truth = _decode_all(path)
    wanted = [120, 180]
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        spy = _Spy(container, seek_shift=int(6 / stream.time_base))  # the demuxer lands 6 s past the target
        got = [f.to_ndarray(format="rgb24") for _, f in _iter_wanted_frames(spy, stream, wanted, 25.0, True)]
    assert spy.seeks[-1] == 0  # gave up seeking and restarted from the beginning
    np.testing.assert_array_equal(np.stack(got), np.stack([truth[120], truth[180]]))


@pytest.mark.parametrize("frames", [5, 1])
@pytest.mark.parametrize("family", ["glm41v", "glm46v"])
def test_clip_shorter_than_one_sampling_step(tmp_path, family, frames):
    """The reference loader keeps one copy of a repeated index, then refuses a single frame; we use it twice (also
    under 1/6 s, where glm46v's rule wants no frame at all)."""
    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.models.glm46v.video_processing_glm46v import Glm46VVideoProcessor
    from transformers.video_utils import load_video as reference_load

    path = make_video(tmp_path / "short.mp4", frames, 30)  # 1/6 s, 1/30 s
    settings = VideoSettings(**TINY_VIDEO, family=family)
    video = load_video(path, settings)
    assert video.frame_indices == [0, 0] and video.frames.shape[0] == 1
    assert video.group_timestamps() == [0.0]
    np.testing.assert_array_equal(video.frames[0], _resized_first_frame(path, video.frames.shape[1:3]))

    cls = Glm4vVideoProcessor if family == "glm41v" else Glm46VVideoProcessor
    reference = cls(size={"shortest_edge": 12544, "longest_edge": 470400})
    with pytest.raises((ValueError, IndexError)):  # IndexError: glm46v's rule sampled no frame at all
        frames, metadata = reference_load(str(path), backend="pyav", sample_indices_fn=reference.sample_frames)
        reference(videos=[frames], video_metadata=[metadata], do_sample_frames=False)


def _resized_first_frame(path, size):
    frame = torch.from_numpy(_decode_all(path)[0]).permute(2, 0, 1)[None]
    out = torch.nn.functional.interpolate(frame, size=tuple(size), mode="bicubic", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).numpy()


def test_video_inputs_path_bytes_file_object_and_file_url(tmp_path):
    path = make_video(tmp_path / "clip.mp4", 31, 30)
    settings = VideoSettings(**TINY_VIDEO)
    base = load_video(path, settings)
    data = path.read_bytes()
    for source in (str(path), data, io.BytesIO(data), path.as_uri()):
        other = load_video(source, settings)
        assert other.frame_indices == base.frame_indices
        np.testing.assert_array_equal(other.frames, base.frames)


def test_container_without_frame_count_is_estimated(tmp_path):
    path = make_video(tmp_path / "clip.webm", 37, 25, codec="libvpx", fmt="webm")
    with av.open(str(path)) as c:
        assert c.streams.video[0].frames == 0  # webm stores no count: the estimate path is exercised
    video = load_video(path, VideoSettings(**TINY_VIDEO))
    assert video.total_frames == 37 and video.frame_indices == [0, 13]
    truth = _decode_all(path)
    np.testing.assert_array_equal(video.frames[1], _resize(truth[13], video.frames.shape[1:3]))


def _resize(rgb, size):
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None]
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bicubic", antialias=True,
                                           align_corners=False)[0].permute(1, 2, 0).numpy()


def test_image_inputs_path_bytes_file_object_data_uri_and_pil(tmp_path):
    import base64

    rng = np.random.default_rng(3)
    arr = rng.integers(0, 256, (60, 90, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    data = path.read_bytes()
    settings = PatchSettings(**TINY_IMAGE)
    base = load_image(path, settings)
    assert (base.orig_height, base.orig_width) == (60, 90)
    assert base.pixels.shape[0] % 28 == 0 and base.pixels.shape[1] % 28 == 0
    uri = "data:image/png;base64," + base64.b64encode(data).decode()
    for source in (str(path), data, io.BytesIO(data), path.as_uri(), uri, Image.open(path), arr):
        np.testing.assert_array_equal(load_image(source, settings).pixels, base.pixels)


def test_s3_image_and_video_through_moto_server(tmp_path):
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        keys = dict(aws_access_key_id="testing", aws_secret_access_key="testing")
        s3 = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **keys)
        s3.create_bucket(Bucket="media")
        video = make_video(tmp_path / "clip.mp4", 61, 30, gop=10)
        image = tmp_path / "a.png"
        Image.fromarray(np.random.default_rng(4).integers(0, 256, (50, 70, 3), dtype=np.uint8)).save(image)
        s3.upload_file(str(video), "media", "clips/clip.mp4")
        s3.upload_file(str(image), "media", "images/a.png")
        options = dict(key=keys["aws_access_key_id"], secret=keys["aws_secret_access_key"],
                       client_kwargs={"endpoint_url": endpoint, "region_name": "us-east-1"},
                       skip_instance_cache=True)
        vs, ims = VideoSettings(**TINY_VIDEO), PatchSettings(**TINY_IMAGE)
        remote = load_video("s3://media/clips/clip.mp4", vs, storage_options=options)
        np.testing.assert_array_equal(remote.frames, load_video(video, vs).frames)
        remote_image = load_image("s3://media/images/a.png", ims, storage_options=options)
        np.testing.assert_array_equal(remote_image.pixels, load_image(image, ims).pixels)
        assert remote.source == "s3://media/clips/clip.mp4"
    finally:
        server.stop()


def test_patch_rows_are_block_major_with_repeated_temporal_frame():
    settings = PatchSettings(do_rescale=False, do_normalize=False)
    from glmv.image import patchify

    frame = np.arange(56 * 84 * 3, dtype=np.int64).reshape(56, 84, 3) % 251
    rows, grid = patchify(frame.astype(np.uint8), settings)
    assert grid == (1, 4, 6) and rows.shape == (24, 3 * 2 * 14 * 14)
    # row 1 is the top-right patch of the first 2x2 merge window: pixel rows 0-13, columns 14-27
    patch = rows[1].view(3, 2, 14, 14)
    expected = torch.from_numpy(frame[0:14, 14:28].astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(patch[:, 0], expected)
    torch.testing.assert_close(patch[:, 1], expected)
    # row 2 is the bottom-left patch of that window: pixel rows 14-27, columns 0-13
    expected = torch.from_numpy(frame[14:28, 0:14].astype(np.float32)).permute(2, 0, 1)
    torch.testing.assert_close(rows[2].view(3, 2, 14, 14)[:, 0], expected)
    assert math.prod(grid) == rows.shape[0]


def test_http_url_image_and_video(tmp_path):
    import functools
    import http.server
    import threading

    video = make_video(tmp_path / "clip.mp4", 31, 30)
    image = tmp_path / "a.png"
    Image.fromarray(np.random.default_rng(5).integers(0, 256, (40, 64, 3), dtype=np.uint8)).save(image)
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(tmp_path))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_port}"
        vs, ims = VideoSettings(**TINY_VIDEO), PatchSettings(**TINY_IMAGE)
        np.testing.assert_array_equal(load_video(f"{base}/clip.mp4", vs).frames, load_video(video, vs).frames)
        np.testing.assert_array_equal(load_image(f"{base}/a.png?sig=x", ims).pixels, load_image(image, ims).pixels)
        with pytest.raises(MediaError, match="HTTP 404"):
            load_image(f"{base}/missing.png", ims)
    finally:
        server.shutdown()
        server.server_close()



def test_the_same_frames_in_several_rows_are_patchified_once_and_stored_in_the_asked_dtype(monkeypatch):
    """The tasks of one item pass the same loaded frames: one patchify, the rows copied; a bfloat16 model gets its
    pixels in bfloat16, bit for bit the float32 rows rounded (no float32 copy on its device)."""
    import glmv.image as image_mod
    from glmv.video import LoadedVideo, videos_to_patches

    rng = np.random.default_rng(0)
    shared, other = (rng.integers(0, 256, shape, dtype=np.uint8) for shape in ((112, 168, 3), (56, 112, 3)))
    real, calls = image_mod.patchify, []

    def counted(frames, *args, **kwargs):
        calls.append(id(frames))
        return real(frames, *args, **kwargs)

    monkeypatch.setattr(image_mod, "patchify", counted)
    rows, grids = image_mod.stack_patches([shared, other, shared], PatchSettings())
    assert calls == [id(shared), id(other)]
    separate, separate_grids = image_mod.stack_patches([shared, other, shared.copy()], PatchSettings())
    assert torch.equal(rows, separate) and torch.equal(grids, separate_grids) and len(calls) == 5
    for dtype in (torch.bfloat16, torch.float16):
        assert torch.equal(image_mod.stack_patches([shared, other, shared], PatchSettings(), dtype=dtype)[0],
                           rows.to(dtype))
    clip = LoadedVideo(frames=rng.integers(0, 256, (4, 56, 84, 3), dtype=np.uint8), frame_indices=[0, 1, 2, 3],
                       fps=2.0, total_frames=4, duration=2.0, orig_height=56, orig_width=84)
    video_rows = videos_to_patches([clip, clip], VideoSettings(), dtype=torch.bfloat16)[0]
    half = video_rows.shape[0] // 2
    assert video_rows.dtype == torch.bfloat16 and torch.equal(video_rows[:half], video_rows[half:])


@pytest.mark.parametrize("config, message", [
    ({"do_resize": False}, "do_resize: false is not supported"),
    ({"do_sample_frames": False}, "do_sample_frames: false is not supported"),
    ({"size": "big"}, "size must be an object of shortest_edge"),
    ({"image_std": "abc"}, "image_mean/image_std need 3 numbers"),
    ({"image_mean": [0.5, "a", 0.5]}, "image_mean/image_std need 3 numbers"),
    ({"rescale_factor": "x"}, "rescale_factor must be a positive number"),
    ({"resample": "bicubic"}, "resample must be one of Pillow's filters"),
    ({"do_normalize": "no"}, "do_rescale/do_normalize must be true or false"),
])
def test_preprocessor_settings_glmv_would_not_apply_are_refused(config, message):
    """A key the reference honours but glmv would ignore (or a value of the wrong type) is an error, never a
    silently different preprocessing."""
    from glmv.errors import ProcessorConfigError

    for settings in (PatchSettings, VideoSettings):
        with pytest.raises(ProcessorConfigError, match=message):
            settings.from_dict(config)


def test_variable_frame_rate_without_a_frame_count_still_loads(tmp_path):
    """Matroska/WebM store no frame count: indices are sampled from the duration x the average rate, which for a
    screen recording (30 fps, then 2 fps on a still screen) is far above the frames there are. Frames are then
    found by time, as before: counting would run out of frames and call the file truncated."""
    pts = [round(i * 1000 / 30) for i in range(300)] + [10_000 + i * 500 for i in range(100)]
    path = make_video(tmp_path / "screen.mkv", len(pts), 30, size=(32, 32), gop=30, fmt="matroska", pts_ms=pts)
    for family in ("glm41v", "glm46v"):
        video = load_video(path, VideoSettings(family=family, **TINY_VIDEO))
        assert video.total_frames > len(pts) and video.frames.shape[0] > 100
