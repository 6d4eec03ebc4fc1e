"""Model configuration: plain dataclasses parsed once from a checkpoint's config.json.

Three kinds of model share these classes: GLM-4.1V (model_type glm4v / glm46v); GLM-4.5V/4.6V, whose MoE decoder
sets `TextConfig.moe` (glm4v_moe, or glm46v around a glm4v_moe_text decoder); and GLM-OCR (glm_ocr), whose
`GlmOcr*Config` subclasses carry transformers' GlmOcr defaults and switch the few places where the towers differ
(see `VisionConfig.ocr`, `TextConfig.head_dim`). `Glm4vConfig.architecture` names the class that runs a config.

Two layouts exist in the wild and both are accepted:
- the released checkpoints (transformers 4.5x): `rope_theta`, `partial_rotary_factor` and
  `rope_scaling: {"mrope_section": [...]}` inside `text_config` (older revisions also repeat text fields at top level);
- transformers 5: `rope_parameters: {"rope_theta", "partial_rotary_factor", "mrope_section", "rope_type"}`.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field, replace
from typing import ClassVar
from pathlib import Path

from glmv.errors import GlmvError

# GLM-4.6V-Flash ships as glm4v; transformers also names it glm46v (whose text_config may be glm4v_moe_text: MoE).
# GLM-4.5V/4.6V are glm4v_moe, GLM-OCR is glm_ocr.
SUPPORTED_MODEL_TYPES = ("glm4v", "glm46v", "glm4v_moe", "glm_ocr")
MOE_TEXT_TYPE = "glm4v_moe_text"
MOE_ARCHITECTURE = "Glm4vMoeForConditionalGeneration"
_LAYER_KEY = re.compile(r"model\.language_model\.layers\.(\d+)\.")
# A checkpoint's files and names, here without torch (glmv.weights loads them; pipeline.memory_plan reads headers)
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SCALE_SUFFIX = "_scale_inv"   # `X.weight_scale_inv`: the FP8 block scales of `X.weight` (glmv.fp8)


def past_decoder(name: str, num_hidden_layers: int) -> bool:
    """Whether checkpoint tensor `name` sits in a decoder layer past the model's last (the multi-token-prediction
    layer of the released GLM-OCR and MoE files, which generation never runs). Here, without torch: the pipeline's
    driver counts a checkpoint's weights with it (pipeline.memory_plan)."""
    layer = _LAYER_KEY.match(name)
    return layer is not None and int(layer.group(1)) >= num_hidden_layers


class ConfigError(GlmvError, ValueError):
    """A config.json that this library cannot run, with the offending key named."""


@dataclass(frozen=True)
class VisionConfig:
    ocr: ClassVar[bool] = False  # GLM-OCR's tower (GlmOcrVisionConfig): see the properties below
    hidden_size: int = 1536
    depth: int = 24
    num_heads: int = 12
    intermediate_size: int = 13696  # GLM-4.1V: the merger's MLP width; GLM-OCR: the blocks' MLP width
    out_hidden_size: int = 4096
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    image_size: int = 336  # learned position table covers (image_size / patch_size)^2 patches
    rms_norm_eps: float = 1e-5
    hidden_act: str = "silu"
    attention_bias: bool = False
    rope_theta: float = 10000.0

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_size(self) -> int:
        """The blocks' MLP width: GLM-4.1V's is out_hidden_size, GLM-OCR's intermediate_size."""
        return self.intermediate_size if self.ocr else self.out_hidden_size

    @property
    def merger_size(self) -> int:
        """The merger's MLP width: GLM-4.1V's is intermediate_size, GLM-OCR's out_hidden_size * in_channels."""
        return self.out_hidden_size * self.in_channels if self.ocr else self.intermediate_size

    @property
    def block_bias(self) -> bool:
        """Biases on the attention output projection and the blocks' MLP: GLM-OCR follows attention_bias, GLM-4.1V
        has none."""
        return self.ocr and self.attention_bias

    @property
    def qk_norm(self) -> bool:
        """GLM-OCR normalises each head's queries and keys (RMSNorm) before the rotary."""
        return self.ocr

    @property
    def position_table(self) -> bool:
        """GLM-4.1V adds a learned position table after an RMSNorm of the patch embeddings; GLM-OCR has neither."""
        return not self.ocr


@dataclass(frozen=True)
class GlmOcrVisionConfig(VisionConfig):
    """transformers' GlmOcrVisionConfig defaults."""
    ocr: ClassVar[bool] = True
    hidden_size: int = 1024
    num_heads: int = 16
    intermediate_size: int = 4096
    out_hidden_size: int = 1536
    attention_bias: bool = True


@dataclass(frozen=True)
class MoeConfig:
    """The mixture-of-experts fields of a GLM-4.5V/4.6V text_config (transformers' Glm4vMoeTextConfig)."""
    moe_intermediate_size: int = 1408
    n_routed_experts: int = 128
    num_experts_per_tok: int = 8
    n_shared_experts: int = 1
    first_k_dense_replace: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0


@dataclass(frozen=True)
class TextConfig:
    ocr: ClassVar[bool] = False  # GLM-OCR's decoder (GlmOcrTextConfig): no q/k/v bias, head_dim from the file
    vocab_size: int = 151552
    hidden_size: int = 4096
    intermediate_size: int = 13696
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 2
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    partial_rotary_factor: float = 0.5
    mrope_section: tuple[int, ...] = (8, 12, 12)
    max_position_embeddings: int = 65536
    hidden_act: str = "silu"
    attention_bias: bool = True
    pad_token_id: int | None = 151329
    eos_token_id: tuple[int, ...] = (151329, 151336, 151338, 151348)
    # GLM-OCR's and the MoE config.json name their head size (128, not hidden_size / heads: 96 for GLM-OCR, 32 for
    # GLM-4.5V's 96 heads on a 4096 stream); GLM-4.1V's is implied
    explicit_head_dim: int | None = None
    moe: MoeConfig | None = None  # set for the MoE decoder (GLM-4.5V/4.6V)

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def kv_per_position(self, ranks: int = 1) -> int:
        """KV cache elements one position takes on one of `ranks` ranks: keys and values of every layer, for its
        share of the KV heads."""
        return 2 * self.num_hidden_layers * (self.num_key_value_heads // ranks) * self.head_dim


@dataclass(frozen=True)
class GlmOcrTextConfig(TextConfig):
    """transformers' GlmOcrTextConfig defaults (its attention has no q/k/v bias whatever the file says)."""
    ocr: ClassVar[bool] = True
    vocab_size: int = 59392
    hidden_size: int = 1024
    intermediate_size: int = 4096
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int = 8
    partial_rotary_factor: float = 1.0
    max_position_embeddings: int = 131072
    attention_bias: bool = False
    pad_token_id: int | None = None
    eos_token_id: tuple[int, ...] = ()


@dataclass(frozen=True)
class Glm4vConfig:
    text: TextConfig = field(default_factory=TextConfig)
    vision: VisionConfig = field(default_factory=VisionConfig)
    image_token_id: int = 151343
    video_token_id: int = 151344
    image_start_token_id: int = 151339
    image_end_token_id: int = 151340
    video_start_token_id: int = 151341
    video_end_token_id: int = 151342
    tie_word_embeddings: bool = False
    dtype: str | None = "bfloat16"  # the checkpoint's stored dtype, used when the caller names none
    model_type: str = "glm4v"
    # config.json's architectures for a dense decoder: transformers' class, and glmv's of the same name
    dense_architecture: ClassVar[str] = "Glm4vForConditionalGeneration"
    text_model_type: ClassVar[str] = "glm4v_text"
    vision_model_type: ClassVar[str] = "glm4v"

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "Glm4vConfig":
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise ConfigError(f"{config_file}: not found (a GLM-V checkpoint folder holds config.json)")
        try:
            raw = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_file}: not valid JSON ({e})") from None
        return cls.from_dict(raw, source=str(config_file))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config.json") -> "Glm4vConfig":
        raw = _dict(raw, "the file", source)
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ConfigError(
                f"{source}: model_type {model_type!r} is not supported; expected one of {SUPPORTED_MODEL_TYPES}"
            )
        kind = GlmOcrConfig if model_type == "glm_ocr" else Glm4vConfig
        if cls is not Glm4vConfig and kind is not cls:
            raise ConfigError(f"{source}: model_type {model_type!r} is not a {cls.__name__} (read it with "
                              f"Glm4vConfig, which takes every supported model_type)")
        defaults = kind()
        # Older revisions keep text fields at top level; text_config wins where both exist.
        text_raw = {**{k: v for k, v in raw.items() if k not in ("text_config", "vision_config")},
                    **_dict(raw.get("text_config"), "text_config", source)}
        vision_raw = _dict(raw.get("vision_config"), "vision_config", source)
        dtype = raw.get("dtype") or raw.get("torch_dtype") or text_raw.get("dtype") or text_raw.get("torch_dtype")
        ids = {k: raw[k] for k in ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id",
                                   "video_start_token_id", "video_end_token_id") if k in raw}
        moe = model_type == "glm4v_moe" or text_raw.get("model_type") == MOE_TEXT_TYPE
        text = _parse_text(text_raw, source, defaults.text, reads_head_dim=defaults.text.ocr or moe)
        if moe:
            text = _parse_moe_text(text, text_raw, source)
        config = kind(
            text=text,
            vision=_parse_vision(vision_raw, source, defaults.vision),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            dtype=dtype,
            model_type=model_type,
            **{k: _int(v, k, source) for k, v in ids.items()},
        )
        config.validate(source)
        return config

    def validate(self, source: str = "config.json") -> None:
        t, v = self.text, self.vision
        sizes = {"text_config.num_attention_heads": t.num_attention_heads,
                 "text_config.num_key_value_heads": t.num_key_value_heads, "text_config.hidden_size": t.hidden_size,
                 "text_config.num_hidden_layers": t.num_hidden_layers, "vision_config.num_heads": v.num_heads,
                 "vision_config.hidden_size": v.hidden_size, "vision_config.patch_size": v.patch_size,
                 "vision_config.spatial_merge_size": v.spatial_merge_size}
        for key, value in sizes.items():
            if value <= 0:
                raise ConfigError(f"{source}: {key} must be > 0, got {value}")
        checks = [
            (t.explicit_head_dim is not None or t.hidden_size % t.num_attention_heads == 0,
             "text_config.hidden_size must be divisible by num_attention_heads"),
            (t.explicit_head_dim is None or t.explicit_head_dim > 0, "text_config.head_dim must be > 0"),
            (t.num_attention_heads % t.num_key_value_heads == 0,
             "text_config.num_attention_heads must be divisible by num_key_value_heads"),
            (t.rotary_dim % 2 == 0 and 0 < t.rotary_dim <= t.head_dim,
             "text_config partial_rotary_factor gives an odd or out-of-range rotary dimension"),
            (2 * sum(t.mrope_section) == t.rotary_dim,
             f"text_config mrope_section {list(t.mrope_section)} must sum to rotary_dim/2 = {t.rotary_dim // 2}"),
            (len(t.mrope_section) == 3, "text_config mrope_section must have 3 entries (t, h, w)"),
            (t.hidden_act == "silu", f"text_config.hidden_act {t.hidden_act!r} is not supported (silu only)"),
            (v.hidden_size % v.num_heads == 0, "vision_config.hidden_size must be divisible by num_heads"),
            (v.head_dim % 4 == 0, "vision_config head dim must be divisible by 4 (2-D rotary over h and w)"),
            (v.hidden_act == "silu", f"vision_config.hidden_act {v.hidden_act!r} is not supported (silu only)"),
            (v.out_hidden_size == t.hidden_size,
             "vision_config.out_hidden_size must equal text_config.hidden_size (features go into the text stream)"),
            (v.image_size % v.patch_size == 0, "vision_config.image_size must be a multiple of patch_size"),
            (not self.tie_word_embeddings, "tie_word_embeddings=true is not supported (GLM-V has an untied lm_head)"),
        ]
        if t.moe is not None:
            checks += _moe_checks(t)
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"{source}: {message}")

    @property
    def architecture(self) -> str:
        """The class that runs this config: config.json's architectures entry, transformers' class and glmv's."""
        return MOE_ARCHITECTURE if self.text.moe is not None else self.dense_architecture

    @property
    def kind(self) -> str:
        """model_type, and the decoder where it is a mixture of experts (a glm46v config can be either), for
        messages."""
        return f"{self.model_type} mixture-of-experts" if self.text.moe is not None else self.model_type

    def to_dict(self) -> dict:
        """config.json in the released-checkpoint layout (what the real GLM-4.1V, GLM-4.5V and GLM-OCR files look
        like)."""
        text = asdict(self.text)
        head_dim = text.pop("explicit_head_dim")
        rope = {"rope_type": "default", "mrope_section": list(text.pop("mrope_section"))}
        if self.text.ocr:   # GLM-OCR's file: transformers-5 rope_parameters and its head_dim
            rope.update(partial_rotary_factor=text.pop("partial_rotary_factor"), rope_theta=text.pop("rope_theta"))
            text.update(rope_parameters=rope, **({"head_dim": head_dim} if head_dim else {}))
        else:
            text["rope_scaling"] = rope
        text.update(
            model_type=self.text_model_type,
            eos_token_id=list(self.text.eos_token_id),
            attention_dropout=0.0,
            use_cache=True,
            dtype=self.dtype,
        )
        del text["moe"]
        vision = asdict(self.vision)
        vision.update(model_type=self.vision_model_type, hidden_dropout_prob=0.0, attention_dropout=0.0)
        vision["rope_parameters"] = {"rope_type": "axial", "rope_theta": vision.pop("rope_theta")}
        if self.text.moe is not None:
            _moe_to_dict(self.text, text, vision)
        return {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "image_start_token_id": self.image_start_token_id,
            "image_end_token_id": self.image_end_token_id,
            "video_start_token_id": self.video_start_token_id,
            "video_end_token_id": self.video_end_token_id,
            "image_token_id": self.image_token_id,
            "video_token_id": self.video_token_id,
            "tie_word_embeddings": self.tie_word_embeddings,
            "dtype": self.dtype,
            "text_config": text,
            "vision_config": vision,
        }


@dataclass(frozen=True)
class GlmOcrConfig(Glm4vConfig):
    """GLM-OCR (model_type glm_ocr), with transformers' GlmOcrConfig defaults."""
    text: TextConfig = field(default_factory=GlmOcrTextConfig)
    vision: VisionConfig = field(default_factory=GlmOcrVisionConfig)
    image_token_id: int = 59280
    video_token_id: int = 59281
    image_start_token_id: int = 59256
    image_end_token_id: int = 59257
    video_start_token_id: int = 59258
    video_end_token_id: int = 59259
    model_type: str = "glm_ocr"
    dense_architecture: ClassVar[str] = "GlmOcrForConditionalGeneration"
    text_model_type: ClassVar[str] = "glm_ocr_text"
    vision_model_type: ClassVar[str] = "glm_ocr_vision"


def _parse_text(raw: dict, source: str, defaults: TextConfig, reads_head_dim: bool) -> TextConfig:
    rope = _dict(raw.get("rope_parameters"), "text_config.rope_parameters", source)
    scaling = _dict(raw.get("rope_scaling"), "text_config.rope_scaling", source)
    rope_type = rope.get("rope_type") or scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ("default", "mrope"):
        raise ConfigError(f"{source}: text_config rope_type {rope_type!r} is not supported (default M-RoPE only)")
    mrope = rope.get("mrope_section") or scaling.get("mrope_section") or [8, 12, 12]
    if not isinstance(mrope, (list, tuple)):
        raise ConfigError(f"{source}: text_config mrope_section must be a list of 3 integers, got {mrope!r}")
    eos = raw.get("eos_token_id", defaults.eos_token_id)
    eos = () if eos is None else (eos,) if isinstance(eos, int) else eos
    if not isinstance(eos, (list, tuple)):
        raise ConfigError(f"{source}: eos_token_id must be an integer or a list of them, got {eos!r}")
    head_dim = raw.get("head_dim") if reads_head_dim else None   # GLM-OCR's and MoE's; transformers' glm4v ignores it
    return type(defaults)(
        vocab_size=_int(raw.get("vocab_size", defaults.vocab_size), "vocab_size", source),
        hidden_size=_int(raw.get("hidden_size", defaults.hidden_size), "hidden_size", source),
        intermediate_size=_int(raw.get("intermediate_size", defaults.intermediate_size), "intermediate_size", source),
        num_hidden_layers=_int(raw.get("num_hidden_layers", defaults.num_hidden_layers), "num_hidden_layers", source),
        num_attention_heads=_int(raw.get("num_attention_heads", defaults.num_attention_heads), "num_attention_heads",
                                 source),
        num_key_value_heads=_int(raw.get("num_key_value_heads") or raw.get("num_attention_heads")
                                 or defaults.num_key_value_heads, "num_key_value_heads", source),
        rms_norm_eps=_float(raw.get("rms_norm_eps", defaults.rms_norm_eps), "text_config.rms_norm_eps", source),
        rope_theta=_float(rope.get("rope_theta", raw.get("rope_theta", defaults.rope_theta)), "rope_theta", source),
        # transformers treats a missing factor as 1.0 (full rotation); the released files always set 0.5
        partial_rotary_factor=_float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0)),
                                     "partial_rotary_factor", source),
        mrope_section=tuple(_int(x, "mrope_section", source) for x in mrope),
        max_position_embeddings=_int(raw.get("max_position_embeddings", defaults.max_position_embeddings),
                                     "max_position_embeddings", source),
        hidden_act=raw.get("hidden_act", defaults.hidden_act),
        attention_bias=defaults.attention_bias if defaults.ocr else bool(raw.get("attention_bias",
                                                                                 defaults.attention_bias)),
        pad_token_id=raw.get("pad_token_id", defaults.pad_token_id),
        eos_token_id=tuple(_int(x, "eos_token_id", source) for x in eos),
        explicit_head_dim=None if head_dim is None else _int(head_dim, "text_config.head_dim", source),
    )


def _parse_vision(raw: dict, source: str, d: VisionConfig) -> VisionConfig:
    rope = _dict(raw.get("rope_parameters"), "vision_config.rope_parameters", source)

    def get(key, conv=int):
        value = raw.get(key, getattr(d, key))
        if isinstance(value, (list, tuple)):  # transformers allows (h, w) pairs for sizes; GLM-V uses squares
            if len(set(value)) != 1:
                raise ConfigError(f"{source}: vision_config.{key} {value} must be square")
            value = value[0]
        return _int(value, f"vision_config.{key}", source) if conv is int else conv(value, f"vision_config.{key}",
                                                                                    source)

    return type(d)(
        hidden_size=get("hidden_size"),
        depth=get("depth"),
        num_heads=get("num_heads"),
        intermediate_size=get("intermediate_size"),
        out_hidden_size=get("out_hidden_size"),
        patch_size=get("patch_size"),
        temporal_patch_size=get("temporal_patch_size"),
        spatial_merge_size=get("spatial_merge_size"),
        in_channels=get("in_channels"),
        image_size=get("image_size"),
        rms_norm_eps=get("rms_norm_eps", _float),
        hidden_act=raw.get("hidden_act", d.hidden_act),
        attention_bias=bool(raw.get("attention_bias", d.attention_bias)),
        rope_theta=_float(rope.get("rope_theta", d.rope_theta), "vision_config.rope_theta", source),
    )


def _parse_moe_text(text: TextConfig, raw: dict, source: str) -> TextConfig:
    """The MoE fields of a glm4v_moe_text config (its head_dim is read by _parse_text)."""
    d = MoeConfig()
    ints = {k: _int(raw.get(k, getattr(d, k)), f"text_config.{k}", source)
            for k in ("moe_intermediate_size", "n_routed_experts", "num_experts_per_tok", "n_shared_experts",
                      "first_k_dense_replace", "n_group", "topk_group")}
    moe = MoeConfig(**ints, norm_topk_prob=bool(raw.get("norm_topk_prob", d.norm_topk_prob)),
                    routed_scaling_factor=_float(raw.get("routed_scaling_factor", d.routed_scaling_factor),
                                                 "text_config.routed_scaling_factor", source))
    rope = raw.get("rope_parameters") or {}
    # transformers' Glm4vMoeTextConfig defaults a missing partial_rotary_factor to 0.5 (the dense one to 1.0)
    factor = text.partial_rotary_factor if "partial_rotary_factor" in rope or "partial_rotary_factor" in raw else 0.5
    return replace(text, moe=moe, partial_rotary_factor=factor)


def _moe_checks(t: TextConfig) -> list[tuple[bool, str]]:
    m = t.moe
    per_group = m.n_routed_experts // max(m.n_group, 1)
    return [
        (m.n_group > 0 and m.n_routed_experts % m.n_group == 0,
         "text_config.n_routed_experts must be a multiple of n_group"),
        (per_group >= 2, "text_config: each expert group needs 2 or more experts (groups are scored by their top 2)"),
        (0 < m.topk_group <= m.n_group, "text_config.topk_group must be in 1..n_group"),
        (0 < m.num_experts_per_tok <= m.topk_group * per_group,
         "text_config.num_experts_per_tok must be in 1..(experts in topk_group groups)"),
        (m.first_k_dense_replace <= t.num_hidden_layers, "text_config.first_k_dense_replace exceeds num_hidden_layers"),
        (m.moe_intermediate_size > 0, "text_config.moe_intermediate_size must be > 0"),
    ]


def _moe_to_dict(t: TextConfig, text: dict, vision: dict) -> None:
    """config.json fields of the MoE text config, as GLM-4.5V's file spells them."""
    text.update(asdict(t.moe), model_type=MOE_TEXT_TYPE, head_dim=t.head_dim)
    vision["model_type"] = "glm4v_moe_vision"


def _int(value, key: str, source: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{source}: {key} must be a non-negative integer, got {value!r}")
    return value


def _float(value, key: str, source: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or value < 0:
        raise ConfigError(f"{source}: {key} must be a non-negative number, got {value!r}")
    return float(value)


def _dict(value, key: str, source: str) -> dict:
    """A JSON object of the config (absent or null: empty)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{source}: {key} must be a JSON object, got {type(value).__name__} {str(value)[:80]!r}")
    return value
