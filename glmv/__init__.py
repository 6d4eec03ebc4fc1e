"""glmv: the GLM-V vision-language models (GLM-4.1V architecture, GLM-4.5V/4.6V MoE) and GLM-OCR in plain PyTorch."""

import os

# Large CPU tensors (model weights above all) in 2 MiB transparent huge pages: a CPU decode step streams every
# weight once per token, and with 4 KiB pages those reads ran ~12% slower (bench/bench_generate.py). torch reads
# this switch once, at its first CPU allocation, so it is set before any glmv module imports torch. A value the
# user set wins (THP_MEM_ALLOC_ENABLE=0 turns it off).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from glmv.config import ConfigError, Glm4vConfig, GlmOcrConfig
from glmv.errors import GlmvError, InputError, MediaError, ProcessorConfigError
from glmv.generate import GenerateOutput, RowResult
from glmv.image import LoadedImage, PatchSettings
from glmv.auto import AutoModelForImageTextToText
from glmv.model import Glm4vForConditionalGeneration, GlmOcrForConditionalGeneration
from glmv.moe import Glm4vMoeForConditionalGeneration
from glmv.output import ParsedOutput, parse_output
from glmv.pipelines import pipeline
from glmv.processor import Glm4vProcessor, Glm46VProcessor
from glmv.video import LoadedVideo, VideoSettings
from glmv.weights import CheckpointError

__version__ = "0.1.0"

__all__ = [
    "AutoModelForImageTextToText", "CheckpointError", "ConfigError", "GenerateOutput", "Glm46VProcessor",
    "Glm4vConfig", "Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration", "Glm4vProcessor",
    "GlmOcrConfig", "GlmOcrForConditionalGeneration", "GlmvError", "InputError", "LoadedImage", "LoadedVideo",
    "MediaError", "ParsedOutput", "PatchSettings", "ProcessorConfigError", "RowResult", "VideoSettings",
    "parse_output", "pipeline",
]
