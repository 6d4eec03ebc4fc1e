"""glmv: the GLM-V vision-language models (GLM-4.1V architecture, GLM-4.5V/4.6V MoE) and GLM-OCR in plain PyTorch."""

import os

# Large CPU tensors (model weights above all) in 2 MiB transparent huge pages: a CPU decode step streams every
# weight once per token, and with 4 KiB pages those reads ran ~12% slower (bench/bench_generate.py). torch reads
# this switch once, at its first CPU allocation, so it is set before any glmv module imports torch. A value the
# user set wins (THP_MEM_ALLOC_ENABLE=0 turns it off).
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

# What `glmv.X` / `from glmv import X` resolves to, imported on first use (PEP 562): importing glmv.config or
# glmv.errors alone (the Ray job's driver reads a checkpoint's config for its memory plan) must not import torch
# and the whole model library, ~1.5-3 s of CPU on a small machine.
_EXPORTS = {
    "ConfigError": "glmv.config", "Glm4vConfig": "glmv.config", "GlmOcrConfig": "glmv.config",
    "GlmvError": "glmv.errors", "InputError": "glmv.errors", "MediaError": "glmv.errors",
    "ProcessorConfigError": "glmv.errors",
    "GenerateOutput": "glmv.generate", "RowResult": "glmv.generate",
    "LoadedImage": "glmv.image", "PatchSettings": "glmv.image",
    "AutoModelForImageTextToText": "glmv.auto",
    "Glm4vForConditionalGeneration": "glmv.model", "GlmOcrForConditionalGeneration": "glmv.model",
    "Glm4vMoeForConditionalGeneration": "glmv.moe",
    "ParsedOutput": "glmv.output", "parse_output": "glmv.output",
    "pipeline": "glmv.pipelines",
    "Glm4vProcessor": "glmv.processor", "Glm46VProcessor": "glmv.processor",
    "LoadedVideo": "glmv.video", "VideoSettings": "glmv.video",
    "CheckpointError": "glmv.weights",
}


def __getattr__(name: str):
    import importlib

    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value   # looked up once
        return value
    try:   # a submodule not imported yet (glmv.fp8 after a bare `import glmv`)
        return importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))


__version__ = "0.1.0"

__all__ = [
    "AutoModelForImageTextToText", "CheckpointError", "ConfigError", "GenerateOutput", "Glm46VProcessor",
    "Glm4vConfig", "Glm4vForConditionalGeneration", "Glm4vMoeForConditionalGeneration", "Glm4vProcessor",
    "GlmOcrConfig", "GlmOcrForConditionalGeneration", "GlmvError", "InputError", "LoadedImage", "LoadedVideo",
    "MediaError", "ParsedOutput", "PatchSettings", "ProcessorConfigError", "RowResult", "VideoSettings",
    "parse_output", "pipeline",
]
