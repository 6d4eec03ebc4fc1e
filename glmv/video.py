"""Videos: read the container's metadata, pick frames like the reference processors, decode only those, resize.

Two frame-sampling rules, chosen by the checkpoint's processor family:
  glm41v  (Glm4vVideoProcessor)  a fixed rate (2 fps) over at most max_duration seconds; prompt timestamps are
                                 whole seconds
  glm46v  (Glm46VVideoProcessor) a rate that falls with the clip length (3 / 1 / 0.5 fps), at most 640 frames;
                                 timestamps are "{t:.1f} seconds"
Both return an even number of indices (the last one repeated if needed) so frames pair up into temporal patches.

Split like `glmv.image`: `load_video` (CPU: demux, decode the sampled frames, resize to uint8) and `patchify`.
Frames are resized with torch's native uint8 bicubic antialiased kernel, which is the kernel transformers'
torchvision-based video processor ends up calling, so decoded-and-resized frames match it exactly.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from fractions import Fraction
from typing import IO, Iterator, Sequence

import av
import numpy as np
import torch

from glmv.errors import MediaError, ProcessorConfigError
from glmv.image import PatchSettings, smart_resize, stack_patches
from glmv.media_io import MediaSource, describe, open_media

FAMILIES = ("glm41v", "glm46v")
# Below this many frames between two wanted frames we decode straight through: a seek lands on the keyframe
# before the target, and with typical GOP lengths that is rarely ahead of where sequential decoding already is.
MIN_SEEK_GAP = 48
# A header frame count may overstate what the stream holds by a little; missing more than this many frames at the
# end (or at least one second's worth) means the file is truncated.
TAIL_SLACK_FRAMES = 2


@dataclass
class VideoSettings(PatchSettings):
    """Video preprocessing: patch settings (pixel budget counted over all frames) plus the sampling rule."""

    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 2 * 30000
    fps: float = 2.0  # glm41v sampling rate
    max_duration: float = 300  # glm41v: longer clips are sampled evenly instead of at `fps`
    family: str = "glm41v"

    def validate(self) -> None:
        super().validate()
        if not isinstance(self.fps, (int, float)) or not self.fps > 0:
            raise ProcessorConfigError(f"video setting fps must be a positive number, got {self.fps!r}")
        if self.family not in FAMILIES:
            raise ValueError(f"video family must be one of {FAMILIES}, got {self.family!r}")


def _dedupe_even(indices: Sequence[int]) -> list[int]:
    seen: set[int] = set()
    unique = [i for i in indices if not (i in seen or seen.add(i))]
    if len(unique) % 2:
        unique.append(unique[-1])
    return unique


def sample_glm41v(total_frames: int, fps: float, duration: float, settings: VideoSettings) -> list[int]:
    """Glm4vVideoProcessor's rule: `settings.fps` frames per second, evenly spread when over max_duration."""
    last = total_frames - 1
    duration = duration or round(last / fps) + 1
    rate = settings.fps
    if duration <= settings.max_duration:
        count = max(int(math.floor(duration * rate)), 1)
        indices = [min(last, int(math.ceil(i * fps / rate))) for i in range(count)]
    else:
        count = int(settings.max_duration * rate)
        if count >= total_frames:
            indices = list(range(total_frames))
        else:
            seconds = np.linspace(0, duration, count, endpoint=True)
            indices = [min(last, int(math.ceil(t * fps))) for t in seconds]
    return _dedupe_even(indices)


def _first_frame_at(second: float, frame_time: float, start: int, end: int) -> int | None:
    """The smallest index i in [start, end) with `i * frame_time >= second`, compared in floats as the reference's
    walk compares it; None when there is none."""
    if not frame_time > 0:  # nan, or times that never grow: `start` is the only candidate
        return start if start < end and start * frame_time >= second else None
    quotient = second / frame_time
    i = min(max(math.ceil(quotient), start), end) if quotient < end else end
    # the division can round to the other side of the product: settle on the comparison the reference makes
    while i > start and (i - 1) * frame_time >= second:
        i -= 1
    while i < end and not i * frame_time >= second:
        i += 1
    return i if i < end else None


def _stepped_frames(total_frames: int, frame_time: float, step: float, stop: int, limit: int) -> list[int]:
    """The reference's walk (each frame in turn; take it when its time reaches the next step; stop at `stop` s),
    computed one step at a time so its cost does not grow with a header's frame count, which a file can inflate
    at will. Returns at most limit + 1 indices: past `limit` the caller spreads its frames evenly anyway.
    """
    indices: list[int] = []
    next_second, start = 0, 0
    while len(indices) <= limit:
        index = _first_frame_at(next_second, frame_time, start, total_frames)
        if index is None:
            break
        # the step is accumulated like the reference does, so float rounding picks the same frames
        next_second += step
        indices.append(index)
        if next_second >= stop:
            break
        start = index + 1  # the walk goes on from the next frame: a frame is taken at most once
    return indices


def sample_glm46v(total_frames: int, fps: float, duration: float, settings: VideoSettings) -> list[int]:
    """Glm46VVideoProcessor's rule: 3 fps up to 30 s, 1 fps up to 300 s, else 0.5 fps; at most 640 frames."""
    duration = duration or round((total_frames - 1) / fps) + 1
    effective = min(duration, 2400)
    rate = 3 if effective <= 30 else (1 if effective <= 300 else 0.5)
    # at least one: a clip shorter than one step (under 1/6 s) uses its first frame (twice), as glm41v's rule does
    wanted = max(min(int(effective * rate * settings.temporal_patch_size), 640), 1)
    if total_frames < wanted:
        indices = np.linspace(0, total_frames - 1, wanted, dtype=int).tolist()
    else:
        step = 1 / (settings.temporal_patch_size * rate)
        indices = _stepped_frames(total_frames, 1 / fps, step, int(duration), wanted)
    if len(indices) < wanted:
        first, last = (indices[0], indices[-1]) if indices else (0, max(total_frames - 1, 0))
        indices = np.linspace(first, last, wanted, dtype=int).tolist()
    elif len(indices) > wanted:
        indices = np.linspace(0, total_frames - 1, wanted, dtype=int).tolist()
    return _dedupe_even(indices)


def sample_frame_indices(total_frames: int, fps: float, duration: float, settings: VideoSettings) -> list[int]:
    sampler = sample_glm46v if settings.family == "glm46v" else sample_glm41v
    return sampler(total_frames, fps, duration, settings)


@dataclass
class LoadedVideo:
    """Sampled, resized frames plus what the prompt needs (timestamps), compact enough to ship between processes."""

    frames: np.ndarray  # (U, H, W, 3) uint8: one per distinct sampled frame, in order
    frame_indices: list[int]  # sampled indices, even count (the last may repeat)
    fps: float
    total_frames: int
    duration: float
    orig_height: int
    orig_width: int
    source: str = ""

    @property
    def timestamps(self) -> list[float]:
        """Seconds of each sampled index."""
        return [i / self.fps for i in self.frame_indices]

    def group_timestamps(self, temporal_patch_size: int = 2) -> list[float]:
        """One timestamp per temporal patch (the first frame of each pair), as the prompt shows them."""
        groups = -(-len(self.frames) // temporal_patch_size)
        stamps = self.timestamps[::temporal_patch_size][:groups]
        return stamps + [stamps[-1] if stamps else 0.0] * (groups - len(stamps))


@dataclass
class _StreamInfo:
    total_frames: int
    fps: float
    duration: float
    counted: bool = True   # total_frames is a count of frames, not an estimate from the duration


def _stream_info(container: av.container.InputContainer, stream: av.VideoStream, name: str) -> _StreamInfo:
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    if not rate:
        raise MediaError(name, "video frame rate is unknown")
    total, counted = stream.frames, True
    if not total:
        # some containers (webm, mkv, ...) store no frame count: estimate it from the duration, else count packets
        if stream.duration and stream.time_base:
            seconds = stream.duration * stream.time_base
        elif container.duration:
            seconds = Fraction(container.duration, av.time_base)
        else:
            seconds = 0
        total, counted = round(seconds * rate), False
        if not total:
            total, counted = sum(1 for packet in container.demux(stream) if packet.size), True
            container.seek(0)
    if total <= 0:
        raise MediaError(name, "video stream holds no frames")
    return _StreamInfo(total_frames=int(total), fps=float(rate), duration=float(total / rate), counted=counted)


def _iter_wanted_frames(
    container: av.container.InputContainer, stream: av.VideoStream, wanted: list[int], fps: float, seekable: bool,
    counted: bool = True,
) -> Iterator[tuple[int, av.VideoFrame]]:
    """Yield (k, frame) for each `wanted[k]` (sorted, distinct): the frame of that index, frames counted in
    presentation order from the first, as the reference counts them.

    While presentation timestamps count frames too (each one frame period after the last: a constant frame rate),
    indices come from them and long gaps are crossed with a keyframe seek. The first frame that breaks that rule (a
    variable frame rate, a dropped frame, a seek landing after its target) means timestamps cannot be trusted here:
    decoding starts over from the first frame, counting, and every frame is yielded again by its count.
    `counted=False` (a container with no frame count, whose indices were sampled from its duration): indices are
    times x fps throughout, the first frame at or after each; counting there would run out of frames early.
    """
    time_base, start = stream.time_base, stream.start_time or 0
    seek_gap, pos, k = MIN_SEEK_GAP, -1, 0
    counting = counted and not seekable   # indices from counting decoded frames (as the reference) or timestamps
    while k < len(wanted):
        target, sought = wanted[k], False
        if seekable and not counting and target - pos > seek_gap:
            container.seek(start + int(Fraction(target) / Fraction(fps) / time_base), stream=stream, backward=True)
            sought = True
        for frame in container.decode(stream):
            if counting or frame.pts is None:
                index = pos + 1
            else:
                index = round(float((frame.pts - start) * time_base) * fps)
            lost = sought and (frame.pts is None or index > target)   # where a seek landed is unknown or too far
            irregular = counted and not sought and index != pos + 1
            if not counting and (lost or irregular):
                counting, seekable, pos, k = counted, False, -1, 0   # start over from the first frame
                container.seek(0)
                break
            if sought:
                sought = False
                if index <= pos:  # landed behind frames already decoded: keyframes are further apart
                    seek_gap = max(seek_gap, target - index + 1)
            pos = index
            reached = k
            while k < len(wanted) and wanted[k] <= index:
                yield k, frame
                k += 1
            if k == len(wanted):
                break
            # consider the next seek only once this one's target is reached: a seek may land on a keyframe
            # further back than seek_gap, and seeking again from there would land on it again
            if k > reached and seekable and not counting and wanted[k] - pos > seek_gap:
                break
        else:
            return  # end of stream


def _resize_frame(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """(h, w, 3) uint8 -> (height, width, 3) uint8, bicubic with antialiasing (torch's native uint8 kernel)."""
    if rgb.shape[:2] == (height, width):
        return rgb
    x = torch.from_numpy(rgb).permute(2, 0, 1).unsqueeze(0)  # (1, 3, h, w) channels-last in memory
    x = torch.nn.functional.interpolate(x, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return x[0].permute(1, 2, 0).numpy()


def _file_size(handle: IO[bytes]) -> int | None:
    try:
        here = handle.tell()
        size = handle.seek(0, io.SEEK_END)
        handle.seek(here)
        return size
    except (OSError, AttributeError, ValueError):
        return None


def _decode(handle: IO[bytes], name: str, settings: VideoSettings) -> LoadedVideo:
    if _file_size(handle) == 0:
        raise MediaError(name, "empty file (0 bytes)")
    try:
        container = av.open(handle, mode="r", metadata_errors="ignore")
    except av.error.FFmpegError as exc:
        raise MediaError(name, f"not a decodable video (corrupt data or unsupported format: {exc.strerror})") from None
    with container:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams})
            held = f"it holds only {', '.join(kinds)}" if kinds else "no streams at all: truncated or not a video"
            raise MediaError(name, f"no video stream in the file ({held})")
        stream = container.streams.video[0]
        if stream.codec_context is None:
            raise MediaError(name, f"unsupported format: no decoder for this video ({container.format.name})")
        info = _stream_info(container, stream, name)
        indices = sample_frame_indices(info.total_frames, info.fps, info.duration, settings)
        wanted = sorted(set(indices))
        # the reference decodes each distinct frame once and sizes the clip by that count; a one-frame clip
        # (shorter than one sampling step) is counted as the frame twice, which the reference cannot process
        budget_frames = max(len(wanted), settings.temporal_patch_size)
        frames: np.ndarray | None = None
        got = 0
        seekable = getattr(handle, "seekable", lambda: True)()
        try:
            for k, frame in _iter_wanted_frames(container, stream, wanted, info.fps, seekable, info.counted):
                rgb = frame.to_ndarray(format="rgb24")
                if frames is None:
                    orig_h, orig_w = rgb.shape[:2]
                    out_h, out_w = smart_resize(budget_frames, orig_h, orig_w, settings, source=name)
                    frames = np.empty((len(wanted), out_h, out_w, 3), dtype=np.uint8)
                frames[k] = _resize_frame(rgb, frames.shape[1], frames.shape[2])
                got = k + 1
        except av.error.FFmpegError as exc:
            raise MediaError(name, f"corrupt or truncated video: decoding failed before frame {wanted[got]} of the "
                                   f"{info.total_frames} its header announces ({exc.strerror})") from None
    if frames is None:
        raise MediaError(name, "no frame could be decoded (truncated or corrupt video)")
    if got < len(wanted):
        missing_from = wanted[got]
        if info.total_frames - missing_from > max(TAIL_SLACK_FRAMES, info.fps):
            raise MediaError(name, f"truncated video: stream ended before frame {missing_from} of the "
                                   f"{info.total_frames} its header announces")
        frames[got:] = frames[got - 1]  # header count slightly over the real one: reuse the last frame
    return LoadedVideo(
        frames=frames, frame_indices=indices, fps=info.fps, total_frames=info.total_frames, duration=info.duration,
        orig_height=orig_h, orig_width=orig_w, source=name,
    )


def load_video(source: MediaSource, settings: VideoSettings, *, storage_options: dict | None = None) -> LoadedVideo:
    """CPU step: sample frame indices from the container's metadata, decode just those, resize to the token grid.

    `source` is a path, file:// / http(s):// / fsspec URL, bytes, or a seekable binary file object (an s3fs file
    works: only the byte ranges needed are fetched when the container allows seeking). Raises `MediaError`.
    """
    name = describe(source)
    with open_media(source, storage_options) as handle:
        return _decode(handle, name, settings)


def videos_to_patches(
    videos: Sequence[LoadedVideo], settings: VideoSettings, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """pixel_values_videos (sum N_i, 1176) in dtype and video_grid_thw (n, 3) for a batch of loaded videos."""
    return stack_patches([video.frames for video in videos], settings, device, dtype)
