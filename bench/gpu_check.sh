#!/usr/bin/env bash
# The GPU checks: the tests marked `gpu`, then bench/bench_gpu.py; fails (never skips) without a CUDA device.
#
#     bash bench/gpu_check.sh [PYTHON]     # default .venv/bin/python; `make gpu-check` builds that venv first
#
# Any Python with a CUDA build of torch (2.5 or newer), transformers, torchvision, pytest, av and glmv's other
# run-time packages will do: a GPU machine that cannot download the test venv runs its own Python (Ray, moto and the
# pipeline are not needed here). Only tests/test_gpu.py and tests/test_moe.py are collected (test_moe's gpu test
# alone runs), so the pipeline's imports are never needed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-.venv/bin/python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: no CUDA device here')"
"$PY" -c "import torch, transformers; print(f'torch {torch.__version__}, transformers {transformers.__version__}, '
                                           f'{torch.cuda.get_device_name()}')"
"$PY" -m pytest -q -rP -m gpu tests/test_gpu.py tests/test_moe.py
"$PY" bench/bench_gpu.py "${@:2}"
