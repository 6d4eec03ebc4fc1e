"""Where each token sits: 3-D M-RoPE positions, and which images / videos of a batch belong to which row.

The processor marks tokens with mm_token_type_ids (TEXT, IMAGE, VIDEO) and lists media in row order (images and
videos as two separate streams, each in prompt order), so a row's media are found by walking its placeholder spans.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch

from glmv.errors import InputError

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values, as the processor writes them


def rope_index(token_types: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw=None, video_grid_thw=None,
               spatial_merge_size: int = 2):
    """3-D M-RoPE positions for a left-padded batch.

    Text tokens count up by one on all three axes. An image, or one frame of a video (frames are separated by
    timestamp text, so each is its own (1, h, w) grid), starting at position s takes t = s, h = s + row, w = s + col
    on its merged grid, and the text after it resumes at s + max(h, w) / merge.
    Returns position_ids (3, B, T) (0 at padding) and deltas (B,): max position + 1 - number of real tokens, so
    that a token generated after n real tokens sits at n + delta.
    """
    B, T = token_types.shape
    grids = {IMAGE: iter(image_grid_thw.tolist() if image_grid_thw is not None else []),
             VIDEO: iter([[1, h, w] for t, h, w in video_grid_thw.tolist() for _ in range(t)]
                         if video_grid_thw is not None else [])}
    position_ids = torch.zeros(3, B, T, dtype=torch.long)
    deltas = torch.zeros(B, dtype=torch.long)
    for row in range(B):
        valid = attention_mask[row].bool().cpu()
        types = token_types[row].cpu()[valid].tolist()
        pieces, pos = [], 0
        for kind, group in itertools.groupby(types):
            n = len(list(group))
            if kind == TEXT:
                pieces.append(torch.arange(pos, pos + n).expand(3, n))
                pos += n
                continue
            try:
                t, h, w = next(grids[kind])
            except StopIteration:
                raise InputError(f"row {row}: more {'image' if kind == IMAGE else 'video frame'} placeholder "
                                 f"spans than grids in {'image' if kind == IMAGE else 'video'}_grid_thw") from None
            h, w = h // spatial_merge_size, w // spatial_merge_size
            if n != t * h * w:
                raise InputError(f"row {row}: a placeholder span of {n} tokens does not match its grid "
                                 f"({t}, {h * spatial_merge_size}, {w * spatial_merge_size})")
            hh, ww = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
            pieces.append(torch.stack([torch.full((h * w,), pos), pos + hh.flatten(), pos + ww.flatten()]))
            pos += max(h, w)
        if pieces:
            positions = torch.cat(pieces, dim=1)  # (3, n_valid)
            position_ids[:, row, valid] = positions
            deltas[row] = positions.max() + 1 - len(types)
    return position_ids, deltas


@dataclass(frozen=True)
class MediaItem:
    """One image or video of a batch: its patch rows in pixel_values(_videos), grid and placeholder tokens."""
    kind: int  # IMAGE or VIDEO
    start: int  # first patch row
    grid: tuple[int, int, int]  # (t, h, w) in patches
    tokens: int  # placeholder tokens after the spatial merge

    @property
    def rows(self) -> int:
        return math.prod(self.grid)


def media_of_rows(token_types: torch.Tensor, attention_mask: torch.Tensor, image_grid_thw=None, video_grid_thw=None,
                  spatial_merge_size: int = 2) -> list[list[MediaItem]]:
    """Per row, its media in prompt order (images and videos interleaved as their placeholders appear)."""
    merge = spatial_merge_size ** 2
    streams = {}
    for kind, grids in ((IMAGE, image_grid_thw), (VIDEO, video_grid_thw)):
        items, start = [], 0
        for grid in (grids.tolist() if grids is not None else []):
            items.append(MediaItem(kind, start, tuple(grid), math.prod(grid) // merge))
            start += math.prod(grid)
        streams[kind] = iter(items)
    rows = []
    for row in range(token_types.shape[0]):
        types = token_types[row].cpu()[attention_mask[row].bool().cpu()].tolist()
        media, need = [], {IMAGE: 0, VIDEO: 0}  # placeholder tokens of the current item still to come
        for kind, group in itertools.groupby(types):
            if kind == TEXT:
                continue
            if need[kind] == 0:  # a new item (a video's frames come as several spans split by timestamps)
                item = next(streams[kind], None)
                if item is None:
                    name = "image" if kind == IMAGE else "video"
                    raise InputError(f"row {row}: more {name} placeholder spans than {name}_grid_thw describes")
                media.append(item)
                need[kind] = item.tokens
            need[kind] -= len(list(group))
            if need[kind] < 0:
                raise InputError(f"row {row}: a placeholder span is longer than its grid")
        if any(need.values()):
            raise InputError(f"row {row}: its last placeholder span is shorter than its grid")
        rows.append(media)
    for kind, rest in streams.items():
        left = sum(1 for _ in rest)
        if left:  # media the prompts never show: transformers refuses them too ("features and tokens do not match")
            name = "image" if kind == IMAGE else "video"
            raise InputError(f"{name}_grid_thw describes {left} more {name}(s) than the prompts have placeholders for")
    return rows
