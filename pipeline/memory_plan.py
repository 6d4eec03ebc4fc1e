"""What one rank of a model actor holds: its weights and its KV cache per position, printed by the driver at start
and checked against a GPU's memory before any rank loads.

A one-rank plan is read from the checkpoint's safetensors headers and config alone, without torch: a driver that
runs its model actors on CPUs (the demo, the tests, a CPU cluster) would otherwise import torch (seconds of every
start) only to print this line. Plans over several ranks, and plans a GPU must fit, build the model on the meta
device and cut it as rank 0 does (pipeline.tp.rank_memory).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from glmv.config import Glm4vConfig

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


@dataclass(frozen=True)
class RankMemory:
    """What one rank of the model holds: its weights (its shard of the decoder, the rest whole) and its KV cache per
    position (its share of the KV heads)."""
    ranks: int
    weights: int           # bytes
    kv_per_position: int   # bytes

    def describe(self, kv_share: float, on_gpu: bool) -> str:
        pool = (f"KV pool: {100 * kv_share:.0f}% of the GPU memory left free after them, sized at the actor's start"
                if on_gpu else "KV pool: grows in host memory as rows need")
        return (f"memory plan per rank ({self.ranks} rank(s) per model actor): weights {_size(self.weights)}, "
                f"KV cache {self.kv_per_position / 2**10:.1f} KiB per position; {pool}")

    def check_fits(self, free: int, where: str) -> None:
        """Refuse, in one line, weights that leave no room for a KV pool on a device with `free` bytes."""
        if self.weights >= free:
            raise ConfigError(f"model.tensor_parallel: {_size(self.weights)} of weights per rank do not fit "
                              f"the {_size(free)} free on {where} ({self.ranks} rank(s)); raise "
                              f"model.tensor_parallel or use larger GPUs")


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.2f} MiB"


def kv_per_position(config: Glm4vConfig, ranks: int, dtype_bytes: int) -> int:
    return config.text.kv_per_position(ranks) * dtype_bytes


def one_rank_from_headers(path: str, dtype: str) -> RankMemory:
    """The plan of a one-rank actor in `dtype` (a model.dtype name), from the shapes in the safetensors headers."""
    from safetensors import SafetensorError, safe_open

    # here: the driver imports this module at every start, and glmv.config only when it prints a plan
    from glmv.config import INDEX_FILE, SCALE_SUFFIX, SINGLE_FILE, Glm4vConfig, past_decoder

    folder = Path(path)
    config = Glm4vConfig.from_pretrained(folder)
    index = folder / INDEX_FILE
    files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
             else [SINGLE_FILE])
    elements = 0
    for file in files:
        try:
            with safe_open(folder / file, framework="numpy") as f:
                shapes = {name: f.get_slice(name).get_shape() for name in f.keys()}
        except (OSError, SafetensorError) as e:
            raise ConfigError(f"model.path: {folder / file} is not a readable safetensors file ({e})") from None
        # tensors no model parameter holds: FP8 block scales (dequantized away at load; kept FP8 weights are GPU
        # plans, which take the meta-device path) and the multi-token-prediction layer
        for name, shape in shapes.items():
            if not name.endswith(SCALE_SUFFIX) and not past_decoder(name, config.text.num_hidden_layers):
                elements += math.prod(shape)
    return RankMemory(1, elements * DTYPE_BYTES[dtype], kv_per_position(config, 1, DTYPE_BYTES[dtype]))
