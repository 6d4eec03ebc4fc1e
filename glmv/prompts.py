"""From a processor batch to what the engine schedules: one `Prompt` per row, unique media, shared prefixes.

- A row's real tokens (left padding dropped), their 3-D rope positions and the offset of its generated tokens.
- Media: an image or video that appears in several rows with the same pixels (the tasks of one item) is one `Media`,
  so the vision tower runs on it once.
- Shared prefixes: rows that show the same media behind the same leading tokens (the GLM templates put the media
  first, so the tasks of one item share everything up to their prompt text) form a `PrefixGroup`. Its common prefix
  is prefilled once and copied into each member's cache slot; each member then prefills only its own suffix.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from glmv.errors import InputError
from glmv.positions import IMAGE, TEXT, VIDEO, MediaItem, media_of_rows, rope_index


@dataclass
class Media:
    kind: int  # IMAGE or VIDEO
    pixels: torch.Tensor  # (patch rows, C*T*P*P)
    grid: tuple[int, int, int]
    tokens: int  # placeholder tokens after the spatial merge


@dataclass
class Prompt:
    index: int  # row in the caller's batch
    ids: torch.Tensor  # (n,) real tokens
    types: torch.Tensor  # (n,) TEXT / IMAGE / VIDEO
    positions: torch.Tensor  # (3, n) rope positions
    delta: int  # a token generated after the n real ones sits at n + delta (+ how many came before it)
    media: list[int]  # indices into PromptBatch.media, in prompt order
    media_end: int  # tokens up to the end of the last media span (0: text only)
    group: int | None = None  # index into PromptBatch.groups
    prefix_len: int = 0  # tokens of the group's shared prefix (0: none)

    @property
    def length(self) -> int:
        return self.ids.shape[0]


@dataclass
class PrefixGroup:
    members: list[int]  # prompt indices, in order
    length: int  # shared prefix tokens (all of them media or before the last media span, or common text after)


@dataclass
class PromptBatch:
    prompts: list[Prompt]
    media: list[Media]
    groups: list[PrefixGroup] = field(default_factory=list)


def build(input_ids, valid, token_types, pixel_values=None, image_grid_thw=None, pixel_values_videos=None,
          video_grid_thw=None, spatial_merge_size: int = 2, share_prefix: bool = True) -> PromptBatch:
    """input_ids, valid (attention mask, bool), token_types: (B, T) left-padded on one device."""
    for name, pixels, grids in (("pixel_values", pixel_values, image_grid_thw),
                                ("pixel_values_videos", pixel_values_videos, video_grid_thw)):
        rows = 0 if grids is None else int(grids.prod(-1).sum())
        if (pixels is None) != (grids is None) or (pixels is not None and pixels.shape[0] != rows):
            raise InputError(f"{name}: {'none' if pixels is None else pixels.shape[0]} patch rows where its grid_thw "
                             f"describes {'none' if grids is None else rows}")
    positions, deltas = rope_index(token_types, valid, image_grid_thw, video_grid_thw, spatial_merge_size)
    items = media_of_rows(token_types, valid, image_grid_thw, video_grid_thw, spatial_merge_size)
    pixels = {IMAGE: pixel_values, VIDEO: pixel_values_videos}
    media, index_of = _unique_media([m for row in items for m in row], pixels)
    device = input_ids.device
    prompts = []
    for row, row_items in enumerate(items):
        n = int(valid[row].sum())
        types = token_types[row, -n:]
        is_media = (types != TEXT).nonzero()
        prompts.append(Prompt(
            index=row, ids=input_ids[row, -n:], types=types, positions=positions[:, row, -n:].to(device),
            delta=int(deltas[row]), media=[index_of[id(m)] for m in row_items],
            media_end=int(is_media.max()) + 1 if len(is_media) else 0))
    batch = PromptBatch(prompts, media)
    if share_prefix:
        batch.groups = _prefix_groups(prompts)
    return batch


def _unique_media(items: list[MediaItem], pixels: dict) -> tuple[list[Media], dict[int, int]]:
    """One Media per distinct (kind, grid, pixels); maps id(item) -> its Media index. Only items that agree on a
    few sampled values are compared in full: a window of many same-size images would otherwise compare each one
    with every earlier one (quadratic in the window; ~0.5 ms per pair of 448x448 images on CPU)."""
    media, index_of, by_key = [], {}, {}
    for item, sample in zip(items, _samples(items, pixels)):
        rows = pixels[item.kind][item.start:item.start + item.rows]
        candidates = by_key.setdefault((item.kind, item.grid, sample), [])
        match = next((i for i in candidates if torch.equal(media[i].pixels, rows)), None)
        if match is None:
            match = len(media)
            media.append(Media(item.kind, rows, item.grid, item.tokens))
            candidates.append(match)
        index_of[id(item)] = match
    return media, index_of


SAMPLES_PER_ITEM = 16


def _samples(items: list[MediaItem], pixels: dict) -> list[tuple]:
    """SAMPLES_PER_ITEM values of each item's patch rows at the same relative places: one gather and one host copy
    per kind of media. Equal pixels give equal samples."""
    out: list[tuple] = [()] * len(items)
    for kind in (IMAGE, VIDEO):
        which = [i for i, item in enumerate(items) if item.kind == kind]
        if not which:
            continue
        source = pixels[kind]  # present: build() checked that pixels and grids come together
        k = torch.arange(SAMPLES_PER_ITEM)
        starts = torch.tensor([items[i].start for i in which])[:, None]
        counts = torch.tensor([items[i].rows for i in which])[:, None]
        rows = starts + k * counts // SAMPLES_PER_ITEM  # (n, K) spread over each item's rows
        cols = (k * 7919) % source.shape[1]  # spread over the columns (a prime stride)
        values = source[rows.to(source.device), cols.to(source.device).expand_as(rows)].tolist()
        for i, sample in zip(which, values):
            out[i] = tuple(sample)
    return out


def _prefix_groups(prompts: list[Prompt]) -> list[PrefixGroup]:
    """Rows with equal tokens and media up to the end of their media share the longest common prefix of all their
    tokens (each member keeps at least one token of its own, whose logits start its generation)."""
    by_key: dict[tuple, list[Prompt]] = {}
    for p in prompts:
        if p.media_end and p.media_end < p.length:
            by_key.setdefault((tuple(p.ids[:p.media_end].tolist()), tuple(p.media)), []).append(p)
    groups = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        length = min(p.length for p in members) - 1
        first = members[0].ids
        for p in members[1:]:
            differs = (p.ids[:length] != first[:length]).nonzero()
            length = int(differs[0]) if len(differs) else length
        for p in members:
            p.group, p.prefix_len = len(groups), length
        groups.append(PrefixGroup([p.index for p in members], length))
    return groups
