"""glmv: the GLM-V (GLM-4.1V architecture) vision-language model in plain PyTorch."""

from glmv.config import ConfigError, Glm4vConfig
from glmv.errors import GlmvError, InputError, MediaError, ProcessorConfigError
from glmv.generate import GenerateOutput, RowResult
from glmv.image import LoadedImage, PatchSettings
from glmv.model import Glm4vForConditionalGeneration
from glmv.output import ParsedOutput, parse_output
from glmv.pipelines import pipeline
from glmv.processor import Glm4vProcessor, Glm46VProcessor
from glmv.video import LoadedVideo, VideoSettings
from glmv.weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "CheckpointError", "ConfigError", "GenerateOutput", "Glm46VProcessor", "Glm4vConfig",
    "Glm4vForConditionalGeneration", "Glm4vProcessor", "GlmvError", "InputError", "LoadedImage", "LoadedVideo",
    "MediaError", "ParsedOutput", "PatchSettings", "ProcessorConfigError", "RowResult", "VideoSettings",
    "parse_output", "pipeline",
]
