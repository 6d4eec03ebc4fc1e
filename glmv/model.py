"""Glm4vForConditionalGeneration: vision tower + text decoder + the multimodal glue between them.

Module names mirror the checkpoint keys (`model.visual.*`, `model.language_model.*`, `lm_head.*`) so a state dict
loads with no renaming.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from glmv.config import Glm4vConfig
from glmv.errors import InputError
from glmv.text import TextModel, attention_mask_4d
from glmv.vision import VisionTower

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values, as the processor writes them


@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)


class Glm4vModel(nn.Module):
    def __init__(self, config: Glm4vConfig):
        super().__init__()
        self.visual = VisionTower(config.vision)
        self.language_model = TextModel(config.text)


class Glm4vForConditionalGeneration(nn.Module):
    def __init__(self, config: Glm4vConfig):
        super().__init__()
        self.config = config
        self.model = Glm4vModel(config)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.generation_config: dict = {}  # generation_config.json of the checkpoint, set by from_pretrained

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", fast_cpu: bool = True) -> "Glm4vForConditionalGeneration":
        """Load a checkpoint folder. dtype defaults to float32 on CPU and the checkpoint's own on CUDA.
        fast_cpu: on CPU in float32, run linear layers through oneDNN with prepacked weights (glmv.cpu_kernels);
        the model is then for inference only and its state_dict lacks the packed weights."""
        from glmv.weights import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, fast_cpu=fast_cpu)

    def _apply(self, fn, recurse=True):
        from glmv.cpu_kernels import is_packed

        if is_packed(self):
            raise ValueError("this model's linear weights were packed for CPU float32 at load (fast_cpu=True), so it "
                             "cannot be moved or cast; pass device=/dtype= to from_pretrained, or load with "
                             "fast_cpu=False")
        return super()._apply(fn, recurse)

    def to(self, *args, **kwargs):
        device, dtype, _, _ = torch._C._nn._parse_to(*args, **kwargs)
        unchanged = (device is None or torch.device(device) == self.device) and (dtype is None or dtype == self.dtype)
        return self if unchanged else super().to(*args, **kwargs)

    def generate(self, input_ids: torch.Tensor, **kwargs):
        """Static-batch generation; see glmv.generate.generate for the arguments."""
        from glmv.generate import generate

        return generate(self, input_ids, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    def encode_vision(self, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
        """Run the vision tower once over all images and video frames of a batch, packed together.

        Returns (image_features, video_features), each (num_placeholder_tokens, D) or None.
        """
        patches, grids = [], []
        for pixels, grid in ((pixel_values, image_grid_thw), (pixel_values_videos, video_grid_thw)):
            if pixels is not None:
                if grid is None:
                    raise ValueError("pixel values were given without their grid_thw")
                patches.append(pixels)
                grids.append(grid)
        if not patches:
            return None, None
        visual = self.model.visual
        features = visual(torch.cat(patches).to(self.device, self.dtype), torch.cat(grids))
        merge = visual.cfg.spatial_merge_size ** 2
        n_image = int(image_grid_thw.prod(-1).sum()) // merge if pixel_values is not None else 0
        image_features, video_features = features[:n_image], features[n_image:]
        return (image_features if pixel_values is not None else None,
                video_features if pixel_values_videos is not None else None)

    def embed(self, input_ids, token_types, image_features=None, video_features=None) -> torch.Tensor:
        """Token embeddings with vision features scattered into the image/video placeholder positions."""
        x = self.model.language_model.embed_tokens(input_ids)  # (B, T, D)
        for kind, features, name in ((IMAGE, image_features, "image"), (VIDEO, video_features, "video")):
            slots = token_types == kind
            n_slots, n_features = int(slots.sum()), 0 if features is None else features.shape[0]
            if n_slots != n_features:
                raise InputError(f"{name} placeholders and features do not match: {n_slots} {name} tokens in "
                                 f"input_ids, {n_features} {name} feature rows from the vision tower")
            if n_slots:
                x = x.masked_scatter(slots[..., None], features.to(x.dtype))
        return x

    def token_types(self, input_ids: torch.Tensor) -> torch.Tensor:
        """mm_token_type_ids from input_ids, for callers that did not pass them: image placeholders inside a
        begin/end_of_video span are video frames (both use the image token id)."""
        c = self.config
        is_placeholder = (input_ids == c.image_token_id) | (input_ids == c.video_token_id)
        in_video = (input_ids == c.video_start_token_id).cumsum(-1) > (input_ids == c.video_end_token_id).cumsum(-1)
        return torch.where(is_placeholder, torch.where(in_video, VIDEO, IMAGE), TEXT)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                mm_token_type_ids: torch.Tensor | None = None, pixel_values: torch.Tensor | None = None,
                image_grid_thw: torch.Tensor | None = None, pixel_values_videos: torch.Tensor | None = None,
                video_grid_thw: torch.Tensor | None = None, logits_to_keep: int = 0) -> ModelOutput:
        """Full forward over a (left-padded) batch, taking the processor's output as it is.
        logits_to_keep > 0 returns logits for the last that many positions only (full logits of long video
        prompts are large: B x T x vocab)."""
        input_ids = input_ids.to(self.device)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(self.device).bool()
        types = self.token_types(input_ids) if mm_token_type_ids is None else mm_token_type_ids.to(self.device)
        image_features, video_features = self.encode_vision(pixel_values, image_grid_thw,
                                                            pixel_values_videos, video_grid_thw)
        x = self.embed(input_ids, types, image_features, video_features)
        position_ids, _ = rope_index(types, attention_mask, image_grid_thw, video_grid_thw,
                                     self.config.vision.spatial_merge_size)
        mask = attention_mask_4d(attention_mask, input_ids.shape[1])
        hidden = self.model.language_model(x, position_ids.to(self.device), mask)
        if logits_to_keep > 0:
            hidden = hidden[:, -logits_to_keep:]
        return ModelOutput(logits=self.lm_head(hidden))


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
