"""Checks before anything starts: the inputs exist, `model.path` is a checkpoint whose context can hold the
generation budget, and (once Ray is up) the actors' resource plan can run at all.

Everything here answers in well under a second (no torch, no Ray; one storage request per remote URI) and fails
with one readable line: a `ConfigError` (exit 2), or `StorageUnavailable` (exit 3) when the store cannot be asked.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import glob as globlib
import json
import os

from pipeline import readers, storage
from pipeline.config import AUTO, ActorsConfig, Config
from pipeline.errors import ConfigError
from pipeline.state import StateDir
from pipeline.storage import StorageOptions

SINGLE_WEIGHTS, WEIGHTS_INDEX = "model.safetensors", "model.safetensors.index.json"
# glmv.config.SUPPORTED_MODEL_TYPES (a test keeps them equal): importing glmv here would import torch
MODEL_TYPES = ("glm4v", "glm46v", "glm4v_moe", "glm_ocr")
PICKLED = (".bin", ".pt", ".pth", ".ckpt")


def check(cfg: Config) -> list[readers.Unit] | None:
    """All checks that need no cluster: model checkpoint and context, then input and output locations. Returns the
    manifests or shard files found, for the run to read without listing them again (None for a prefix of files)."""
    check_model(cfg)
    opts = StorageOptions.from_config(cfg.storage)
    units = check_input(cfg, opts)
    check_output_outside_input(cfg, opts)
    check_output(cfg.output.uri, opts)
    return units


def read_spec(cfg: Config, state: StateDir) -> readers.ReadSpec:
    i = cfg.input
    return readers.ReadSpec(i.uri, i.format, i.manifest, i.uri_column, i.bytes_column, i.key_column,
                            tuple(i.keep_columns), tuple(i.include), tuple(i.exclude),
                            StorageOptions.from_config(cfg.storage), state)


# --- the model ---------------------------------------------------------------------------------------------------


def _read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path: {path} is not readable JSON ({storage.scrub(e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"model.path: {path} is not a JSON object ({what})")
    return data


def _check_weights(path: str) -> None:
    index = os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(index):
        weight_map = _read_json(index, "a safetensors index").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise ConfigError(f"model.path: {index} has no weight_map")
        missing = sorted({f for f in weight_map.values() if not os.path.isfile(os.path.join(path, str(f)))})
        if missing:
            raise ConfigError(f"model.path: {index} names shard files that do not exist: {', '.join(missing[:5])}")
        return
    if os.path.isfile(os.path.join(path, SINGLE_WEIGHTS)):
        return
    pickles = sorted(n for n in os.listdir(path) if n.endswith(PICKLED))
    hint = f" (found {', '.join(pickles[:3])}: pickled weights are refused, convert them)" if pickles else ""
    raise ConfigError(f"model.path: {path} is not a checkpoint: no {SINGLE_WEIGHTS} or {WEIGHTS_INDEX}{hint}")


def _check_model_type(config: dict, source: str) -> None:
    """The model actors would refuse any other architecture, but only once Ray is up and the checkpoint loads."""
    model_type = config.get("model_type")
    if model_type in MODEL_TYPES:
        return
    raise ConfigError(f"model.path: {source}: model_type {model_type!r} is not supported; this pipeline runs "
                      f"GLM-V checkpoints: the GLM-4.1V architecture, the GLM-4.5V/4.6V mixture of experts and "
                      f"GLM-OCR (model_type {', '.join(MODEL_TYPES[:-1])} or {MODEL_TYPES[-1]})")


def _check_split(path: str, ranks: int) -> None:
    """model.tensor_parallel must divide the heads, KV heads, MLP columns and experts (glmv.parallel), and FP8
    releases run on one rank: said before Ray starts, not by every model actor."""
    from glmv import fp8, parallel
    from glmv.config import Glm4vConfig
    from glmv.errors import GlmvError

    try:
        parallel.check(Glm4vConfig.from_pretrained(path), ranks)
        quantized = fp8.read_quantization(os.path.join(path, "config.json"))
    except GlmvError as e:
        raise ConfigError(f"model.tensor_parallel: {e}") from None
    if quantized:
        raise ConfigError(f"model.tensor_parallel = {ranks}: {path} is an FP8 release, which runs on one rank for now")


def context_length(config: dict) -> int | None:
    """The model's context in tokens: text_config.max_position_embeddings (released and transformers-5 layouts),
    else the top-level field of older revisions."""
    for source in (config.get("text_config") or {}, config):
        value = source.get("max_position_embeddings") if isinstance(source, dict) else None
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_model(cfg: Config) -> None:
    """model.path is a local checkpoint folder (config, safetensors weights, tokenizer, processor config) and every
    task's generation budget fits in its context."""
    path = cfg.model.path
    if "://" in path:
        raise ConfigError(f"model.path: {path} must be a local folder (readable on every node that runs a model "
                          f"actor), not a URL")
    if not os.path.isdir(path):
        raise ConfigError(f"model.path: {path} " + ("is not a folder" if os.path.exists(path) else "does not exist"))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise ConfigError(f"model.path: {path} is not a checkpoint: no config.json")
    config = _read_json(os.path.join(path, "config.json"), "a model config")
    _check_model_type(config, os.path.join(path, "config.json"))
    _check_weights(path)
    if cfg.model.tensor_parallel > 1:
        _check_split(path, cfg.model.tensor_parallel)
    if not os.path.isfile(os.path.join(path, "tokenizer.json")):
        raise ConfigError(f"model.path: {path} is not a checkpoint: no tokenizer.json")
    if not any(os.path.isfile(os.path.join(path, n)) for n in ("preprocessor_config.json", "processor_config.json")):
        raise ConfigError(f"model.path: {path} is not a checkpoint: no preprocessor_config.json or "
                          f"processor_config.json")
    context = context_length(config)
    if context is None:
        return
    for spec in cfg.task_specs():
        budget, key = (spec.max_new_tokens, f"tasks.{spec.name}.max_new_tokens") if spec.max_new_tokens else \
            (cfg.run.max_new_tokens, "run.max_new_tokens")
        if budget >= context:
            raise ConfigError(f"{key}: {budget} new tokens do not fit the model's context of {context} tokens "
                              f"(max_position_embeddings in {os.path.join(path, 'config.json')}), prompt and media "
                              f"included")


# --- inputs and outputs ------------------------------------------------------------------------------------------


def check_input(cfg: Config, opts: StorageOptions) -> list[readers.Unit] | None:
    """The input exists. Manifests and shard files are found by the readers' own expansion (a file, a folder or
    prefix, a glob), so preflight accepts exactly the forms the run reads, and returns them; a listed prefix is only
    probed (listing it all is the run's work, spread over read tasks)."""
    if not cfg.input.manifest and cfg.input.format == "files":
        check_input_prefix(cfg.input.uri, opts)
        return None
    key, uri = ("input.manifest", cfg.input.manifest) if cfg.input.manifest else ("input.uri", cfg.input.uri)
    fs, root = storage.filesystem(uri, opts)
    if storage.protocol_of(uri) in ("s3", "s3a"):
        _check_bucket(key, uri, fs, root.split("/", 1)[0], opts)   # clearer than "does not exist"
    return readers.find_units(read_spec(cfg, StateDir(cfg.output.uri, opts)))


def check_input_prefix(uri: str, opts: StorageOptions) -> None:
    """input.uri is a folder, or a prefix under which the store holds at least one object."""
    fs, root = storage.filesystem(uri, opts)
    if storage.is_local(fs):
        if not os.path.isdir(root):
            raise ConfigError(f"input.uri: {uri} " + ("is not a folder" if os.path.exists(root) else
                                                      "does not exist"))
        if not _holds_a_file(root):
            raise ConfigError(f"input.uri: {uri} holds no files")
        return
    if storage.protocol_of(uri) in ("s3", "s3a"):
        bucket, _, key = root.partition("/")
        prefix = key.rstrip("/") + "/" if key else ""
        _check_bucket("input.uri", uri, fs, bucket, opts)
        page = storage.with_retries(lambda: fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=prefix, MaxKeys=1),
                                    uri, opts)
        if not page.get("KeyCount", len(page.get("Contents", []))):
            raise ConfigError(f"input.uri: {uri} holds no objects")
        return
    if not storage.with_retries(lambda: fs.exists(root), uri, opts):
        raise ConfigError(f"input.uri: {uri} does not exist")


def _holds_a_file(folder: str) -> bool:
    """Whether the listing would find a file under the folder (it follows links and skips hidden names); stops at
    the first one."""
    seen = set()
    for top, folders, files in os.walk(folder, followlinks=True):
        st = os.stat(top)
        if any(not f.startswith(".") for f in files):
            return True
        folders[:] = [] if (st.st_dev, st.st_ino) in seen else [f for f in folders if not f.startswith(".")]
        seen.add((st.st_dev, st.st_ino))
    return False


def _location(uri: str, opts: StorageOptions) -> str:
    """Where a path points, comparable between two config keys (a local path resolved; s3a is s3)."""
    fs, path = storage.filesystem(uri, opts)
    if storage.is_local(fs):
        return os.path.realpath(path)
    protocol = storage.protocol_of(uri)
    return f"{'s3' if protocol == 's3a' else protocol}://{path.rstrip('/')}"


def _read_root(uri: str) -> tuple[str, str]:
    """(the folder under which a reader may find input, the glob below it): a glob's fixed leading folders and the
    rest of the pattern, else the path itself and ""."""
    if not globlib.has_magic(uri):
        return uri, ""
    root, pattern = readers.split_glob(uri)
    return root or ("/" if uri.startswith("/") else "."), pattern


def _glob_reaches(pattern: str, folder: str) -> bool:
    """Whether a glob can match `folder` or a path inside it (`folder` lies under the glob's fixed root). In
    fsspec's globs `*`, `?` and `[..]` stay within one folder and `**` (a whole part) crosses any number of them."""
    pattern_parts, folder_parts = pattern.rstrip("/").split("/"), folder.rstrip("/").split("/")
    for n, part in enumerate(pattern_parts):
        if part == "**" or n == len(folder_parts):   # the pattern goes on below the folder
            return True
        if not fnmatch.fnmatchcase(folder_parts[n], part):
            return False
    # the pattern stops at the folder's depth (it names the folder itself, say a Spark-style `out.parquet/`) or
    # above it (it names a folder the output is in, whose files are read but not its subfolders)
    return len(pattern_parts) == len(folder_parts)


def check_output_outside_input(cfg: Config, opts: StorageOptions) -> None:
    """output.uri is not inside what the input reads: its result files would be read back as input."""
    key, uri = ("input.manifest", cfg.input.manifest) if cfg.input.manifest else ("input.uri", cfg.input.uri)
    fixed, pattern = _read_root(uri)
    root, out = _location(fixed, opts), _location(cfg.output.uri, opts)
    inside = out == root or out.startswith(root.rstrip("/") + "/")
    if inside and pattern:
        inside = _glob_reaches(root.rstrip("/") + "/" + pattern, out)
    if inside:
        raise ConfigError(f"output.uri: {cfg.output.uri} is inside {key} {uri}: a later run would read its "
                          f"result files back as input; choose an output outside it")


def check_output(uri: str, opts: StorageOptions) -> None:
    """An S3 output's bucket exists (it is never created: a typo must not make a new bucket); a local output is a
    folder, or can be made one."""
    fs, root = storage.filesystem(uri, opts)
    if storage.protocol_of(uri) in ("s3", "s3a"):
        _check_bucket("output.uri", uri, fs, root.split("/", 1)[0], opts)
    elif storage.is_local(fs):
        _check_local_output(uri, root)


def _check_local_output(uri: str, root: str) -> None:
    path = os.path.abspath(root)
    while not os.path.exists(path):   # the nearest part that exists must be a folder (the rest is created)
        path = os.path.dirname(path)
    if not os.path.isdir(path):
        where = "is a file" if path == os.path.abspath(root) else f"is under {path}, which is a file"
        raise ConfigError(f"output.uri: {uri} {where}, not a folder")


def _check_bucket(key: str, uri: str, fs, bucket: str, opts: StorageOptions) -> None:
    if not storage.bucket_exists(fs, bucket, opts):
        raise ConfigError(f"{key}: {uri}: bucket {bucket!r} does not exist")


# --- the resource plan, against the cluster ----------------------------------------------------------------------


def plan_actors(cluster_resources: dict, actors: ActorsConfig, device: str, ranks: int = 1) -> ActorsConfig:
    """`actors` with "auto" values sized to the cluster: a GPU per actor where the cluster has GPUs (unless
    model.device is cpu), and one actor per GPU, as many as leave a CPU slot for decoding; on CPU, one actor (each
    holds the whole model in float32). Set values stay as they are. ranks (model.tensor_parallel): an actor holds
    that many times num_gpus and num_cpus (both per rank), so "auto" makes GPUs / ranks actors."""
    cpus, gpus = float(cluster_resources.get("CPU", 0)), float(cluster_resources.get("GPU", 0))
    num_gpus = actors.num_gpus
    if num_gpus == AUTO:
        num_gpus = 1.0 if device == "cuda" or (gpus and device == "auto") else 0.0
    count = actors.count
    if count == AUTO:
        count = 1
        if num_gpus:
            count = _fits(gpus, num_gpus * ranks)
            if actors.num_cpus:
                count = min(count, _fits(cpus - actors.decode_num_cpus, actors.num_cpus * ranks))
            count = max(1, count)
    return dataclasses.replace(actors, count=count, num_gpus=num_gpus)


def _fits(total: float, each: float) -> int:
    """How many of `each` fit in `total`; 1 / 0.2 is 4.999... in floating point, and Ray counts resources in
    units of 1e-4, so round to those first."""
    return int(round(total / each, 4))


def check_resources(cluster_resources: dict, actors: ActorsConfig, strict: bool = True, ranks: int = 1) -> list[str]:
    """Warnings about the actors' plan (sized: plan_actors) on a cluster with `cluster_resources`; raises
    ConfigError for a plan that can never run: more GPUs or CPUs than the cluster has, or actors that leave no CPU
    for the decode tasks (the run would wait forever at 0%; read tasks hold no CPU). strict=False (an autoscaling
    cluster, whose resources appear later) turns those errors into warnings. ranks: model.tensor_parallel."""
    cpus, gpus = float(cluster_resources.get("CPU", 0)), float(cluster_resources.get("GPU", 0))
    # in Ray's units of 1e-4, as it counts them: 50 x 0.14 GPUs is 7.000000000000001 in floats
    need_cpus = round(actors.count * actors.num_cpus * ranks, 4)
    need_gpus = round(actors.count * actors.num_gpus * ranks, 4)
    per_rank = f" x {ranks} ranks" if ranks > 1 else ""
    problems, warnings = [], []
    if need_gpus > gpus:
        problems.append(f"actors: {actors.count} actor(s){per_rank} x actors.num_gpus {actors.num_gpus:g} = {need_gpus:g} "
                        f"GPUs, the cluster has {gpus:g}")
    free = round(cpus - need_cpus, 4)
    task_cpus = actors.decode_num_cpus   # read tasks and repartitioning hold no CPU; a decode task holds this
    if free < task_cpus:
        problems.append(f"actors: {actors.count} actor(s){per_rank} x actors.num_cpus {actors.num_cpus:g} take {need_cpus:g} "
                        f"of the cluster's {cpus:g} CPUs, leaving {max(free, 0):g}; a decode task needs "
                        f"{task_cpus:g}, so no input could ever be decoded. Lower actors.num_cpus or actors.count")
    if gpus and not need_gpus:
        warnings.append(f"actors.num_gpus is 0 but the cluster has {gpus:g} GPU(s): the model runs on CPU")
    if problems and strict:
        raise ConfigError("; ".join(problems))
    return problems + warnings
