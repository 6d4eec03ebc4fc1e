"""glmv: the GLM-V (GLM-4.1V architecture) vision-language model in plain PyTorch."""

__version__ = "0.1.0"
