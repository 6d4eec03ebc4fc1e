"""Load a Hugging Face GLM-V checkpoint (safetensors only) straight into the model.

The model is built on the meta device (no memory), then every tensor is read from a memory map of its
safetensors file, copied to its target dtype/device, and its file pages are released right after: only one
tensor's source pages are resident at a time, so peak memory is the loaded model plus one tensor.
Pickled checkpoints (`*.bin`, `*.pt`) are refused, never opened.

Each checkpoint tensor goes to a `Piece` of a model tensor: itself by name, or (MoE, glmv.moe) its expert's slice of
a stacked tensor, allocated on the device by its first piece; a model may skip tensors it never runs (the MTP
layer). FP8 releases (glmv.fp8) pair each e4m3 weight with its block scales: dequantized as it is read, or kept.
Under tensor parallelism (glmv.parallel) a rank reads only its slice of each split tensor (views of the mapping,
copied slice by slice) and only its own experts.
"""

from __future__ import annotations

import json
import logging
import math
import mmap
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn

from glmv import cpu_kernels, fp8, parallel
from glmv.config import INDEX_FILE, SINGLE_FILE, ConfigError, Glm4vConfig
from glmv.errors import GlmvError

log = logging.getLogger(__name__)


_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn,
}


class CheckpointError(GlmvError, ValueError):
    """A checkpoint whose files or tensors do not fit the model; the message names the keys or files."""


class SafetensorsFile:
    """A read-only view of one .safetensors file: header parsed eagerly, tensors mapped lazily."""

    def __init__(self, path: Path):
        self.path = path
        with open(path, "rb") as f:
            size = path.stat().st_size
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > size - 8:
                raise CheckpointError(f"{path}: not a safetensors file (header length {header_len} > file size)")
            try:
                header = json.loads(f.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{path}: corrupt safetensors header ({e})") from None
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY) if size else None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path}: corrupt safetensors header (a JSON {type(header).__name__}, not an object)")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries = header
        for key, entry in header.items():
            if not _well_formed(entry):
                raise CheckpointError(f"{path}: corrupt safetensors header entry for {key!r}: {str(entry)[:200]}")
            begin, end = entry["data_offsets"]
            if entry["dtype"] not in _DTYPES or not (0 <= begin <= end <= size - self.data_start):
                raise CheckpointError(f"{path}: tensor {key!r} has an unsupported dtype or offsets out of the file")
            nbytes = math.prod(entry["shape"]) * _DTYPES[entry["dtype"]].itemsize
            if end - begin != nbytes:
                raise CheckpointError(f"{path}: tensor {key!r} holds {end - begin} bytes, its shape "
                                      f"{entry['shape']} and dtype {entry['dtype']} need {nbytes}")

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.entries[key]["shape"])

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor as a view of the mapped file (no copy)."""
        entry = self.entries[key]
        begin, end = entry["data_offsets"]
        dtype = _DTYPES[entry["dtype"]]
        count = (end - begin) // dtype.itemsize
        if count == 0:
            return torch.empty(self.shape(key), dtype=dtype)
        flat = torch.frombuffer(self._map, dtype=dtype, count=count, offset=self.data_start + begin)
        return flat.view(self.shape(key))

    def release(self, key: str) -> None:
        """Drop the resident file pages of one tensor from this process (they are re-read if touched again)."""
        begin, end = self.entries[key]["data_offsets"]
        page = mmap.PAGESIZE
        start = (self.data_start + begin) // page * page
        length = self.data_start + end - start
        if length > 0 and hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, start, length)


def _well_formed(entry) -> bool:
    """A header entry {"dtype": str, "shape": [int, ...], "data_offsets": [int, int]}."""
    def ints(value, count=None):
        return (isinstance(value, list) and (count is None or len(value) == count)
                and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value))
    return (isinstance(entry, dict) and isinstance(entry.get("dtype"), str) and ints(entry.get("shape"))
            and ints(entry.get("data_offsets"), 2))


def checkpoint_files(path: Path) -> dict[str, Path]:
    """Map every tensor name to the file holding it, from the index or the single file."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e!r})") from None
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"{index}: weight_map must map tensor names to shard files, got a "
                                  f"{type(weight_map).__name__}")
        # a shard is a file of this folder: never a path elsewhere on the machine
        odd = sorted({repr(f) for f in weight_map.values() if not isinstance(f, str) or Path(f).name != f})
        if odd:
            raise CheckpointError(f"{index}: weight_map names shards that are not file names in the checkpoint "
                                  f"folder: {', '.join(odd[:5])}")
        files = {name: path / file for name, file in weight_map.items()}
        missing = sorted({str(f) for f in files.values() if not f.is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard files that do not exist: {', '.join(missing)}")
        return files
    single = path / SINGLE_FILE
    if single.is_file():
        return {name: single for name in SafetensorsFile(single).entries}
    pickles = sorted(p.name for p in path.glob("*") if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    hint = f" (found {', '.join(pickles)}: pickled weights are refused, convert them to safetensors)" if pickles else ""
    raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}{hint}")


def resolve_dtype(dtype, config: Glm4vConfig, device: torch.device) -> torch.dtype:
    """The caller's dtype, else the checkpoint's own on CUDA and float32 on CPU (bfloat16 matmuls are slow there)."""
    if dtype is None:
        dtype = config.dtype if device.type == "cuda" and config.dtype else "float32"
    if isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
        if name not in ("float32", "float64", "float16", "bfloat16"):
            raise ConfigError(f"dtype {dtype!r} is not supported; use float32, float64, float16 or bfloat16")
        dtype = getattr(torch, name)
    return dtype


@dataclass(frozen=True)
class Piece:
    """Where one checkpoint tensor goes: into model tensor `target` at `index` (() for the whole tensor; per-expert
    tensors fill their slice of a stacked one), dequantized with the FP8 block scales of checkpoint key `scale`;
    source: the part of the checkpoint tensor this rank holds (tensor parallelism), None for all of it."""
    target: str
    index: tuple = ()
    scale: str | None = None
    source: parallel.Slice | None = None


def load_pretrained(cls, path, dtype=None, device="cpu", fast_cpu: bool = True,
                    tensor_parallel: parallel.Group | None = None):
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint folder not found")
    config = Glm4vConfig.from_pretrained(path)
    if not cls.runs(config):
        raise CheckpointError(f"{path}: a {config.kind} checkpoint; load it with {config.architecture} (or "
                              f"AutoModelForImageTextToText), not {cls.__name__}")
    device = torch.device(device)
    dtype = resolve_dtype(dtype, config, device)
    quant = fp8.read_quantization(path / "config.json")

    group = tensor_parallel or parallel.SINGLE
    if quant and group.world > 1:
        raise ConfigError(f"{path}: an FP8 checkpoint with tensor_parallel={group.world}: FP8 releases run on one "
                          f"rank for now (splitting their block scales is a later step)")
    model = build_on_meta(cls, config)
    slices = parallel.shard(model, group)
    files = checkpoint_files(path)
    opened: dict[Path, SafetensorsFile] = {}
    for file in files.values():
        if file not in opened:
            opened[file] = SafetensorsFile(file)
    stored = {name: opened[file].entries[name]["dtype"] for name, file in files.items()
              if name in opened[file].entries}
    plan = _fp8_plan(model, stored, quant, fp8.keep_on(device, quant)) if quant else _plan(model, files)
    expected = {name: t for name, t in model.state_dict().items()}
    if slices:  # this rank's share of the split tensors only
        local = {name: parallel.localize(piece, slices, expected[piece.target].shape)
                 for name, piece in plan.items() if piece.target in expected}
        plan.update(local)
        plan = {name: piece for name, piece in plan.items() if piece is not None}
    _check_keys(path, expected, plan)

    names_in: dict[Path, list[str]] = {}  # tensor names per file, in index order
    for name, piece in plan.items():
        file = files[name]
        st = opened[file]
        names_in.setdefault(file, []).append(name)
        if name not in st.entries:
            raise CheckpointError(f"{path / INDEX_FILE} places {name!r} in {file.name}, which does not hold it")
        want = tuple(expected[piece.target][piece.index].shape)
        if piece.source is not None:  # the whole tensor, of which this rank holds a slice of shape `want`
            want = piece.source.full(want)
        if st.shape(name) != want:
            raise CheckpointError(f"{file.name}: tensor {name!r} has shape {list(st.shape(name))}, the config "
                                  f"({path / 'config.json'}) needs {list(want)}")
        kind = _DTYPES[st.entries[name]["dtype"]]
        if not kind.is_floating_point or (kind.itemsize == 1 and piece.scale is None
                                          and expected[piece.target].dtype != kind):
            # quantized or corrupt: never cast silently
            raise CheckpointError(f"{file.name}: tensor {name!r} is stored as {st.entries[name]['dtype']}; GLM-V "
                                  f"weights are floating point (BF16, F16 or F32), or FP8 with the block scales "
                                  f"and quantization_config of an FP8 release")
    started, loaded_bytes = time.perf_counter(), 0
    for i, (file, st) in enumerate(opened.items(), 1):
        for name in names_in.get(file, ()):
            # Always a copy: matmuls on weights left in the file mapping ran 5-10x slower on CPU (unaligned,
            # small-page memory). Releasing each tensor's source pages keeps the peak at one tensor over the model.
            piece = plan[name]
            tensor = st.tensor(name)
            if piece.source is not None:  # this rank's slice only: views of the mapping, copied piece by piece
                tensor = piece.source.take(tensor)
            loaded_bytes += tensor.numel() * tensor.element_size()
            if piece.scale is not None:
                tensor = fp8.dequantize(tensor.to(device), opened[files[piece.scale]].tensor(piece.scale).to(device),
                                        quant.block)
            _place(model, piece, tensor, _target_dtype(piece.target, expected[piece.target].dtype, dtype), device)
            st.release(name)
        log.info("loaded %s (%d/%d files, %.1f GiB in %.1fs)", file.name, i, len(opened), loaded_bytes / 2**30,
                 time.perf_counter() - started)

    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers(device)
    model.eval().requires_grad_(False)
    if fast_cpu and cpu_kernels.available(device, dtype):
        cpu_kernels.pack_linears(model)
    model.name_or_path = str(path)
    generation_file = path / "generation_config.json"
    if generation_file.is_file():
        model.generation_config = read_generation_config(generation_file)
    return model


def _plan(model, names) -> dict[str, Piece]:
    """Every checkpoint tensor's piece, as the model maps it (itself by name; MoE: per-expert tensors), less the
    tensors it skips (the MTP layer)."""
    pieces = {name: model.checkpoint_piece(name) for name in names}
    return {name: piece for name, piece in pieces.items() if piece is not None}


_PER_EXPERT = re.compile(r"\.experts\.\d+\.(gate|up|down)_proj\.weight$")


def _fp8_plan(model: nn.Module, stored: dict[str, str], spec: fp8.Fp8Spec, keep: bool) -> dict[str, Piece]:
    """The pieces of an FP8 checkpoint (stored: each tensor's safetensors dtype). A weight with a `_scale_inv`
    sibling is FP8. keep: the text decoder's linear layers and per-expert-stored experts become FP8 modules that
    load the weights and scales as stored; every other FP8 tensor is dequantized as it loads."""
    scales = {name for name in stored if name.endswith(fp8.SCALE)}
    quantized = {name[:-len(fp8.SCALE)] for name in scales}
    for name in sorted(quantized):
        if stored.get(name) != "F8_E4M3":
            raise CheckpointError(f"{name + fp8.SCALE!r} scales {name!r}, which is " + (
                "not in the checkpoint" if name not in stored else f"stored as {stored[name]}, not F8_E4M3"))
    pieces = _plan(model, [name for name in stored if name not in scales])
    kept = set()
    for name in sorted(quantized & set(pieces)) if keep else ():
        module_name = pieces[name].target.rpartition(".")[0]
        module = model.get_submodule(module_name)
        if isinstance(module, nn.Linear) and ".language_model." in f".{module_name}.":
            parent, _, leaf = module_name.rpartition(".")
            setattr(model.get_submodule(parent), leaf, fp8.Fp8Linear(module, spec.block))
            kept.add(name)
        elif hasattr(module, "to_fp8") and _PER_EXPERT.search(name):  # glmv.moe.Experts
            module.to_fp8(spec.block)
            kept.add(name)
    moe = model.config.text.moe
    rows = fp8.cdiv(moe.moe_intermediate_size, spec.block[0]) if moe is not None else None
    for name in quantized & set(pieces):
        if name in kept:
            pieces[name + fp8.SCALE] = model.checkpoint_piece(name + fp8.SCALE, rows)
        else:
            pieces[name] = Piece(pieces[name].target, pieces[name].index, scale=name + fp8.SCALE)
    return pieces


# the router's correction bias stays float32 in any model dtype (transformers' _keep_in_fp32_modules_strict), as do
# FP8 block scales; FP8 weights kept for on-the-fly dequantization stay FP8
_FLOAT32_NAMES = ("e_score_correction_bias", "_scale_inv")


def _target_dtype(name: str, meta_dtype: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    if name.endswith(_FLOAT32_NAMES):
        return torch.float32
    return meta_dtype if meta_dtype.itemsize == 1 and meta_dtype.is_floating_point else dtype


def _place(model: nn.Module, piece: Piece, tensor: torch.Tensor, dtype: torch.dtype, device) -> None:
    if not piece.index:
        _set_tensor(model, piece.target, tensor.to(device=device, dtype=dtype, copy=True))
        return
    module_name, _, leaf = piece.target.rpartition(".")
    module = model.get_submodule(module_name)
    current = getattr(module, leaf)
    if current.is_meta:  # the first piece of a stacked tensor allocates it
        _set_tensor(model, piece.target, torch.empty(current.shape, dtype=dtype, device=device))
        current = getattr(module, leaf)
    current.data[piece.index].copy_(tensor)


def _json_kind(value) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "integer" if isinstance(value, int) else "number"
    if isinstance(value, list) and all(_json_kind(v) == "integer" for v in value):
        return "integers"
    return type(value).__name__


# generation_config.json keys that generate reads: what each must be, and the JSON kinds that fit
_NUMBER, _INTEGER = ("a number", {"integer", "number"}), ("an integer", {"integer"})
_GENERATION_KEYS = {"do_sample": ("true or false", {"boolean"}), "temperature": _NUMBER, "top_p": _NUMBER,
                    "repetition_penalty": _NUMBER, "top_k": _INTEGER, "max_new_tokens": _INTEGER,
                    "pad_token_id": _INTEGER, "eos_token_id": ("an integer or a list of them", {"integer", "integers"})}


def read_generation_config(file: Path) -> dict:
    """The file's settings, checked here so that a wrong one names its key instead of failing inside generate."""
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(config).__name__}")
    for key, (wanted, kinds) in _GENERATION_KEYS.items():
        if config.get(key) is not None and _json_kind(config[key]) not in kinds:
            raise CheckpointError(f"{file}: {key} must be {wanted}, got {config[key]!r}")
    return config


def build_on_meta(cls, config):
    """The model with every parameter on the meta device (no memory) and no init work.

    Parameter init is wasted before loading, and its first call on the meta device imports ~150 MB of torch's
    symbolic-shape machinery, which would count against the load's memory; so torch.nn.init is a no-op meanwhile.
    """
    names = ("kaiming_uniform_", "uniform_", "normal_", "ones_", "zeros_")
    saved = {name: getattr(nn.init, name) for name in names}
    try:
        for name in names:
            setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
        with torch.device("meta"):
            return cls(config)
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def _check_keys(path: Path, expected: dict, plan: dict[str, Piece]) -> None:
    """Every model tensor filled exactly (stacked ones by pieces covering them), no checkpoint tensor left over."""
    covered: dict[str, int] = {}
    for piece in plan.values():
        if piece.target in expected:
            covered[piece.target] = covered.get(piece.target, 0) + expected[piece.target][piece.index].numel()
    missing = sorted(name for name, t in expected.items() if covered.get(name, 0) != t.numel())
    unexpected = sorted(name for name, piece in plan.items() if piece.target not in expected)
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            shown = ", ".join(keys[:8]) + (f" ... ({len(keys) - 8} more)" if len(keys) > 8 else "")
            problems.append(f"{len(keys)} {label} key(s): {shown}")
    if problems:
        raise CheckpointError(f"{path}: checkpoint does not match the model: " + "; ".join(problems))


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name)
    if leaf in module._parameters:
        module._parameters[leaf] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor


def save_state_dict(state: dict[str, torch.Tensor], out_dir: Path, max_shard_bytes: int = 0) -> None:
    """Write tensors in the Hugging Face layout: one model.safetensors, or shards plus an index when the total
    exceeds max_shard_bytes (> 0)."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    total = sum(t.numel() * t.element_size() for t in state.values())
    if max_shard_bytes <= 0 or total <= max_shard_bytes:
        save_file(state, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return
    shards, current, size = [], {}, 0
    for name, t in state.items():
        nbytes = t.numel() * t.element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = t
        size += nbytes
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out_dir / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
