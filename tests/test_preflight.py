"""Before anything starts: config bounds, the checkpoint and its context, inputs and outputs that exist, the
resource plan against the cluster; and the job's one-line message and exit code for each kind of error."""

import errno
import io
import json
import logging
import logging.handlers
import os
import re
import shutil
import signal
import subprocess
import tarfile
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import config, preflight, storage
from pipeline.config import ActorsConfig
from pipeline.errors import ConfigError, StorageUnavailable
from tests.faults import FaultProxy
from tests.pipeline_helpers import (PY, REPO, config_text, good_media, moto_s3, run_job, s3fs_for, wait_for,
                                    write_local)


@pytest.fixture(scope="module")
def s3():
    with moto_s3() as endpoint:
        fs = s3fs_for(endpoint)
        fs.mkdir("inputs")
        fs.pipe("inputs/media/a.png", good_media(1, 0)["images/sub/img_00.jpg"])
        fs.pipe("inputs/manifest.csv", b"uri\na.png\n")
        fs.mkdir("outputs")
        yield endpoint


def _cfg(tmp_path, model, *overrides, input_uri=None, output_uri=None, endpoint=""):
    path = tmp_path / "run.toml"
    path.write_text(config_text(input_uri or str(tmp_path / "in"), output_uri or str(tmp_path / "out"), str(model),
                                endpoint=endpoint))
    return config.load(path, list(overrides))


@pytest.fixture
def corpus(tmp_path):
    write_local(tmp_path / "in", good_media(2, 0))
    return tmp_path / "in"


@pytest.mark.parametrize("override, message", [
    ("run.max_new_tokens=1000000000", r"run\.max_new_tokens: 1000000000 is above the most that can work"),
    ("run.batch_size=100000", r"run\.batch_size: 100000 is above"),
    ("output.rows_per_file=100000000", r"output\.rows_per_file"),
    ("storage.retries=1000", r"storage\.retries"),
    ("run.seed=-1", r"run\.seed: must be >= 0"),
    ("actors.num_gpus=1000", r"actors\.num_gpus"),
    ("tasks.caption.max_new_tokens=-3", r"tasks\.caption\.max_new_tokens: must be in \[0, "),
    ("batching.sort_window=1000", r"run\.batch_size x batching\.sort_window: 100000"),
])
def test_values_that_cannot_work_are_config_errors(tmp_path, tiny_gqa, override, message):
    overrides = [override, "run.batch_size=100"] if "sort_window" in override else [override]
    with pytest.raises(ConfigError, match=message):
        _cfg(tmp_path, tiny_gqa, *overrides)


def test_generation_budget_above_the_models_context(tmp_path, tiny_gqa, corpus):
    context = json.loads((tiny_gqa / "config.json").read_text())["text_config"]["max_position_embeddings"]
    preflight.check(_cfg(tmp_path, tiny_gqa, f"run.max_new_tokens={context - 1}"))
    with pytest.raises(ConfigError, match=rf"run\.max_new_tokens: {context} new tokens do not fit the model's "
                                          rf"context of {context} tokens \(max_position_embeddings in .*config.json"):
        preflight.check(_cfg(tmp_path, tiny_gqa, f"run.max_new_tokens={context}"))
    with pytest.raises(ConfigError, match=r"tasks\.ocr\.max_new_tokens: 100000 new tokens"):
        preflight.check(_cfg(tmp_path, tiny_gqa, 'run.tasks=["caption", "ocr"]', "tasks.ocr.max_new_tokens=100000"))
    # older revisions keep the field at the top level
    assert preflight.context_length({"max_position_embeddings": 4096}) == 4096
    assert preflight.context_length({"text_config": {"max_position_embeddings": 131072},
                                     "max_position_embeddings": 4096}) == 131072


def _model_type(model, model_type):
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = model_type
    (model / "config.json").write_text(json.dumps(config))


def test_preflight_knows_the_model_types_glmv_runs():
    from glmv.config import SUPPORTED_MODEL_TYPES

    assert preflight.MODEL_TYPES == SUPPORTED_MODEL_TYPES


def _broken(tmp_path, tiny_gqa, damage):
    model = tmp_path / "model"
    if not model.exists():
        shutil.copytree(tiny_gqa, model)
    damage(model)
    return model


@pytest.mark.parametrize("damage, message", [
    (lambda m: shutil.rmtree(m), "does not exist"),
    (lambda m: (shutil.rmtree(m), m.write_text("x")), "is not a folder"),
    (lambda m: (m / "config.json").unlink(), "is not a checkpoint: no config.json"),
    (lambda m: (m / "config.json").write_text("{"), r"config.json is not readable JSON"),
    (lambda m: [p.unlink() for p in m.glob("model*.safetensors*")] and (m / "pytorch_model.bin").write_bytes(b"x"),
     r"no model.safetensors or model.safetensors.index.json \(found pytorch_model.bin: pickled weights are refused"),
    (lambda m: next(m.glob("model-0*.safetensors")).unlink(), "names shard files that do not exist"),
    (lambda m: (m / "tokenizer.json").unlink(), "no tokenizer.json"),
    (lambda m: (m / "preprocessor_config.json").unlink(), "no preprocessor_config.json"),
    # another architecture: the model actors refused it too, but only once Ray was up and each had loaded it
    (lambda m: _model_type(m, "qwen2_vl"), r"config\.json: model_type 'qwen2_vl' is not supported; this pipeline "
                                           r"runs GLM-V checkpoints.*\(model_type glm4v, glm46v, glm4v_moe or "
                                           r"glm_ocr\)$"),
    (lambda m: _model_type(m, None), r"model_type None is not supported"),
])
def test_a_folder_that_is_not_a_checkpoint(tmp_path, tiny_gqa, corpus, damage, message):
    model = _broken(tmp_path, tiny_gqa, damage)
    with pytest.raises(ConfigError, match=r"^model\.path: .*" + message):
        preflight.check(_cfg(tmp_path, model))


def test_inputs_and_outputs_exist(tmp_path, tiny_gqa, corpus, s3):
    with pytest.raises(ConfigError, match=r"input\.uri: .*/nowhere does not exist"):
        preflight.check(_cfg(tmp_path, tiny_gqa, input_uri=str(tmp_path / "nowhere")))
    # an empty folder, as an empty S3 prefix: the run found nothing to do and said only "done: 0"
    empty = tmp_path / "empty"
    (empty / "sub" / ".git").mkdir(parents=True)
    (empty / ".DS_Store").write_bytes(b"x")              # hidden names are not listed
    (empty / "sub" / ".git" / "HEAD").write_bytes(b"x")
    (empty / "sub" / "loop").symlink_to(empty)           # the listing follows links: so does the check, once
    with pytest.raises(ConfigError, match=r"^input\.uri: .*/empty holds no files$"):
        preflight.check(_cfg(tmp_path, tiny_gqa, input_uri=str(empty)))
    (empty / "sub" / "a.png").write_bytes(b"x")
    assert preflight.check(_cfg(tmp_path, tiny_gqa, input_uri=str(empty))) is None
    s3_cfg = lambda **kw: _cfg(tmp_path, tiny_gqa, endpoint=s3, **kw)  # noqa: E731
    # a prefix of files: the run lists it
    assert preflight.check(s3_cfg(input_uri="s3://inputs/media/", output_uri="s3://outputs/run")) is None
    with pytest.raises(ConfigError, match=r"input\.uri: s3://inptus/media/: bucket 'inptus' does not exist"):
        preflight.check(s3_cfg(input_uri="s3://inptus/media/"))
    with pytest.raises(ConfigError, match=r"input\.uri: s3://inputs/meida/ holds no objects"):
        preflight.check(s3_cfg(input_uri="s3://inputs/meida/"))
    with pytest.raises(ConfigError, match=r"output\.uri: s3://otuputs/run: bucket 'otuputs' does not exist"):
        preflight.check(s3_cfg(output_uri="s3://otuputs/run"))
    manifest = lambda uri: _cfg(tmp_path, tiny_gqa, "input.uri=", f"input.manifest={uri}", endpoint=s3)  # noqa
    preflight.check(manifest("s3://inputs/manifest.csv"))
    with pytest.raises(ConfigError, match=r"input\.manifest: s3://inputs/missing.csv does not exist"):
        preflight.check(manifest("s3://inputs/missing.csv"))
    with pytest.raises(ConfigError, match=r"input\.manifest: .*/none.csv does not exist"):
        preflight.check(manifest(str(tmp_path / "none.csv")))


def _shards(root):
    """A folder of each documented shard and manifest form: a tar, a Parquet file, a CSV manifest."""
    (root / "shards").mkdir(parents=True)
    with tarfile.open(root / "shards" / "000.tar", "w"):
        pass
    pq.write_table(pa.table({"jpg": [b"x"]}), root / "shards" / "p.parquet")
    (root / "m").mkdir()
    (root / "m" / "a.csv").write_text("uri\na.png\n")


@pytest.mark.parametrize("remote", [False, True])
def test_every_documented_input_form_passes_and_one_that_matches_nothing_is_named(tmp_path, tiny_gqa, s3, remote):
    """What readers.find_units reads, preflight accepts: a manifest file, folder or glob; shards as a folder, a glob
    or one file (it refused all but a local manifest file and a folder of shards)."""
    _shards(tmp_path)
    if remote:
        fs = s3fs_for(s3)
        fs.put(str(tmp_path / "shards") + "/", "inputs/shards/", recursive=True)
        fs.put(str(tmp_path / "m") + "/", "inputs/m/", recursive=True)
    base = "s3://inputs" if remote else str(tmp_path)
    endpoint = s3 if remote else ""
    manifest = lambda uri: _cfg(tmp_path, tiny_gqa, "input.uri=", f"input.manifest={uri}", endpoint=endpoint)  # noqa
    shards = lambda uri, fmt, *more: _cfg(tmp_path, tiny_gqa, f"input.format={fmt}", *more, input_uri=uri,  # noqa
                                          endpoint=endpoint)
    for cfg in (manifest(f"{base}/m"), manifest(f"{base}/m/"), manifest(f"{base}/m/*.csv"),
                manifest(f"{base}/m/a.csv"), shards(f"{base}/shards/*.tar", "webdataset"),
                shards(f"{base}/shards/000.tar", "webdataset"), shards(f"{base}/shards", "webdataset"),
                shards(f"{base}/shards/*.parquet", "parquet", "input.bytes_column=jpg")):
        units = preflight.check(cfg)   # what the run reads then, without listing the input again
        assert [u.uri.rsplit("/", 1)[-1] for u in units] == [
            "a.csv" if cfg.input.manifest else "000.tar" if cfg.input.format == "webdataset" else "p.parquet"]
    with pytest.raises(ConfigError, match=r"^input\.manifest: no .*csv.* files at .*/m/\*\.jsonl$"):
        preflight.check(manifest(f"{base}/m/*.jsonl"))
    with pytest.raises(ConfigError, match=r"^input\.manifest: .*/m/\*\*\.csv is not a valid glob \(.*'\*\*' can only"):
        preflight.check(manifest(f"{base}/m/**.csv"))
    with pytest.raises(ConfigError, match=r"^input\.uri: .*/shards/nothing\.tar does not exist$"):
        preflight.check(shards(f"{base}/shards/nothing.tar", "webdataset"))
    with pytest.raises(ConfigError, match=r"^input\.uri: no \.tar files at .*/m$"):
        preflight.check(shards(f"{base}/m", "webdataset"))


def test_an_output_inside_what_the_input_reads_is_refused(tmp_path, tiny_gqa, corpus, s3, monkeypatch):
    """A later run would read the output's files back as input (format parquet: its result files and _state/ were
    taken for input shards, and the run failed with a misleading message)."""
    _shards(tmp_path)
    (tmp_path / "m" / "sub").mkdir()
    (tmp_path / "m" / "sub" / "b.csv").write_text("uri\nb.png\n")
    monkeypatch.chdir(tmp_path)   # for the relative glob below
    inside = [(str(corpus / "captions"), ()),
              (str(corpus), ()),
              (str(tmp_path / "shards" / "captions"), ("input.format=parquet", "input.bytes_column=jpg",
                                                       f"input.uri={tmp_path}/shards")),
              (str(tmp_path / "m" / "out"), ("input.uri=", f"input.manifest={tmp_path}/m")),
              (str(tmp_path / "m" / "x" / "out"), ("input.uri=", f"input.manifest={tmp_path}/m/**/*.csv")),
              (str(tmp_path / "m" / "x"), ("input.uri=", f"input.manifest={tmp_path}/m/*/*.csv")),
              ("captions", ("input.uri=", "input.manifest=*/*.csv")),   # relative, a wildcard first
              (str(tmp_path / "m" / "res.csv"), ("input.uri=", f"input.manifest={tmp_path}/m/*.csv")),  # named by it
              (str(tmp_path / "in" / "." / "images" / "out"), ())]
    for output_uri, overrides in inside:
        with pytest.raises(ConfigError, match=r"^output\.uri: .* is inside input\.(uri|manifest) .*: a later run "
                                              r"would read its result files back as input"):
            preflight.check(_cfg(tmp_path, tiny_gqa, *overrides, output_uri=output_uri))
    with pytest.raises(ConfigError, match=r"^output\.uri: s3://inputs/media/out is inside input\.uri"):
        preflight.check(_cfg(tmp_path, tiny_gqa, input_uri="s3a://inputs/media/", output_uri="s3://inputs/media/out",
                             endpoint=s3))
    # beside the input, beside a manifest file that is read alone, or where a glob cannot reach, is fine (a glob's
    # `*` stays within one folder)
    preflight.check(_cfg(tmp_path, tiny_gqa, output_uri=str(tmp_path / "in-captions")))
    for output_uri, manifest in ((tmp_path / "m" / "out", f"{tmp_path}/m/a.csv"),
                                 (tmp_path / "m" / "out", f"{tmp_path}/m/*.csv"),
                                 (tmp_path / "m" / "x" / "out", f"{tmp_path}/m/*/*.csv"),
                                 (tmp_path / "m" / "out", f"{tmp_path}/m/[rs]*/*.csv")):
        preflight.check(_cfg(tmp_path, tiny_gqa, "input.uri=", f"input.manifest={manifest}",
                             output_uri=str(output_uri)))
    preflight.check(_cfg(tmp_path, tiny_gqa, "input.format=parquet", "input.bytes_column=jpg",
                         f"input.uri={tmp_path}/shards/*.parquet", output_uri=str(tmp_path / "shards" / "out")))
    # a folder the glob names (a Spark-style `x.csv/` output of another tool) is not a file to read
    (tmp_path / "m" / "spark.csv").mkdir()
    units = preflight.check(_cfg(tmp_path, tiny_gqa, "input.uri=", f"input.manifest={tmp_path}/m/*.csv"))
    assert [u.uri.rsplit("/", 1)[-1] for u in units] == ["a.csv"]


def test_an_output_that_is_a_file_or_under_one_and_a_ray_address_typo_are_one_line(tmp_path, tiny_gqa, corpus,
                                                                                   monkeypatch):
    """Each was a traceback and exit 1 (FileExistsError / NotADirectoryError making the output folder; Ray's
    ValueError for an address it cannot parse)."""
    from pipeline import run

    (tmp_path / "afile").write_text("x")
    with pytest.raises(ConfigError, match=r"^output\.uri: .*/afile is a file, not a folder$"):
        preflight.check(_cfg(tmp_path, tiny_gqa, output_uri=str(tmp_path / "afile")))
    with pytest.raises(ConfigError, match=r"^output\.uri: .*/afile/x/out is under .*/afile, which is a file"):
        preflight.check(_cfg(tmp_path, tiny_gqa, output_uri=str(tmp_path / "afile" / "x" / "out")))
    preflight.check(_cfg(tmp_path, tiny_gqa, output_uri=str(tmp_path / "new" / "out")))   # made by the run
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    with pytest.raises(ConfigError, match=r"^ray\.address: 'locla' is not a cluster address \(Invalid address"):
        run.init_ray(_cfg(tmp_path, tiny_gqa, "ray.address=locla"))


def test_preflight_is_quick_and_rides_out_throttling_but_not_a_denial(tmp_path, tiny_gqa, s3):
    with FaultProxy(s3, seed=2) as proxy:
        cfg = _cfg(tmp_path, tiny_gqa, "storage.retries=10", input_uri="s3://inputs/media/",
                   output_uri="s3://outputs/run", endpoint=proxy.url)
        for kind in ("head", "list"):
            proxy.set(kind, slowdown=0.3, internal=0.1, drop=0.1)
        start = time.monotonic()
        for _ in range(3):
            preflight.check(cfg)
        assert (time.monotonic() - start) / 3 < 1.0
        proxy.heal()
        proxy.set("head", denied=1.0)
        with pytest.raises(StorageUnavailable, match=r"s3://inputs: 403"):
            preflight.check(cfg)


@pytest.mark.parametrize("cluster, actors, message", [
    ({"CPU": 4.0}, ActorsConfig(count=1, num_gpus=0, num_cpus=4), r"take 4 of the cluster's 4 CPUs, leaving 0"),
    ({"CPU": 8.0}, ActorsConfig(count=4, num_gpus=0, num_cpus=2), r"take 8 of the cluster's 8 CPUs"),
    ({"CPU": 4.0}, ActorsConfig(count=1, num_gpus=0, num_cpus=2, decode_num_cpus=3),
     r"leaving 2; a decode task needs 3"),
    ({"CPU": 16.0, "GPU": 2.0}, ActorsConfig(count=4, num_gpus=1), r"= 4 GPUs, the cluster has 2"),
    ({"CPU": 16.0}, ActorsConfig(count=1, num_gpus=1), r"the cluster has 0"),
])
def test_resource_plans_that_can_never_run(cluster, actors, message):
    with pytest.raises(ConfigError, match=message):
        preflight.check_resources(cluster, actors)
    warnings = preflight.check_resources(cluster, actors, strict=False)   # an autoscaling cluster: warned only
    assert any(__import__("re").search(message, w) for w in warnings)


def test_resource_plans_that_run():
    assert preflight.check_resources({"CPU": 8.0}, ActorsConfig(count=2, num_gpus=0, num_cpus=2)) == []
    # read tasks hold no CPU: one actor and one decode task fill a 2-CPU machine and run
    assert preflight.check_resources({"CPU": 2.0}, ActorsConfig(count=1, num_gpus=0, num_cpus=1)) == []
    cpu_only = preflight.check_resources({"CPU": 8.0, "GPU": 1.0}, ActorsConfig(count=1, num_gpus=0))
    assert cpu_only == ["actors.num_gpus is 0 but the cluster has 1 GPU(s): the model runs on CPU"]


@pytest.mark.parametrize("cluster, actors, device, count, num_gpus", [
    ({"CPU": 2.0}, ActorsConfig(), "auto", 1, 0),                           # a laptop: one CPU actor
    ({"CPU": 64.0, "GPU": 8.0}, ActorsConfig(), "auto", 8, 1),               # one actor per GPU
    ({"CPU": 64.0, "GPU": 8.0}, ActorsConfig(), "cpu", 1, 0),                # model.device = cpu keeps off GPUs
    ({"CPU": 4.0, "GPU": 8.0}, ActorsConfig(), "auto", 3, 1),                # leaves a CPU for decode tasks
    ({"CPU": 4.0, "GPU": 8.0}, ActorsConfig(num_cpus=0), "auto", 8, 1),
    ({"CPU": 64.0, "GPU": 8.0}, ActorsConfig(num_gpus=2), "auto", 4, 2),      # a model split over 2 GPUs
    ({"CPU": 64.0, "GPU": 8.0}, ActorsConfig(num_gpus=0.5), "auto", 16, 0.5),
    ({"CPU": 64.0, "GPU": 8.0}, ActorsConfig(count=2), "auto", 2, 1),         # set values stay
    ({"CPU": 64.0, "GPU": 8.0}, ActorsConfig(num_gpus=0), "auto", 1, 0),
    ({"CPU": 16.0}, ActorsConfig(), "cuda", 1, 1),                           # refused by check_resources below
    ({"CPU": 64.0, "GPU": 1.0}, ActorsConfig(num_gpus=0.2), "auto", 5, 0.2),  # 1 / 0.2 is 4.999... in floats
    ({"CPU": 64.0, "GPU": 8.0}, ActorsConfig(num_gpus=0.1), "auto", 63, 0.1),  # 80 fit, 63 leave a CPU free
    ({"CPU": 2.0, "GPU": 2.0}, ActorsConfig(num_gpus=0.5, num_cpus=0), "auto", 4, 0.5),   # an int, not 2.0 GPUs
    ({"CPU": 64.0, "GPU": 7.0}, ActorsConfig(num_gpus=0.14), "auto", 50, 0.14),  # 50 x 0.14 = 7.000000000000001
])
def test_auto_actors_are_sized_to_the_cluster(cluster, actors, device, count, num_gpus):
    plan = preflight.plan_actors(cluster, actors, device)
    assert (plan.count, plan.num_gpus) == (count, num_gpus) and type(plan.count) is int
    assert plan.num_cpus == actors.num_cpus and plan.decode_num_cpus == actors.decode_num_cpus
    if device == "cuda":
        with pytest.raises(ConfigError, match="1 actor.s. x actors.num_gpus 1 = 1 GPUs, the cluster has 0"):
            preflight.check_resources(cluster, plan)
    else:
        assert not [w for w in preflight.check_resources(cluster, plan) if "num_gpus is 0" not in w]


# --- the job: one line and an exit code per kind of error, before Ray starts ---------------------------------------


def _job(tmp_path, model, *overrides, input_uri=None, output_uri=None, endpoint="", env=None):
    path = tmp_path / "job.toml"
    path.write_text(config_text(input_uri or str(tmp_path / "in"), output_uri or str(tmp_path / "out"), str(model),
                                endpoint=endpoint))
    start = time.monotonic()
    result = run_job(path, *overrides, timeout=120, env=env)
    return result, time.monotonic() - start


def _one_line(result, prefix: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith(prefix), result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "ray" not in result.stderr.lower(), result.stderr[-3000:]
    return lines[-1]


def test_job_exit_codes_for_config_errors_before_ray(tmp_path, tiny_gqa, corpus):
    cases = [
        (["run.max_new_tokens=1000000000"], "config error: run.max_new_tokens: 1000000000 is above"),
        (["run.max_new_tokens=100000"], "config error: run.max_new_tokens: 100000 new tokens do not fit"),
        ([f"input.uri={tmp_path / 'nowhere'}"], "config error: input.uri: "),
        ([f"model.path={corpus}"], "config error: model.path: "),
        (["input.uri=", f"input.manifest={tmp_path}/m/*.csv"], "config error: input.manifest: no "),
        ([f"output.uri={corpus}/out"], "config error: output.uri: "),
    ]
    for overrides, prefix in cases:
        result, seconds = _job(tmp_path, tiny_gqa, *overrides)
        assert result.returncode == 2, (overrides, result.stderr[-2000:])
        _one_line(result, prefix)
        assert seconds < 15          # a Python start-up and a few imports, never a cluster
    assert not (tmp_path / "out").exists()     # nothing written, no row recorded


def test_job_exit_codes_for_a_held_output_and_a_storage_outage(tmp_path, tiny_gqa, corpus, s3):
    state = tmp_path / "out" / "_state"
    state.mkdir(parents=True)
    (state / "lease.json").write_text(json.dumps({"host": os.uname().nodename, "pid": os.getpid(), "run": "other",
                                                  "heartbeat": time.time()}))
    result, _ = _job(tmp_path, tiny_gqa)
    assert result.returncode == 5, result.stderr[-2000:]
    _one_line(result, "output in use: output ")
    with FaultProxy(s3) as proxy:
        proxy.set("head", denied=1.0)
        result, _ = _job(tmp_path, tiny_gqa, input_uri="s3://inputs/media/", output_uri="s3://outputs/x",
                         endpoint=proxy.url)
    assert result.returncode == 3, result.stderr[-2000:]
    line = _one_line(result, "storage error: storage unavailable: s3://inputs: 403")
    assert "testing-secret-value" not in result.stderr + result.stdout and len(line) < 300


def test_an_output_folder_that_cannot_be_made_or_written_is_a_storage_error_in_one_line(tmp_path, tiny_gqa, corpus):
    """It was a traceback (PermissionError making the folder, exit 1). sysfs refuses every mkdir, also root's."""
    result, seconds = _job(tmp_path, tiny_gqa, output_uri="/sys/glmv-test-out")
    assert result.returncode == 3, result.stderr[-2000:]
    _one_line(result, "storage error: storage unavailable: /sys/glmv-test-out: the output folder cannot be created "
                      "or written (PermissionError: ")
    assert seconds < 15   # before Ray starts


@pytest.mark.parametrize("method, error", [
    ("makedirs", PermissionError(errno.EACCES, "Permission denied")),       # a folder of another user's
    ("pipe_file", OSError(errno.EROFS, "Read-only file system")),           # exists, on a read-only mount
])
def test_an_output_folder_denied_or_read_only_stops_before_anything_starts(tmp_path, monkeypatch, method, error):
    from fsspec.implementations.local import LocalFileSystem

    from pipeline.output import ResultWriter

    (tmp_path / "out").mkdir()

    def refuse(self, path, *args, **kwargs):
        raise type(error)(error.errno, error.strerror, path)

    monkeypatch.setattr(LocalFileSystem, method, refuse)
    with pytest.raises(StorageUnavailable, match=rf"^storage unavailable: {tmp_path}/out: the output folder cannot "
                                                 rf"be created or written \({type(error).__name__}: "
                                                 rf"\[Errno {error.errno}\] {error.strerror}"):
        ResultWriter(str(tmp_path / "out"), preflight.StorageOptions(retries=1, retry_backoff_s=0), 10, 30.0)


def _readme_exit_codes() -> dict[int, str]:
    """The README's exit-code table: code -> its kinds and meaning."""
    rows = re.findall(r"^\| (\d) \| (.*) \|$", (REPO / "README.md").read_text(), flags=re.MULTILINE)
    return {int(code): rest for code, rest in rows}


def test_a_missing_bucket_exits_with_the_code_the_readme_gives(tmp_path, tiny_gqa, corpus, s3):
    """A bucket named in the config that does not exist is a typo to fix, not an outage to wait out: exit 2, as for
    any other input or output that does not exist (the README's table said 3, the job gave 2)."""
    codes = _readme_exit_codes()
    for where in ({"output_uri": "s3://otuputs/run"}, {"input_uri": "s3://inptus/media/"}):
        result, _ = _job(tmp_path, tiny_gqa, endpoint=s3, **where)
        line = _one_line(result, "config error: ")
        assert "bucket 'otuputs' does not exist" in line or "bucket 'inptus' does not exist" in line
        assert result.returncode == 2 and "bucket" in codes[2] and "that does not exist at start" in codes[2], codes
    assert "bucket deleted during the run" in codes[3]   # mid-run the store lost it: an outage, as NoSuchBucket is
    assert storage.classify(_client_error("NoSuchBucket", 404)) is storage.Fault.OUTAGE


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError({"Error": {"Code": code, "Message": "x"}, "ResponseMetadata": {"HTTPStatusCode": status}},
                       "PutObject")


def test_job_whose_actors_take_every_cpu_stops_with_a_message(tmp_path, tiny_gqa, corpus):
    result, seconds = _job(tmp_path, tiny_gqa, "ray.num_cpus=2", "actors.num_cpus=2")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith("config error: actors: 1 actor(s) x actors.num_cpus 2 take 2 of the cluster's 2 "
                                "CPUs, leaving 0"), result.stderr[-3000:]
    assert seconds < 90
    assert not (tmp_path / "out" / "_state" / "lease.json").exists()    # released on the way out


def test_an_autoscaling_cluster_gets_a_warning_for_gpus_not_up_yet(tmp_path, tiny_gqa, monkeypatch, caplog):
    from pipeline import run

    monkeypatch.setattr(run, "init_ray", lambda cfg: None)
    monkeypatch.setattr(run.ray, "cluster_resources", lambda: {"CPU": 4.0})   # the GPU nodes are not up yet
    with pytest.raises(ConfigError, match=r"ray\.autoscaling: set actors\.count and actors\.num_gpus"):
        _cfg(tmp_path, tiny_gqa, "ray.autoscaling=true")
    cfg = _cfg(tmp_path, tiny_gqa, "ray.autoscaling=true", "actors.count=2", "actors.num_gpus=1")
    out = io.StringIO()
    with caplog.at_level("WARNING", logger="pipeline.run"):
        assert run._start_ray(cfg, out).actors == cfg.actors
    assert "2 GPUs, the cluster has 0" in caplog.text
    assert out.getvalue().splitlines()[0] == "model actors: 2, 1 GPU and 1 CPU each (cluster: 0 GPU, 4 CPU)"
    assert out.getvalue().splitlines()[1].startswith("memory plan per rank (1 rank(s) per model actor): weights ")
    with pytest.raises(ConfigError, match="2 GPUs, the cluster has 0"):   # a fixed cluster: it would wait forever
        run._start_ray(_cfg(tmp_path, tiny_gqa, "actors.count=2", "actors.num_gpus=1"), out)


def test_a_cluster_address_where_nothing_answers_is_a_config_error_at_once(tmp_path, tiny_gqa, corpus):
    result, seconds = _job(tmp_path, tiny_gqa, "ray.address=127.0.0.1:1")   # ray.init would retry for minutes
    assert result.returncode == 2, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == ("config error: ray.address: no Ray cluster answers at 127.0.0.1:1 (Connection refused); "
                         "start it, or set ray.address = \"\" to start a local one"), result.stderr[-3000:]
    assert seconds < 30 and "Traceback" not in result.stderr
    from pipeline.run import _probe_cluster
    _probe_cluster("http://127.0.0.1:1")   # a dashboard URL is no host:port: Ray's own message says what is wrong


def test_a_terminated_job_releases_its_lease(tmp_path, tiny_gqa):
    write_local(tmp_path / "in", good_media(40, 0))     # enough work that the signal finds the job running
    path = tmp_path / "job.toml"
    path.write_text(config_text(str(tmp_path / "in"), str(tmp_path / "out"), str(tiny_gqa)))
    lease = tmp_path / "out" / "_state" / "lease.json"
    job = subprocess.Popen([PY, str(REPO / "jobs" / "caption.py"), "--config", str(path)], cwd=REPO,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lease.exists, 180), "the job never took its lease"
        time.sleep(1.0)                          # at work (not in the instant between taking the lease and `try`)
        job.send_signal(signal.SIGTERM)          # a plain `kill`
        code = job.wait(120)
    finally:
        if job.poll() is None:
            job.kill()
        err = job.communicate()[1]
    # exits through its `finally` blocks: 143 from the job's handler, 15 from Ray's once Ray is up
    assert code in (128 + signal.SIGTERM, signal.SIGTERM), err[-3000:]
    assert not lease.exists(), err[-3000:]


def test_ray_datas_retry_advice_never_ends_the_line(capsys):
    """Ray Data appends its retry advice to the args of an exception raised in a task (as its
    _annotate_exception_with_retry_context does) before shipping it: our one line stays ours."""
    import pickle

    from jobs import caption

    for error in (ConfigError("input.manifest: m.csv has no 'uri' column (columns: path); set input.uri_column"),
                  StorageUnavailable("s3://b/m.csv", "AccessDenied (HTTP 403)")):
        line = str(error)
        error.args = (f"{error.args[0]}\nFailed to apply UDF transform after 1/1 attempts (total backoff 0.0s).\n"
                      f"To change retry attempts, configure `ray.data.DataContext.get_current()`",)
        shipped = pickle.loads(pickle.dumps(error))
        assert str(error) == str(shipped) == line and type(shipped) is type(error)
        caption.report(caption.known_error(shipped))
        assert capsys.readouterr().err.split(": ", 1)[1] == line + "\n"


def test_errors_raised_inside_ray_tasks_map_to_their_line_and_code(capsys):
    import ray.exceptions

    import glmv
    from jobs import caption
    from pipeline.errors import RunStopped

    assert all(issubclass(cls, glmv.GlmvError) for cls in (glmv.ConfigError, glmv.CheckpointError, glmv.MediaError,
                                                            glmv.InputError, glmv.ProcessorConfigError))
    cases = [(StorageUnavailable("s3://b/k.jpg", "SlowDown (HTTP 503): Please reduce your request rate.", 5), 3,
              "storage error: storage unavailable after 5 attempts: s3://b/k.jpg: SlowDown"),
             (RunStopped("12 of the last 20 items failed: storage unavailable"), 4, "run stopped: 12 of the last"),
             (glmv.CheckpointError("/m/model.safetensors: corrupt safetensors header"), 2,
              "model error: /m/model.safetensors: corrupt")]
    for error, code, line in cases:
        wrapped = ray.exceptions.RayTaskError("read", "Traceback (most recent call last):\n  ...", error)
        try:
            try:
                raise wrapped.as_instanceof_cause()
            except Exception as e:   # what Ray Data raises in the driver: the task's error as its cause
                raise RuntimeError("dataset iteration failed") from e
        except RuntimeError as e:
            assert caption.report(caption.known_error(e)) == code
        err = capsys.readouterr().err
        assert err.startswith(line) and err.count("\n") == 1, err
    assert caption.known_error(RuntimeError("a bug")) is None     # unknown errors keep their traceback
    try:
        try:
            raise StorageUnavailable("s3://b/k.jpg", "SlowDown")
        except StorageUnavailable:
            raise TypeError("a bug met while handling it") from None
    except TypeError as e:
        assert caption.known_error(e) is None   # raised `from None`: not the storage error it replaced


def test_ray_datas_report_of_a_pipeline_error_stays_off_the_console():
    """Ray Data logs a failed read task's traceback and calls it an internal Ray error before it re-raises; for
    the pipeline's own errors the job prints one line instead (a denied WebDataset tar printed ~80 lines above
    it). Other errors keep Ray's report."""
    import ray.data  # noqa: F401 - sets up Ray Data's console and file handlers
    import ray.exceptions
    from ray.data._internal.logging import HiddenRecordFilter

    import pipeline.run  # noqa: F401 - installs the filter

    ray_data = logging.getLogger("ray.data")
    assert any(isinstance(f, HiddenRecordFilter) for h in ray_data.handlers for f in h.filters)   # its console's
    console = logging.handlers.BufferingHandler(100)   # a console like Ray Data's, that keeps what it prints
    console.addFilter(HiddenRecordFilter())
    ray_data.addHandler(console)
    try:
        for error, shown in ((StorageUnavailable("s3://b/000.tar", "AccessDenied (HTTP 403): Access Denied"), 0),
                             (RuntimeError("a bug in a read task"), 2)):
            try:
                raise ray.exceptions.RayTaskError("ReadItems", "Traceback (most recent call last): ...",
                                                  error).as_instanceof_cause()
            except Exception as e:
                logging.getLogger("ray.data._internal.execution.streaming_executor_state").error(
                    'An exception was raised from a task of operator "ReadReadItems".', exc_info=e)
                logging.getLogger("ray.data.exceptions").error("Exception occurred in Ray Data or Ray Core internal "
                                                               "code.")
            assert len(console.buffer) == shown, [r.getMessage() for r in console.buffer]
            console.buffer.clear()
    finally:
        ray_data.removeHandler(console)


def test_a_local_ray_started_by_the_job_stops_its_monitor_before_the_rest(tmp_path, tiny_gqa, monkeypatch):
    """init_ray's local Ray is stopped at exit by stop_local_ray: the autoscaler monitor is gone before ray.shutdown
    stops the GCS (else its SIGTERM handler waits on that stopped GCS until Ray kills it 1 s later), and Ray is down
    after it. Fails with the monitor's kill removed (it is alive when ray.shutdown starts)."""
    import atexit

    import ray

    from pipeline import run

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    registered = []
    monkeypatch.setattr(atexit, "register", registered.append)
    run.init_ray(_cfg(tmp_path, tiny_gqa, "ray.address=local", "ray.num_cpus=1"))
    try:
        assert registered[-1] is run.stop_local_ray   # the last registered: run first at exit
        monitors = [p.process for p in ray._private.worker._global_node.all_processes["monitor"]]
        assert monitors and monitors[0].poll() is None
        shutdown, alive_at_shutdown = ray.shutdown, []

        def watched_shutdown(*args, **kwargs):
            alive_at_shutdown.extend(p.poll() is None for p in monitors)
            shutdown(*args, **kwargs)

        monkeypatch.setattr(ray, "shutdown", watched_shutdown)
        run.stop_local_ray()
        assert alive_at_shutdown == [False]
        assert not ray.is_initialized()
    finally:
        ray.shutdown()
