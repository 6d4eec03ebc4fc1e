"""The model class a checkpoint needs, from its config.json: dense GLM-4.1V architecture or GLM-4.5V/4.6V MoE."""

from __future__ import annotations

from pathlib import Path

from glmv.config import Glm4vConfig


def model_class(path: str | Path) -> type:
    """glmv.Glm4vMoeForConditionalGeneration for model_type glm4v_moe (and glm46v with a glm4v_moe_text decoder),
    glmv.Glm4vForConditionalGeneration for the others."""
    from glmv.model import Glm4vForConditionalGeneration
    from glmv.moe import Glm4vMoeForConditionalGeneration

    config = Glm4vConfig.from_pretrained(path)
    return Glm4vMoeForConditionalGeneration if config.text.moe is not None else Glm4vForConditionalGeneration


def from_pretrained(path: str | Path, **kwargs):
    """Load a checkpoint folder into the class its config names; kwargs as for Glm4vForConditionalGeneration."""
    return model_class(path).from_pretrained(path, **kwargs)
