"""glmv: the GLM-V (GLM-4.1V architecture) vision-language model in plain PyTorch."""

from glmv.config import ConfigError, Glm4vConfig
from glmv.errors import GlmvError, MediaError, ProcessorConfigError
from glmv.generate import GenerateOutput, RowResult
from glmv.model import Glm4vForConditionalGeneration
from glmv.output import ParsedOutput, parse_output
from glmv.pipelines import pipeline
from glmv.processor import Glm4vProcessor, Glm46VProcessor
from glmv.weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "GenerateOutput", "Glm46VProcessor", "Glm4vConfig",
    "Glm4vForConditionalGeneration", "Glm4vProcessor", "GlmvError", "MediaError", "ParsedOutput",
    "ProcessorConfigError", "RowResult", "parse_output", "pipeline",
]
