"""The model class a checkpoint needs, from its config.json: GLM-4.1V architecture, GLM-4.5V/4.6V MoE or GLM-OCR.

The one place that knows every class (glmv.moe builds on glmv.model, so the dispatch cannot live in glmv.model).
A config names its class (`Glm4vConfig.architecture`, transformers' class name); each class runs only those configs.
"""

from __future__ import annotations

from pathlib import Path

from glmv.config import Glm4vConfig
from glmv.model import Glm4vForConditionalGeneration, GlmOcrForConditionalGeneration
from glmv.moe import Glm4vMoeForConditionalGeneration

MODEL_CLASSES = {cls.architecture: cls for cls in (Glm4vForConditionalGeneration, Glm4vMoeForConditionalGeneration,
                                                   GlmOcrForConditionalGeneration)}


def model_class(config: Glm4vConfig) -> type[Glm4vForConditionalGeneration]:
    """Glm4vMoeForConditionalGeneration where the text config has a mixture of experts (model_type glm4v_moe, or
    glm46v around a glm4v_moe_text decoder), GlmOcrForConditionalGeneration for glm_ocr, else
    Glm4vForConditionalGeneration."""
    return MODEL_CLASSES[config.architecture]


class AutoModelForImageTextToText:
    """transformers' auto class: `from_pretrained` loads a checkpoint folder with the class its config.json needs."""

    def __init__(self):
        raise TypeError("use AutoModelForImageTextToText.from_pretrained(path)")

    @staticmethod
    def from_pretrained(path: str | Path, **kwargs) -> Glm4vForConditionalGeneration:
        """kwargs as for Glm4vForConditionalGeneration.from_pretrained."""
        return model_class(Glm4vConfig.from_pretrained(path)).from_pretrained(path, **kwargs)
