"""glmv: the GLM-V (GLM-4.1V architecture) vision-language model in plain PyTorch."""

from glmv.config import ConfigError, Glm4vConfig
from glmv.model import Glm4vForConditionalGeneration
from glmv.weights import CheckpointError

__version__ = "0.1.0"

__all__ = ["CheckpointError", "ConfigError", "Glm4vConfig", "Glm4vForConditionalGeneration"]
