"""Glm4vForConditionalGeneration: vision tower + text decoder + the multimodal glue between them.

GlmOcrForConditionalGeneration is the same model built from a GLM-OCR config (its tower and decoder switches live in
`glmv.config`); glmv.moe's Glm4vMoeForConditionalGeneration swaps in the MoE decoder. Each class runs the configs
whose `architecture` is its own; `glmv.auto.AutoModelForImageTextToText` picks the class from config.json.

Module names mirror the checkpoint keys (`model.visual.*`, `model.language_model.*`, `lm_head.*`) so a state dict
loads with no renaming. Besides transformers' calls (`from_pretrained`, `forward`, `generate`) the model offers the
narrow interface generation runs on: `encode_vision`, `embed`, `new_cache`, `prefill`, `decode`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from glmv import parallel
from glmv.attention import Decode, Prefill
from glmv.config import ConfigError, Glm4vConfig, past_decoder
from glmv.errors import InputError
from glmv.generate import generate
from glmv.paged import PagedKVCache
from glmv.positions import IMAGE, TEXT, VIDEO, rope_index  # noqa: F401  (TEXT re-exported)
from glmv.text import TextModel, attention_mask_4d
from glmv.vision import VisionTower, frames_grid
from glmv.weights import Piece



@dataclass
class ModelOutput:
    logits: torch.Tensor  # (B, T, vocab)


class Glm4vModel(nn.Module):
    def __init__(self, config: Glm4vConfig, text_model: type[nn.Module] = TextModel):
        super().__init__()
        self.visual = VisionTower(config.vision)
        self.language_model = text_model(config.text)


class Glm4vForConditionalGeneration(nn.Module):
    architecture = "Glm4vForConditionalGeneration"  # the configs this class runs (Glm4vConfig.architecture)
    text_model = TextModel  # the decoder class (glmv.moe's for GLM-4.5V/4.6V)
    has_mtp_layer = False  # the released files carry a multi-token-prediction layer past the decoder's

    def __init__(self, config: Glm4vConfig):
        super().__init__()
        if not self.runs(config):
            raise ConfigError(f"a {config.kind} config is run by {config.architecture}, not {type(self).__name__}")
        self.config = config
        self.model = Glm4vModel(config, self.text_model)
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        self.generation_config: dict = {}  # generation_config.json of the checkpoint, set by from_pretrained
        self.name_or_path = ""  # the checkpoint folder, set by from_pretrained
        self.parallel = parallel.SINGLE  # the ranks this model is split across (glmv.parallel.shard)

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: torch.dtype | str | None = None,
                        device: torch.device | str = "cpu", fast_cpu: bool = True,
                        tensor_parallel: parallel.Group | None = None) -> "Glm4vForConditionalGeneration":
        """Load a checkpoint folder. dtype defaults to float32 on CPU and the checkpoint's own on CUDA.
        fast_cpu: on CPU in float32, run linear layers through oneDNN with prepacked weights (glmv.cpu_kernels);
        the model is then for inference only and its state_dict lacks the packed weights.
        tensor_parallel: this rank's place in the group the decoder is split across (glmv.parallel); every rank
        of the group calls from_pretrained and then runs the same calls."""
        from glmv.weights import load_pretrained

        return load_pretrained(cls, path, dtype=dtype, device=device, fast_cpu=fast_cpu,
                               tensor_parallel=tensor_parallel)

    @classmethod
    def runs(cls, config: Glm4vConfig) -> bool:
        """Whether this class runs `config`: a glm46v config, for one, is dense or MoE by its text_config."""
        return config.architecture == cls.architecture

    def checkpoint_piece(self, name: str, scale_rows: int | None = None) -> Piece | None:
        """Where checkpoint tensor `name` goes (glmv.weights), or None to skip it: the multi-token-prediction layer
        (layer index num_hidden_layers and up) of the classes whose files carry one, which generation never runs
        (transformers skips it too). scale_rows: for glmv.moe's stacked experts."""
        if self.has_mtp_layer and past_decoder(name, self.config.text.num_hidden_layers):
            return None
        return Piece(name)

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
        """Batched generation, transformers-like; see glmv.generate.generate for the arguments."""
        return generate(self, input_ids, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.language_model.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.model.language_model.embed_tokens.weight.device

    def encode_vision(self, pixel_values=None, image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None):
        """Run the vision tower once over all images and video frames of a batch, packed together (over several
        ranks, each rank over its share of them: `_run_tower`).

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
        features = self._run_tower(torch.cat(patches), torch.cat(grids))
        merge = self.model.visual.cfg.spatial_merge_size ** 2
        n_image = int(image_grid_thw.prod(-1).sum()) // merge if pixel_values is not None else 0
        image_features, video_features = features[:n_image], features[n_image:]
        return (image_features if pixel_values is not None else None,
                video_features if pixel_values_videos is not None else None)

    def _run_tower(self, patches: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """patches (N, C*T*P*P) of the items grid_thw (items, 3) -> features (N / merge^2, D), on every rank. Over
        several ranks the tower is data-parallel: each rank encodes its share of the frames (glmv.parallel.share, by
        patch count; the tower never mixes frames, so a share may end inside a video) and the ranks gather the
        features, so each frame is computed once and its bits are the same on every rank."""
        visual, group = self.model.visual, self.parallel
        if group.world == 1:
            return visual(patches.to(self.device, self.dtype), grid_thw)
        visual.check_input(patches, grid_thw)
        sizes = grid_thw[:, 1:].prod(-1).repeat_interleave(grid_thw[:, 0]).tolist()  # patches per frame
        shares = parallel.share(sizes, group.world)
        rows = [sum(sizes[r.start:r.stop]) for r in shares]  # patches per rank
        mine, start = shares[group.rank], sum(rows[:group.rank])
        if mine:
            local = visual(patches[start:start + rows[group.rank]].to(self.device, self.dtype),
                           frames_grid(grid_thw, mine)).to(self.dtype)
        else:  # nothing to encode, but the gather needs every rank
            local = torch.empty(0, visual.cfg.out_hidden_size, dtype=self.dtype, device=self.device)
        merge = visual.cfg.spatial_merge_size ** 2
        return group.gather_rows(local, [n // merge for n in rows])

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

    def new_cache(self, blocks: int, block_size: int, slots: int, max_blocks: int) -> PagedKVCache:
        """An empty paged KV cache: a pool of `blocks` blocks of `block_size` positions (block 0: scratch), block
        tables of `slots` rows of up to `max_blocks` blocks, in the model's dtype and device; this rank's KV heads."""
        cfg = self.config.text
        return PagedKVCache(cfg.num_hidden_layers, blocks, block_size, slots, max_blocks, self.kv_heads,
                            cfg.head_dim, self.dtype, self.device)

    @property
    def kv_heads(self) -> int:
        """The KV heads this rank holds (all of them on one rank)."""
        return self.config.text.num_key_value_heads // self.parallel.world

    def cache_bytes(self, slots: int, max_len: int) -> int:
        """KV memory of `slots` rows of `max_len` positions (a pool of slots * max_len / block_size blocks), on
        this rank."""
        return self.config.text.kv_per_position(self.parallel.world) * slots * max_len * self.dtype.itemsize

    def prefill(self, embeds: torch.Tensor, position_ids: torch.Tensor, batch: Prefill,
                last: torch.Tensor | None = None) -> torch.Tensor | None:
        """Packed rows: embeds (N, D), position_ids (3, N) fill the rows' cache slots. Returns the logits (len(last),
        V) at the packed indices `last` (each row's last token), or None when only the cache is wanted."""
        keep = last if last is not None else torch.zeros(0, dtype=torch.long, device=embeds.device)
        hidden = self.model.language_model.prefill(embeds, position_ids, batch, keep)
        return None if last is None else parallel.logits(self, hidden)

    def decode(self, tokens: torch.Tensor, position_ids: torch.Tensor, batch: Decode) -> torch.Tensor:
        """One token per cache slot: tokens (B,), rope positions (B,) -> logits (B, V). Static shapes."""
        return parallel.logits(self, self.model.language_model.decode_step(tokens, position_ids, batch))

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
        return ModelOutput(logits=parallel.logits(self, hidden))


class GlmOcrForConditionalGeneration(Glm4vForConditionalGeneration):
    """GLM-OCR (model_type glm_ocr): the GLM-4.1V architecture with its own vision tower and decoder switches."""
    architecture = "GlmOcrForConditionalGeneration"
    has_mtp_layer = True  # `num_nextn_predict_layers` in config.json
