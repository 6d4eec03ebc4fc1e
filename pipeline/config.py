"""Run configuration: a TOML file parsed into validated dataclasses, plus `--set section.key=value` overrides.

Validation happens once, here, at the edge: every unknown key and every bad value is rejected with its dotted
name, so the rest of the pipeline can trust the dataclasses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError  # noqa: F401 - also imported from here by callers

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tiff", "tif")
VIDEO_EXTENSIONS = ("mp4", "mov", "mkv", "webm", "avi")
PDF_EXTENSIONS = ("pdf",)   # one item per page (pipeline.pdf)

AUTO = "auto"   # run.batch_size (decode_slots), actors.count / actors.num_gpus (pipeline.preflight.plan_actors)
GPU_SLOTS, CPU_SLOTS = 64, 8   # run.batch_size "auto"

# Built-in tasks: (prompt, thinking, verbatim). `thinking` asks 4.6V-family templates for a reasoning trace (4.1V
# models always think). `verbatim` keeps the answer exactly as generated (glmv.output.parse_output).
# text / table / formula are GLM-OCR's own prompts (its model card and SDK); they run on any model of the family,
# and their Markdown, HTML tables and LaTeX land in `answer` untouched.
BUILTIN_TASKS = {
    "caption": ("Describe this {media} in detail.", False, False),
    "ocr": ("Extract all text visible in this {media}, preserving line breaks. Reply only with the text.", False,
            False),
    "reasoning": ("Look at this {media} carefully, reason step by step about what it shows, then give a short answer.",
                  True, False),
    "text": ("Text Recognition:", False, True),
    "table": ("Table Recognition:", False, True),
    "formula": ("Formula Recognition:", False, True),
}


def builtin_task(name: str) -> "TaskSpec":
    prompt, thinking, verbatim = BUILTIN_TASKS[name]
    return TaskSpec(name, prompt, thinking=thinking, verbatim=verbatim)


@dataclass
class InputConfig:
    uri: str = ""            # files: prefix to list; webdataset/parquet: folder, prefix or glob of shards
    manifest: str = ""       # files: Parquet/CSV/JSONL manifest file, folder/prefix or glob of them
    format: str = "files"    # files (loose media, listed or from manifests) | webdataset (.tar) | parquet (bytes)
    uri_column: str = "uri"  # manifest column holding each item's URI (img2dataset writes `url`)
    keep_columns: list[str] = field(default_factory=list)   # manifest/Parquet columns copied into the output rows
    bytes_column: str = ""   # parquet: the column of media bytes (binary, or an HF image struct {bytes, path})
    key_column: str = ""     # parquet: the column naming each sample -> output `key`
    include: list[str] = field(default_factory=lambda: ["*"])   # glob patterns matched on the path below `uri`
    exclude: list[str] = field(default_factory=list)
    manifest_prompt_task: str = "prompt"   # task name given to a manifest row's own prompt
    max_items: int = 0       # 0 = no limit; otherwise stop reading after this many items
    relist: bool = True      # a listed prefix: a rerun after a run that ended lists it again for new objects
    pdf_dpi: float = 0.0     # PDF pages rendered at this resolution; 0 = fill the model's pixel budget per page

    def fingerprint(self) -> str:
        """Hash of what selects the items (not how many): completion records are only trusted for the same."""
        keys = ("uri", "manifest", "format", "uri_column", "bytes_column", "key_column", "include", "exclude")
        payload = {k: getattr(self, k) for k in keys}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class OutputConfig:
    uri: str = ""
    # A result file is written once this many rows are waiting ... (a file costs the driver ~8 ms whatever its rows:
    # with 512-row files the zero-cost machinery's driver spent 37 us per item, with 4,096-row ones 22; part 3 of
    # bench/bench_scale.py)
    rows_per_file: int = 4096
    flush_seconds: float = 30.0  # ... or once the oldest waiting row is this old
    takeover: bool = False      # start even though another run's lease on this output looks alive
    quarantine: bool = False    # move files under the prefix that are not ours aside instead of leaving them
    compact: bool = True        # merge the small files of finished shards into files of target_file_mb
    target_file_mb: float = 256.0
    partition_by: list[str] = field(default_factory=list)   # [] | ["task"]: hive folders task=caption/
    verify: str = "auto"        # "always": list the result files at every start even where a clean close sealed them


@dataclass
class ModelConfig:
    path: str = ""
    dtype: str = "auto"     # auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16
    device: str = "auto"    # auto (cuda when the actor has a GPU) | cpu | cuda
    name: str = ""          # value of the output's `model` column; defaults to the checkpoint folder name
    tensor_parallel: int = 1  # ranks (GPUs) one model actor spans (pipeline.tp); actors.num_gpus / num_cpus are
    #                           per rank, so an actor asks Ray for tensor_parallel times them


@dataclass
class RunConfig:
    tasks: list[str] = field(default_factory=lambda: ["caption"])
    batch_size: int | str = AUTO  # decode slots per model actor (see decode_slots)
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int = 0
    retry_errors: bool = False   # at start, take error rows out of the output so their (item, task) runs again
    stop_failure_rate: float = 0.5    # stop when this share of the last `stop_failure_window` pairs failed for a
    stop_failure_window: int = 100    # reason that is not about one item (storage unavailable, CUDA errors)
    drain_s: float = 30.0        # after a SIGTERM: let in-flight work finish this long, write it, then exit


@dataclass
class BatchingConfig:
    max_pixels: int = 0          # per image after resizing; 0 = the checkpoint's own limit
    max_video_pixels: int = 0    # per video, all sampled frames together; 0 = the checkpoint's own limit
    max_frames: int = 0          # frames per video (evenly thinned from the checkpoint's sampling); 0 = no cap
    max_input_pixels: int = 100_000_000   # images larger than this (before resizing) become error rows
    sort_window: int = 8         # batches' worth of sequences per model-actor call (a window; see README)
    mode: str = "refill"         # refill: stream a window through run.batch_size decode slots | static: fixed batches
    decode_batch_size: int = 32  # items a decode task fetches (concurrently) and decodes at once
    block_items: int = 2048      # items per Ray Data block (a decode task's) at least, in whole model-actor calls;
    #                              0: one call's. A block costs Ray Data ~60 ms of CPU whatever its items
    read_ahead_items: int | str = AUTO  # items read but not yet written, at most (see read_ahead)
    read_ahead_mb: int = 1024    # and their raw rows' size (embedded media counts), at most


READ_AHEAD_FLOOR = 65_536        # read_ahead_items "auto": at least this many (the driver's ~5 s at 10,000 items/s) ...
READ_AHEAD_PER_ACTOR = 4_096     # ... and this many per model actor (a GPU actor's few minutes at 10-20 items/s)


def read_ahead(items: int | str, actors: int) -> int:
    """batching.read_ahead_items as a number: a window that keeps every model actor fed for a few minutes and the
    machinery for a few seconds, whatever the input's size (a 1e8-item input must not be queued ahead in full)."""
    return items if items != AUTO else max(READ_AHEAD_FLOOR, READ_AHEAD_PER_ACTOR * actors)


def decode_slots(batch_size: int | str, on_gpu: bool) -> int:
    """run.batch_size as a number. "auto": 64 for a model on a GPU, where a decode step reads every weight once
    whatever its rows (more rows are nearly free until the KV cache fills the memory, which the model actor checks
    per call); 8 on CPU, where a step's time grows with its rows."""
    if batch_size != AUTO:
        return batch_size
    return GPU_SLOTS if on_gpu else CPU_SLOTS


@dataclass
class ActorsConfig:
    count: int | str = AUTO      # model actors; auto: one per GPU of the cluster (per actors.num_gpus), 1 on CPU
    num_gpus: float | str = AUTO  # GPUs per model actor; auto: 1 when the cluster has GPUs (and model.device allows)
    num_cpus: float = 1.0        # CPUs per model actor
    decode_num_cpus: float = 1.0  # CPUs per decode task
    max_restarts: int = 8        # datasets restarted in one run after cluster faults (lost nodes) before it stops

    @property
    def on_gpu(self) -> bool:
        """Whether the actors hold GPUs (False while num_gpus is still "auto": before the run sizes it)."""
        return self.num_gpus != AUTO and self.num_gpus > 0


@dataclass
class StorageConfig:
    endpoint_url: str = ""       # S3-compatible endpoint; credentials come from the environment only
    region: str = ""
    anon: bool = False
    retries: int = 4             # attempts after the first for a transient storage error
    retry_backoff_s: float = 0.5  # first back-off; doubles per attempt


@dataclass
class RayConfig:
    address: str = ""    # "" = a Ray running on this machine, else start one; "local" = always start one.
    #                      RAY_ADDRESS (set by `ray job submit`) overrides both.
    num_cpus: int = 0    # for a Ray started here; 0 = all cores
    autoscaling: bool = False   # the cluster adds nodes on demand: a plan above what is up now is a warning, not
    #                             an error, and actors.count / actors.num_gpus must be set (not "auto")


@dataclass
class DemoConfig:
    generate: bool = False   # create a missing input folder (sample corpus) and model.path (tiny checkpoint)


@dataclass
class TaskSpec:
    name: str
    prompt: str          # may contain {media}: "image" or "video"
    thinking: bool = False
    max_new_tokens: int = 0   # 0 = run.max_new_tokens
    max_thinking_tokens: int = 0   # 0 = no budget; else a reasoning trace is closed after this many tokens
    verbatim: bool = False    # answer = the generated text as it is (no box or whitespace handling): OCR output


@dataclass
class Config:
    input: InputConfig = field(default_factory=InputConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    run: RunConfig = field(default_factory=RunConfig)
    batching: BatchingConfig = field(default_factory=BatchingConfig)
    actors: ActorsConfig = field(default_factory=ActorsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    tasks: dict[str, TaskSpec] = field(default_factory=dict)   # custom tasks and built-in overrides, by name

    def task_specs(self) -> list[TaskSpec]:
        """The tasks this run executes, in `run.tasks` order."""
        return [self.tasks[name] if name in self.tasks else builtin_task(name) for name in self.run.tasks]

    def model_name(self) -> str:
        return self.model.name or Path(self.model.path.rstrip("/")).name

    def result_settings(self) -> dict[str, Any]:
        """Everything that changes what the model writes (not where input comes from or output goes)."""
        run = {k: v for k, v in dataclasses.asdict(self.run).items() if k != "drain_s"}   # how a run stops
        # tensor_parallel: where the model runs, not what it writes (and outputs made before it keep their hash)
        model = {k: v for k, v in dataclasses.asdict(self.model).items() if k != "tensor_parallel"}
        return {"model": model, "run": run,
                "batching": {**{k: getattr(self.batching, k) for k in ("max_pixels", "max_video_pixels", "max_frames")},
                             # only when set: outputs made before PDFs were read keep their settings' hash
                             **({"pdf_dpi": self.input.pdf_dpi} if self.input.pdf_dpi else {})},
                "tasks": [_task_settings(t) for t in self.task_specs()]}

    def result_hash(self) -> str:
        return hashlib.sha256(json.dumps(self.result_settings(), sort_keys=True).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for logging and the run record; holds no credentials (they never enter the config)."""
        return dataclasses.asdict(self)


def _task_settings(spec: TaskSpec) -> dict[str, Any]:
    """A task's result settings; `verbatim` only where set, so that outputs made before it existed keep their hash."""
    settings = dataclasses.asdict(spec)
    if not spec.verbatim:
        del settings["verbatim"]
    return settings


_SECTIONS = {"input": InputConfig, "output": OutputConfig, "model": ModelConfig, "run": RunConfig,
             "batching": BatchingConfig, "actors": ActorsConfig, "storage": StorageConfig, "ray": RayConfig,
             "demo": DemoConfig}
_CHOICES = {"model.dtype": ("auto", "float32", "bfloat16", "float16"), "model.device": ("auto", "cpu", "cuda"),
            "input.format": ("files", "webdataset", "parquet"), "batching.mode": ("refill", "static"),
            "output.verify": ("auto", "always")}
_AUTO_KEYS = {"run.batch_size", "actors.count", "actors.num_gpus", "batching.read_ahead_items"}   # may also be the string "auto"
_POSITIVE = {"model.tensor_parallel", "run.batch_size", "run.max_new_tokens", "output.rows_per_file", "output.target_file_mb", "actors.count", "batching.sort_window",
             "batching.decode_batch_size", "batching.max_input_pixels", "batching.read_ahead_items",
             "batching.read_ahead_mb", "run.repetition_penalty",
             "run.stop_failure_rate", "run.stop_failure_window"}
_NON_NEGATIVE = {"input.max_items", "batching.max_pixels", "batching.max_video_pixels", "batching.max_frames",
                 "actors.num_gpus", "run.top_k", "storage.retries", "storage.retry_backoff_s", "output.flush_seconds",
                 "ray.num_cpus", "actors.num_cpus", "actors.decode_num_cpus", "run.seed", "run.drain_s",
                 "actors.max_restarts", "input.pdf_dpi", "batching.block_items"}
_RAY_RESOURCES = {"actors.num_gpus", "actors.num_cpus", "actors.decode_num_cpus"}
# Upper bounds of values that cannot work (memory, time, the hardware); the model's context is checked against
# run.max_new_tokens in pipeline/preflight.py, where the checkpoint is read.
_AT_MOST = {
    "run.batch_size": 4096,                  # sequences in one generate() call
    "batching.sort_window": 1024,
    "batching.decode_batch_size": 65536,
    "batching.block_items": 1 << 20,
    "run.max_new_tokens": 1 << 20,           # above any GLM-V context (64K-128K)
    "output.rows_per_file": 10_000_000,      # buffered in the driver before a file is written
    "output.flush_seconds": 7 * 86400.0,
    "output.target_file_mb": 64 * 1024.0,    # one merge's file, written by one task
    "storage.retries": 100,
    "storage.retry_backoff_s": 600.0,
    "actors.count": 100_000,
    "model.tensor_parallel": 64,             # ranks of one actor, on one node
    "actors.num_gpus": 64.0,                 # per actor
    "actors.num_cpus": 4096.0,
    "actors.decode_num_cpus": 4096.0,
    "batching.max_frames": 100_000,
    "batching.max_input_pixels": 1 << 40,
    "run.seed": (1 << 63) - 1,               # torch's generator seed range
    "run.drain_s": 86400.0,
    "actors.max_restarts": 10_000,
    "input.pdf_dpi": 2400.0,                 # a letter page at 2400 dpi is 540 Mpixels: past any model's budget
}


def _check_type(key: str, value: Any, annotation: str) -> Any:
    """Coerce/check one TOML value against a dataclass field annotation (given as a string)."""
    if annotation == "str":
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
    elif annotation == "bool":
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
    elif annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
    elif annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        if not math.isfinite(value):  # nan / inf would mean "never flush", "sleep forever", ...
            raise ConfigError(f"{key}: must be a finite number, got {value!r}")
        value = float(value)
    elif annotation == "list[str]":
        if isinstance(value, str):   # `--set run.tasks=caption` means one task
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    else:   # pragma: no cover - a new field type needs a case here
        raise AssertionError(f"unhandled config type {annotation} for {key}")
    return value


def _build_section(name: str, cls: type, values: Any) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"[{name}] must be a table, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        dotted = f"{name}.{key}"
        if key not in fields:
            raise ConfigError(f"unknown config key {dotted!r} (known in [{name}]: {', '.join(fields)})")
        if dotted in _AUTO_KEYS and value == AUTO:
            kwargs[key] = value
            continue
        annotation = fields[key].type.removesuffix(" | str") if dotted in _AUTO_KEYS else fields[key].type
        try:
            value = _check_type(dotted, value, annotation)
        except ConfigError as e:
            if dotted not in _AUTO_KEYS:
                raise
            raise ConfigError(f"{e} (or {AUTO!r})") from None
        if dotted in _CHOICES and value not in _CHOICES[dotted]:
            raise ConfigError(f"{dotted}: {value!r} is not one of {', '.join(_CHOICES[dotted])}")
        if dotted in _POSITIVE and value <= 0:
            raise ConfigError(f"{dotted}: must be > 0, got {value!r}")
        if dotted in _NON_NEGATIVE and value < 0:
            raise ConfigError(f"{dotted}: must be >= 0, got {value!r}")
        if dotted in _RAY_RESOURCES and 0 < value < 1e-4:
            raise ConfigError(f"{dotted}: must be 0 or at least 0.0001 (Ray counts resources in units of 1e-4), "
                              f"got {value!r}")
        if dotted in _AT_MOST and value > _AT_MOST[dotted]:
            raise ConfigError(f"{dotted}: {value!r} is above the most that can work ({_AT_MOST[dotted]!r})")
        kwargs[key] = value
    return cls(**kwargs)


def _build_task(name: str, values: Any) -> TaskSpec:
    if not isinstance(values, dict):
        raise ConfigError(f"[tasks.{name}] must be a table, got {values!r}")
    if "prompt" not in values and name not in BUILTIN_TASKS:
        raise ConfigError(f"tasks.{name}.prompt: a custom task needs a prompt")
    defaults = BUILTIN_TASKS.get(name, ("", False, False))
    if "name" in values:
        raise ConfigError(f"tasks.{name}.name: a task's name is its table name ([tasks.{name}]), not a key")
    merged = {"prompt": defaults[0], "thinking": defaults[1], "verbatim": defaults[2], **values}
    spec = _build_section(f"tasks.{name}", TaskSpec, {"name": name, **merged})
    if not spec.prompt.strip():
        raise ConfigError(f"tasks.{name}.prompt: must not be empty")
    if not 0 <= spec.max_new_tokens <= _AT_MOST["run.max_new_tokens"]:
        raise ConfigError(f"tasks.{name}.max_new_tokens: must be in [0, {_AT_MOST['run.max_new_tokens']}], got "
                          f"{spec.max_new_tokens}")
    if spec.max_thinking_tokens < 0:
        raise ConfigError(f"tasks.{name}.max_thinking_tokens: must be >= 0, got {spec.max_thinking_tokens}")
    return spec


def parse_value(text: str) -> Any:
    """A `--set` value: read as a TOML value; anything that is not valid TOML is taken as a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.key=value` (or `tasks.NAME.key=value`) to the raw TOML dict."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected section.key=value")
    dotted, text = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    if len(parts) < 2 or not all(parts):
        raise ConfigError(f"--set {assignment!r}: the key must be dotted, like run.batch_size")
    table = raw
    for part in parts[:-1]:
        table = table.setdefault(part, {})
        if not isinstance(table, dict):
            raise ConfigError(f"--set {assignment!r}: {part!r} is not a table")
    table[parts[-1]] = parse_value(text.strip())


def from_dict(raw: dict[str, Any]) -> Config:
    raw = dict(raw)
    custom = raw.pop("tasks", {})
    unknown = set(raw) - set(_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown config section(s) {sorted(unknown)} (known: {', '.join(_SECTIONS)}, tasks)")
    sections = {name: _build_section(name, cls, raw.get(name, {})) for name, cls in _SECTIONS.items()}
    if not isinstance(custom, dict):
        raise ConfigError(f"[tasks] must be a table of task tables, got {custom!r}")
    cfg = Config(**sections, tasks={name: _build_task(name, v) for name, v in custom.items()})
    _validate(cfg)
    return cfg


def _validate_input(i: InputConfig) -> None:
    if i.format == "files":
        if bool(i.uri) == bool(i.manifest):
            raise ConfigError("input: set exactly one of input.uri (a prefix to list) and input.manifest")
    else:
        if not i.uri or i.manifest:
            raise ConfigError(f"input.uri: input.format = {i.format!r} reads its shards from input.uri (a folder, "
                              f"prefix or glob), not from input.manifest")
    if i.format == "parquet" and not i.bytes_column:
        raise ConfigError("input.bytes_column: input.format = 'parquet' needs the column of media bytes (e.g. 'jpg')")
    if i.format != "parquet" and (i.bytes_column or i.key_column):
        raise ConfigError("input.bytes_column / input.key_column: only for input.format = 'parquet'")
    if i.keep_columns and not (i.manifest or i.format == "parquet"):
        raise ConfigError("input.keep_columns: only manifests and Parquet inputs have columns to keep")
    if len(set(i.keep_columns)) != len(i.keep_columns):
        raise ConfigError(f"input.keep_columns: a column is listed twice in {i.keep_columns}")
    if (i.include != ["*"] or i.exclude) and (i.manifest or i.format != "files"):
        raise ConfigError("input.include / input.exclude: only for a listed prefix (input.uri, format 'files')")
    if not i.uri_column:
        raise ConfigError("input.uri_column: must not be empty")


PARTITION_COLUMNS = ("task",)           # what output.partition_by may name
FOLDER_VALUE = re.compile(r"[A-Za-z0-9_.-]+")   # a value that can be a folder's name on every store and reader


def _validate_partitions(cfg: Config) -> None:
    by = cfg.output.partition_by
    unknown = [c for c in by if c not in PARTITION_COLUMNS]
    if unknown or len(set(by)) != len(by):
        raise ConfigError(f"output.partition_by: expected a list of distinct columns among {list(PARTITION_COLUMNS)}, "
                          f"got {by}")
    if "task" in by:
        names = list(cfg.run.tasks) + ([cfg.input.manifest_prompt_task] if cfg.input.manifest else [])
        bad = [n for n in names if not FOLDER_VALUE.fullmatch(n) or n in (".", "..")]
        if bad:
            raise ConfigError(f"output.partition_by = [\"task\"]: task name(s) {bad} cannot be folder names "
                              f"(task=NAME/); use letters, digits, '_', '.', '-'")


def _validate(cfg: Config) -> None:
    _validate_input(cfg.input)
    _validate_partitions(cfg)
    if not cfg.output.uri:
        raise ConfigError("output.uri: required (a local folder or a URL such as s3://bucket/results/)")
    if not cfg.model.path:
        raise ConfigError("model.path: required (a checkpoint folder in the Hugging Face layout)")
    if not cfg.run.tasks and not (cfg.input.manifest and cfg.input.manifest_prompt_task):
        raise ConfigError("run.tasks: at least one task is needed (a manifest's own prompts run only when "
                          "input.manifest_prompt_task names their task)")
    for name in cfg.run.tasks:
        if name not in BUILTIN_TASKS and name not in cfg.tasks:
            raise ConfigError(f"run.tasks: unknown task {name!r} (built-in: {', '.join(BUILTIN_TASKS)}; "
                              f"custom tasks are defined as [tasks.NAME] with a prompt)")
    if len(set(cfg.run.tasks)) != len(cfg.run.tasks):
        raise ConfigError(f"run.tasks: a task is listed twice in {cfg.run.tasks}")
    if cfg.input.manifest and cfg.input.manifest_prompt_task in cfg.run.tasks:
        raise ConfigError(f"input.manifest_prompt_task: {cfg.input.manifest_prompt_task!r} is also in run.tasks")
    if cfg.batching.max_frames == 1:
        raise ConfigError("batching.max_frames: must be 0 (no cap) or >= 2 (frames pair up into temporal patches)")
    if not 0 < cfg.run.top_p <= 1:
        raise ConfigError(f"run.top_p: must be in (0, 1], got {cfg.run.top_p}")
    if cfg.run.stop_failure_rate > 1:
        raise ConfigError(f"run.stop_failure_rate: must be in (0, 1], got {cfg.run.stop_failure_rate}")
    if cfg.run.temperature <= 0:
        raise ConfigError(f"run.temperature: must be > 0, got {cfg.run.temperature}")
    if cfg.ray.autoscaling and AUTO in (cfg.actors.count, cfg.actors.num_gpus):
        raise ConfigError("ray.autoscaling: set actors.count and actors.num_gpus (not \"auto\"): an autoscaling "
                          "cluster's GPU nodes may not be up when the run sizes its actors")
    if cfg.model.device == "cuda" and cfg.actors.num_gpus == 0:
        raise ConfigError("model.device: 'cuda' needs actors.num_gpus > 0")
    if cfg.model.tensor_parallel > 1 and cfg.batching.mode != "refill":
        raise ConfigError(f"model.tensor_parallel = {cfg.model.tensor_parallel} needs batching.mode = 'refill' "
                          f"(the ranks follow rank 0's engine; static mode has no tensor-parallel path)")
    window = decode_slots(cfg.run.batch_size, on_gpu=True) * cfg.batching.sort_window
    if window > 65536:
        raise ConfigError(f"run.batch_size x batching.sort_window: {window} sequences in one actor call is more "
                          f"than can work (65536)")
    if cfg.storage.endpoint_url and not cfg.storage.endpoint_url.startswith(("http://", "https://")):
        raise ConfigError(f"storage.endpoint_url: expected an http(s):// URL, got {cfg.storage.endpoint_url!r}")


def load(path: str | Path, overrides: list[str] = ()) -> Config:
    """Read a TOML config file, apply `--set` overrides, validate. Relative local paths are kept relative to the
    current directory (the repo root for `make demo` and `ray job submit --working-dir .`)."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:   # a folder, unreadable, not UTF-8 text
        raise ConfigError(f"config file {path} cannot be read as UTF-8 text: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path} is not valid TOML: {e}") from None
    for assignment in overrides:
        apply_override(raw, assignment)
    return from_dict(raw)
