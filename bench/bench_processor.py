"""glmv's image/video preprocessing vs transformers', same inputs, one run.

    .venv/bin/python bench/bench_processor.py [--images 64] [--repeat 3] [--skip-long]

Images: 64 mixed-size files (JPEG and PNG, 240x320 .. 3000x4000, photo-like content), preprocessed end to end
(decode from file -> model-ready pixel_values) with the real checkpoints' pixel budget
(min 12544, max 9633792). glmv vs transformers' Glm4vImageProcessorPil and Glm4vImageProcessor (torchvision), each
fed by transformers' `load_image`.
Videos: sampled frames/s of glmv's `load_video` (decode only the sampled frames, resize) vs transformers'
`load_video(backend="pyav")` with the reference sampler (decode, no resize), and end to end (+ video processor).
Clips: 720p 30 fps 20 s (x264 default GOP), 360p 30 fps 6 min (GOP 30: sparse 2 fps sampling, seeking pays).

Every variant runs in its own process, their timed passes interleaved (best of N kept) so that load from other
work on the machine skews all alike; peak memory is a variant's peak RSS while measuring minus its RSS before.
"""

from __future__ import annotations

import argparse
import fractions
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REAL_IMAGE = {"shortest_edge": 12544, "longest_edge": 9633792}
REAL_VIDEO = {"shortest_edge": 12544, "longest_edge": 47040000}


def _photo(rng, h, w):
    # smooth random content (upscaled noise) with some grain, closer to photos than white noise
    from PIL import Image

    small = rng.integers(0, 255, (h // 32 + 2, w // 32 + 2, 3), dtype=np.uint8)
    img = np.asarray(Image.fromarray(small).resize((w, h), Image.BICUBIC)).astype(np.int16)
    img += rng.integers(-8, 8, img.shape, dtype=np.int16)
    return Image.fromarray(img.clip(0, 255).astype(np.uint8))


def make_images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(0)
    sizes = [(240, 320), (480, 640), (720, 1280), (1080, 1920), (1536, 2048), (3000, 4000), (600, 600), (1200, 300)]
    paths = []
    for i in range(n):
        h, w = sizes[i % len(sizes)]
        h, w = int(h * rng.uniform(0.8, 1.2)), int(w * rng.uniform(0.8, 1.2))
        path = folder / (f"img{i:02d}.jpg" if i % 4 else f"img{i:02d}.png")
        _photo(rng, h, w).save(path, quality=90) if path.suffix == ".jpg" else _photo(rng, h, w).save(path)
        paths.append(path)
    return paths


def make_video(path: Path, seconds: float, fps: int, size: tuple[int, int], gop: int | None) -> Path:
    import av

    h, w = size
    rng = np.random.default_rng(1)
    base = np.asarray(_photo(rng, h * 2, w * 2))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fractions.Fraction(fps))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "ultrafast"}
        if gop:
            stream.codec_context.gop_size = gop
        for i in range(int(seconds * fps)):
            y, x = (i * 3) % h, (i * 5) % w  # a slow pan over a larger picture
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(base[y:y + h, x:x + w]), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# ---- variants (each runs in its own process) ----------------------------------------------------------------


def _ours_images(paths):
    from glmv.image import PatchSettings, images_to_patches, load_image

    settings = PatchSettings(min_pixels=REAL_IMAGE["shortest_edge"], max_pixels=REAL_IMAGE["longest_edge"])
    for path in paths:
        images_to_patches([load_image(path, settings)], settings)


def _reference_images(paths, backend):
    from transformers.image_utils import load_image
    from transformers.models.glm4v.image_processing_glm4v import Glm4vImageProcessor
    from transformers.models.glm4v.image_processing_pil_glm4v import Glm4vImageProcessorPil

    cls = Glm4vImageProcessorPil if backend == "pil" else Glm4vImageProcessor
    processor = cls(size=REAL_IMAGE)
    for path in paths:
        processor(load_image(str(path)), return_tensors="pt")


def _ours_video(paths, patches):
    from glmv.image import patchify
    from glmv.video import VideoSettings, load_video

    settings = VideoSettings(min_pixels=REAL_VIDEO["shortest_edge"], max_pixels=REAL_VIDEO["longest_edge"])
    frames = 0
    for path in paths:
        video = load_video(path, settings)
        frames += len(video.frame_indices)
        if patches:
            patchify(video.frames, settings)
    return frames


def _reference_video(paths, patches):
    import warnings

    from transformers.models.glm4v.video_processing_glm4v import Glm4vVideoProcessor
    from transformers.video_utils import load_video

    warnings.simplefilter("ignore")
    processor = Glm4vVideoProcessor(size=REAL_VIDEO)
    frames = 0
    for path in paths:
        video, metadata = load_video(str(path), backend="pyav", sample_indices_fn=processor.sample_frames)
        frames += len(metadata.frames_indices)
        if patches:
            processor(videos=[video], video_metadata=[metadata], do_sample_frames=False, return_tensors="pt")
    return frames


VARIANTS = {
    "images/glmv": lambda a: _ours_images(a),
    "images/transformers-pil": lambda a: _reference_images(a, "pil"),
    "images/transformers-torchvision": lambda a: _reference_images(a, "torchvision"),
    "video-decode/glmv": lambda a: _ours_video(a, False),
    "video-decode/transformers-pyav": lambda a: _reference_video(a, False),
    "video-e2e/glmv": lambda a: _ours_video(a, True),
    "video-e2e/transformers": lambda a: _reference_video(a, True),
}


def _memory_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last reset) of this process, in KiB."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(field + ":"))


def _worker(name, args, warm_up, conn):
    """Serve timed passes of one variant on request, then report the best time and the peak memory."""
    import torch  # noqa: F401  (imports and warm-up stay outside the measurement)

    fn = VARIANTS[name]
    fn(warm_up)  # a small separate input: loads lazy modules
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak-RSS mark, so the peak below is this measurement's own
    base = _memory_kib("VmRSS")
    conn.send("ready")
    best, count = float("inf"), None
    while conn.recv() == "pass":
        start = time.perf_counter()
        count = fn(args)
        best = min(best, time.perf_counter() - start)
        conn.send(None)
    conn.send((best, count, (_memory_kib("VmHWM") - base) / 1024))


def _receive(conn, proc, name):
    while not conn.poll(5):  # a child that dies (out of memory, crash) must not leave us waiting forever
        if not proc.is_alive():
            raise RuntimeError(f"benchmark variant {name} died with exit code {proc.exitcode}")
    return conn.recv()


def run_interleaved(names, args, warm_up, repeat) -> dict:
    """One process per variant; passes alternate between variants so load from other work hits all alike."""
    ctx = multiprocessing.get_context("spawn")
    workers = {}
    for name in names:
        parent, child = ctx.Pipe()
        proc = ctx.Process(target=_worker, args=(name, args, warm_up, child))
        proc.start()
        workers[name] = (parent, proc)
    for name, (conn, proc) in workers.items():  # every start-up and warm-up is over before any timing
        _receive(conn, proc, name)
    for _ in range(repeat):
        for name, (conn, proc) in workers.items():
            conn.send("pass")
            _receive(conn, proc, name)
    results = {}
    for name, (conn, proc) in workers.items():
        conn.send("stop")
        results[name] = _receive(conn, proc, name)
        proc.join()
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3, help="best of N timed passes per variant")
    parser.add_argument("--skip-long", action="store_true", help="leave out the 6-minute clip")
    args = parser.parse_args(argv)
    import torch

    print(f"torch threads {torch.get_num_threads()}, python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs (other work skews the numbers)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        images = make_images(tmp, args.images)
        (tmp / "warm").mkdir()
        warm_images = make_images(tmp / "warm", 1)
        warm_clip = [make_video(tmp / "warm.mp4", 1, 30, (240, 320), None)]  # 30 frames: 1 s
        clips = {"720p-20s": [make_video(tmp / "short.mp4", 20, 30, (720, 1280), None)]}
        if not args.skip_long:
            clips["360p-6min-gop30"] = [make_video(tmp / "long.mp4", 360, 30, (360, 640), 30)]

        print(f"\n{args.images} images, decode + preprocess to pixel_values (best of {args.repeat})")
        names = [name for name in VARIANTS if name.startswith("images/")]
        results = run_interleaved(names, images, warm_images, args.repeat)
        ours = results["images/glmv"][0]
        for name, (secs, _, peak) in results.items():
            print(f"  {name:34s} {args.images / secs:8.1f} images/s   glmv speed-up x{secs / ours:5.2f}"
                  f"   peak RSS +{peak:7.1f} MiB")

        for clip, paths in clips.items():
            print(f"\nvideo {clip}: sampled frames/s (best of {args.repeat})")
            results = run_interleaved([n for n in VARIANTS if n.startswith("video")], paths, warm_clip, args.repeat)
            for stage in ("video-decode", "video-e2e"):
                ours_secs, ours_frames, _ = results[f"{stage}/glmv"]
                for name in (n for n in results if n.startswith(stage)):
                    secs, frames, peak = results[name]
                    assert frames == ours_frames, "both sides must sample the same frames"
                    print(f"  {name:34s} {frames / secs:8.1f} frames/s ({frames} frames)   glmv speed-up "
                          f"x{secs / ours_secs:5.2f}   peak RSS +{peak:7.1f} MiB")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
