"""Images: decode with Pillow, pick the token-grid size (`smart_resize`), resize, normalise and cut into patch rows.

Two steps so a pipeline can ship compact data to GPU workers:
  `load_image(src, settings)`  CPU: decode + resize -> `LoadedImage` holding (H, W, 3) uint8 pixels
  `patchify([...], settings)`  any device: uint8 frames -> normalised rows of C*tp*p*p floats + grid (t, h, w)
Decoding follows transformers' `load_image` + Pillow backend step for step (EXIF transpose, `convert("RGB")`,
transparency composited onto white, bicubic resize of the uint8 image), so the pixels are the same.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import os
import struct
import warnings
from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from glmv.errors import MediaError, ProcessorConfigError
from glmv.media_io import MediaSource, describe, read_bytes

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
MAX_ASPECT_RATIO = 200
# Pixel-count ceiling checked from the header, before the full image is decoded: Pillow's own refusal threshold
# (2 x Image.MAX_IMAGE_PIXELS, about 13k x 13k). A larger limit also needs Image.MAX_IMAGE_PIXELS raised.
DEFAULT_MAX_IMAGE_PIXELS = 2 * (Image.MAX_IMAGE_PIXELS or 89_478_485)


@dataclass
class PatchSettings:
    """How pixels become patch rows; read from preprocessor_config.json (or its video twin)."""

    min_pixels: int = 112 * 112
    max_pixels: int = 28 * 28 * 15000
    patch_size: int = 14
    temporal_patch_size: int = 2
    merge_size: int = 2
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD
    rescale_factor: float = 1 / 255
    do_rescale: bool = True
    do_normalize: bool = True
    resample: int = Image.Resampling.BICUBIC
    extra: dict = field(default_factory=dict, compare=False)  # config keys not used here, kept for inspection

    @property
    def factor(self) -> int:
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, cfg: dict, **defaults: Any) -> "PatchSettings":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        values = {k: v for k, v in defaults.items()}
        for switch in UNSUPPORTED_OFF:   # the reference skips that step; here it always runs
            if cfg.get(switch) is False:
                raise ProcessorConfigError(f"preprocessor setting {switch}: false is not supported (GLM-V checkpoints "
                                           f"leave it true)")
        size = cfg.get("size") or {}
        if not isinstance(size, dict):
            raise ProcessorConfigError(f"preprocessor setting size must be an object of shortest_edge and/or "
                                       f"longest_edge (pixels), got {size!r}")
        if "shortest_edge" in size:
            values["min_pixels"] = size["shortest_edge"]
        if "longest_edge" in size:
            values["max_pixels"] = size["longest_edge"]
        for key in ("min_pixels", "max_pixels"):  # transformers 4.x spelling
            if cfg.get(key) is not None:
                values[key] = cfg[key]
        for key in known - {"min_pixels", "max_pixels"}:
            if cfg.get(key) is not None:
                values[key] = cfg[key]
        for key, default in (("image_mean", CLIP_MEAN), ("image_std", CLIP_STD)):
            value = values.get(key, default)
            values[key] = tuple(value) if isinstance(value, (list, tuple)) else value
        settings = cls(**values, extra={k: v for k, v in cfg.items() if k not in known and k != "size"})
        settings.validate()
        return settings

    def validate(self) -> None:
        for name in ("min_pixels", "max_pixels", "patch_size", "temporal_patch_size", "merge_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ProcessorConfigError(f"preprocessor setting {name} must be a positive integer, got {value!r}")
        # min_pixels above max_pixels is allowed, as the reference allows it: smart_resize applies max first
        def numbers(value, count):
            return isinstance(value, tuple) and len(value) == count and all(_is_number(v) for v in value)
        if not numbers(self.image_mean, 3) or not numbers(self.image_std, 3) or min(self.image_std) <= 0:
            raise ProcessorConfigError(
                f"image_mean/image_std need 3 numbers (std > 0), got {self.image_mean!r}, {self.image_std!r}")
        if not _is_number(self.rescale_factor) or self.rescale_factor <= 0:
            raise ProcessorConfigError(f"preprocessor setting rescale_factor must be a positive number, "
                                       f"got {self.rescale_factor!r}")
        if not isinstance(self.do_rescale, bool) or not isinstance(self.do_normalize, bool):
            raise ProcessorConfigError(f"preprocessor settings do_rescale/do_normalize must be true or false, got "
                                       f"{self.do_rescale!r}, {self.do_normalize!r}")
        if self.resample not in set(Image.Resampling):
            raise ProcessorConfigError(f"preprocessor setting resample must be one of Pillow's filters "
                                       f"{sorted(int(r) for r in Image.Resampling)}, got {self.resample!r}")

    def overridden(self, overrides: dict[str, Any]) -> "PatchSettings":
        """A validated copy with a caller's settings: transformers' `size` ({"shortest_edge": min pixels,
        "longest_edge": max pixels}), and min_pixels / max_pixels (and a video's fps) by name. Keys these settings
        do not have are left alone (the caller checks for unknown ones)."""
        values = {k: v for k, v in overrides.items()
                  if k in OVERRIDABLE and k in {f.name for f in fields(self)} and v is not None}
        size = overrides.get("size")
        if size is not None:
            if not isinstance(size, dict) or not size or not set(size) <= {"shortest_edge", "longest_edge"}:
                raise ValueError(f"size must be a dict of shortest_edge and/or longest_edge (pixels), got {size!r}")
            values.update({name: size[edge] for edge, name in (("shortest_edge", "min_pixels"),
                                                               ("longest_edge", "max_pixels")) if edge in size})
        if not values:
            return self
        settings = replace(self, **values)
        settings.validate()
        return settings


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


UNSUPPORTED_OFF = ("do_resize", "do_convert_rgb", "do_sample_frames")
OVERRIDABLE = ("min_pixels", "max_pixels", "fps")  # what `PatchSettings.overridden` may change, besides `size`


def smart_resize(
    num_frames: int, height: int, width: int, settings: PatchSettings, source: str = "input"
) -> tuple[int, int]:
    """Output (height, width): multiples of patch*merge, aspect kept, num_frames*h*w within [min, max]_pixels."""
    factor, tf = settings.factor, settings.temporal_patch_size
    if height < factor or width < factor:
        # tiny inputs are first blown up so both sides reach one merged patch (int() truncates like the reference)
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_ASPECT_RATIO:
        raise MediaError(source, f"aspect ratio {ratio:.1f} is over the limit of {MAX_ASPECT_RATIO}")
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / tf) * tf
    if t_bar * h_bar * w_bar > settings.max_pixels:
        beta = math.sqrt(num_frames * height * width / settings.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < settings.min_pixels:
        beta = math.sqrt(settings.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


@dataclass
class LoadedImage:
    """A decoded, resized image ready for `patchify`: compact (uint8) so it is cheap to ship between processes."""

    pixels: np.ndarray  # (H, W, 3) uint8, H and W multiples of patch*merge
    orig_height: int
    orig_width: int
    source: str = ""

    @property
    def height(self) -> int:
        return self.pixels.shape[0]

    @property
    def width(self) -> int:
        return self.pixels.shape[1]


def composite_to_rgb(img: Image.Image) -> Image.Image:
    """RGB, with any transparency laid over white (what transformers does before resizing)."""
    if "A" in img.getbands() or img.info.get("transparency") is not None:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _hwc_uint8(array: np.ndarray | torch.Tensor) -> np.ndarray:
    """An in-memory uint8 image as (H, W) or (H, W, 3|4). Channels-first (C, H, W) and one-channel arrays are
    read as transformers reads them: channels first when the first dimension is 1 or 3 (even if the last is too,
    as in (3, 40, 3)), or 4 and the last is not. Float arrays are refused rather than guessed (0-1 or 0-255?)."""
    name = f"<{type(array).__name__}>"
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu().numpy()
    if array.dtype != np.uint8:
        raise MediaError(name, f"expected uint8 pixels, got {array.dtype} (convert floats explicitly: their range, "
                               f"0-1 or 0-255, cannot be told from the values)")
    if array.ndim == 3 and (array.shape[0] in (1, 3) or (array.shape[0] == 4 and array.shape[2] not in (1, 3, 4))):
        array = array.transpose(1, 2, 0)   # (C, H, W) -> (H, W, C)
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if not (array.ndim == 2 or (array.ndim == 3 and array.shape[2] in (3, 4))) or 0 in array.shape:
        raise MediaError(name, f"expected an (H, W), (H, W, 1|3|4) or (1|3|4, H, W) array, got {array.shape}")
    return np.ascontiguousarray(array)


def _base64_image(source) -> bytes | None:
    """The bytes of a raw base64 string (transformers' load_image takes those besides paths, URLs and data URIs;
    line breaks allowed, as the `base64` tool writes them), else None. A path never decodes: '.' is not in the
    alphabet, and an existing file wins. A short string counts only when it decodes to an image header, so that a
    missing file named in base64's alphabet still says "file not found"; a long one is an image's data, and a bad
    one gets the image decoder's error."""
    if not isinstance(source, str) or len(source) < 16 or "://" in source or source.startswith("data:"):
        return None
    compact = "".join(source.split())
    try:
        data = base64.b64decode(compact, validate=True)
    except (binascii.Error, ValueError):
        return None
    if len(source) <= 4096 and os.path.exists(source):
        return None
    if len(compact) > 1024:
        return data
    try:
        Image.open(io.BytesIO(data))   # reads the header only
    except Image.DecompressionBombError:
        return data   # an image, one to refuse: open_image says why
    except Exception:   # noqa: BLE001 - whatever Pillow raises, it is not an image: treat the string as a path
        return None
    return data


def open_image(source: MediaSource | Image.Image | np.ndarray | torch.Tensor, *,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, storage_options: dict | None = None) -> Image.Image:
    """Decode `source` into an upright RGB Pillow image, or raise `MediaError` naming the input and the cause."""
    if isinstance(source, Image.Image):
        return composite_to_rgb(source)  # an in-memory image is used as given, like transformers does
    if isinstance(source, (np.ndarray, torch.Tensor)):
        return composite_to_rgb(Image.fromarray(_hwc_uint8(source)))
    name = describe(source)
    data = _base64_image(source)
    if data is None:
        data = read_bytes(source, storage_options)
    else:
        name = f"<base64 image: {len(source)} chars>"
    if not data:
        raise MediaError(name, "empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply our own limit below
            img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise MediaError(name, "not a decodable image (corrupt data or unsupported format)") from None
    except Image.DecompressionBombError as exc:
        raise MediaError(name, f"decompression bomb refused by Pillow ({exc})") from None
    except (OSError, ValueError, SyntaxError) as exc:
        raise MediaError(name, f"cannot read image header ({exc})") from None
    width, height = img.size
    if width * height > max_image_pixels:
        raise MediaError(name, f"decompression bomb refused: {width}x{height} = {width * height} pixels is over the "
                               f"limit of {max_image_pixels}")
    if width == 0 or height == 0:
        raise MediaError(name, f"image has no pixels ({width}x{height})")
    try:
        img.load()  # the full decode: truncation and corruption surface here
        ImageOps.exif_transpose(img, in_place=True)
        if img.mode == "RGB" and "transparency" not in img.info:
            return img  # the two conversions below would only copy it
        img = img.convert("RGB")  # as transformers' load_image: RGBA loses its alpha here, unblended
    except (OSError, ValueError, SyntaxError, EOFError, struct.error) as exc:
        raise MediaError(name, f"corrupt or truncated image data ({exc})") from None
    return composite_to_rgb(img)  # a palette's transparent colour survives convert("RGB") and is blended


def load_image(source: MediaSource | Image.Image | np.ndarray | torch.Tensor, settings: PatchSettings, *,
               max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS, storage_options: dict | None = None) -> LoadedImage:
    """CPU step: decode + bicubic resize to the grid `smart_resize` picks. Raises `MediaError` on bad input."""
    img = open_image(source, max_image_pixels=max_image_pixels, storage_options=storage_options)
    in_memory = isinstance(source, (Image.Image, np.ndarray, torch.Tensor))
    name = f"<{type(source).__name__}>" if in_memory else describe(source)
    height, width = img.height, img.width
    new_h, new_w = smart_resize(settings.temporal_patch_size, height, width, settings, source=name)
    img = img.resize((new_w, new_h), resample=settings.resample)
    return LoadedImage(pixels=np.array(img), orig_height=height, orig_width=width, source=name)


def patch_grid(num_frames: int, height: int, width: int, settings: PatchSettings) -> tuple[int, int, int]:
    """(gt, gh, gw): temporal patches (frames padded to a multiple of temporal_patch_size) and patch rows/cols."""
    return -(-num_frames // settings.temporal_patch_size), height // settings.patch_size, width // settings.patch_size


def patchify(
    frames: np.ndarray | torch.Tensor, settings: PatchSettings, device: torch.device | str | None = None,
    out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(T, H, W, C) uint8 frames -> (gt*gh*gw, C*tp*p*p) float32 rows in the reference order, and (gt, gh, gw).

    T is padded to a multiple of temporal_patch_size by repeating the last frame, so a single image becomes one
    temporal patch holding the image twice. Rows are grouped merge-window by merge-window (block-major), which is
    the order the vision tower's 2x2 downsampling expects. `out` (rows x C*tp*p*p, contiguous) receives the rows.
    """
    x = torch.as_tensor(frames)
    if x.ndim == 3:
        x = x.unsqueeze(0)
    x = x.to(device) if device is not None else x
    t, h, w, c = x.shape
    p, m, tp = settings.patch_size, settings.merge_size, settings.temporal_patch_size
    if h % (p * m) or w % (p * m):
        raise ValueError(f"frame size {h}x{w} is not a multiple of {p * m}; resize with smart_resize first")
    if pad := -t % tp:
        x = torch.cat([x, x[-1:].expand(pad, -1, -1, -1)])
        t += pad
    gt, gh, gw = patch_grid(t, h, w, settings)
    # reorder while still uint8 (a quarter of the bytes of float32), then normalise in one fused pass
    x = x.view(gt, tp, gh // m, m, p, gw // m, m, p, c)
    x = x.permute(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (gt, gh/m, gw/m, m, m, C, tp, p, p)
    x = x.reshape(gt * gh * gw, c, tp * p * p)
    scale = settings.rescale_factor if settings.do_rescale else 1.0
    mean = torch.tensor(settings.image_mean if settings.do_normalize else (0.0,) * c, dtype=torch.float64)
    std = torch.tensor(settings.image_std if settings.do_normalize else (1.0,) * c, dtype=torch.float64)
    mul = (scale / std).to(device=x.device, dtype=torch.float32).view(c, 1)
    add = (-mean / std).to(device=x.device, dtype=torch.float32).view(c, 1)
    if out is not None:
        out = out.view(gt * gh * gw, c, tp * p * p)
    rows = torch.addcmul(add, x, mul, out=out)  # (N, C, tp*p*p) float32: (x * scale - mean) / std
    return rows.view(gt * gh * gw, c * tp * p * p), (gt, gh, gw)


def stack_patches(
    frame_stacks: Sequence[np.ndarray], settings: PatchSettings, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Several (T, H, W, C) uint8 stacks -> their rows concatenated (written in place, no extra copy) + grids.

    Rows are computed in float32 and stored in `dtype` (the model's: a bfloat16 model never holds a float32 copy of
    its pixels). A stack that appears again (the same array object: the tasks of one item) is copied from its first
    rows instead of patchified again."""
    shapes = [s.shape if s.ndim == 4 else (1, *s.shape) for s in frame_stacks]
    grids = [patch_grid(t, h, w, settings) for t, h, w, _ in shapes]
    width = 3 * settings.temporal_patch_size * settings.patch_size ** 2
    rows = torch.empty(sum(math.prod(g) for g in grids), width, dtype=dtype, device=device)
    start, first_rows = 0, {}
    for frames, grid in zip(frame_stacks, grids):
        span = slice(start, start + math.prod(grid))
        seen = first_rows.setdefault(id(frames), span)
        if seen is span:
            patchify(frames, settings, device, out=rows[span])
        else:
            rows[span].copy_(rows[seen])
        start = span.stop
    return rows, torch.tensor(grids, dtype=torch.long)


def images_to_patches(
    images: Sequence[LoadedImage], settings: PatchSettings, device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GPU-or-CPU step: a batch of `LoadedImage` -> pixel_values (sum N_i, 1176) in dtype, image_grid_thw (n, 3)."""
    return stack_patches([image.pixels for image in images], settings, device, dtype)
