"""Run config: TOML into validated dataclasses, `--set` overrides, errors that name the key."""

import pytest

from pipeline import config
from pipeline.config import ConfigError

BASE = """
[input]
uri = "s3://bucket/media/"
[output]
uri = "s3://bucket/out/"
[model]
path = "/models/glm"
"""


def load(tmp_path, text=BASE, overrides=()):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return config.load(path, list(overrides))


def test_defaults_and_shipped_configs_load(tmp_path):
    cfg = load(tmp_path)
    assert cfg.run.tasks == ["caption"]
    # sized once Ray is up: actors to the cluster, decode slots to where the model runs (64 on a GPU, 8 on CPU)
    assert cfg.actors.count == cfg.actors.num_gpus == cfg.run.batch_size == "auto"
    assert load(tmp_path, overrides=["actors.count=auto", "actors.num_gpus=0.5"]).actors.num_gpus == 0.5
    assert [t.name for t in cfg.task_specs()] == ["caption"]
    for name in ("configs/demo.toml", "configs/s3_example.toml", "configs/ocr_example.toml"):
        assert config.load(name).task_specs()


def test_set_overrides_read_toml_values_and_bare_words(tmp_path):
    cfg = load(tmp_path, overrides=['run.tasks=["caption", "ocr"]', "input.uri=s3://other/media/",
                                    "run.batch_size=3", "run.max_new_tokens=7", "model.path=/m/x",
                                    "output.uri=/tmp/o", "storage.endpoint_url=http://127.0.0.1:9000",
                                    "tasks.chart.prompt=Describe the chart", "run.do_sample=true"])
    assert cfg.run.tasks == ["caption", "ocr"]
    assert cfg.input.uri == "s3://other/media/" and cfg.model.path == "/m/x" and cfg.output.uri == "/tmp/o"
    assert cfg.run.batch_size == 3 and cfg.run.max_new_tokens == 7 and cfg.run.do_sample is True
    assert cfg.storage.endpoint_url == "http://127.0.0.1:9000"
    assert cfg.tasks["chart"].prompt == "Describe the chart"
    assert config.parse_value('"quoted"') == "quoted" and config.parse_value("1.5") == 1.5


@pytest.mark.parametrize("override, key", [
    ("run.batch_sise=4", "run.batch_sise"),
    ("run.batch_size=0", "run.batch_size"),
    ("run.batch_size=abc", "run.batch_size"),
    ("model.dtype=float8", "model.dtype"),
    ("run.tasks=[\"caption\", \"nope\"]", "run.tasks"),
    ("actors.num_gpus=-1", "actors.num_gpus"),
    ("actors.count=all", r"actors.count: expected an integer, got 'all' \(or 'auto'\)"),
    ("actors.count=0", "actors.count"),
    ("actors.decode_num_cpus=0.00001", r"actors.decode_num_cpus: must be 0 or at least 0.0001"),
    ("actors.num_gpus=0.00005", "actors.num_gpus"),
    ("storage.endpoint_url=localhost:9000", "storage.endpoint_url"),
    ("bogus.key=1", "bogus"),
    ("run.max_new_tokens=true", "run.max_new_tokens"),
    ("tasks.empty.thinking=true", "tasks.empty.prompt"),
    ("run.repetition_penalty=0", "run.repetition_penalty"),
    ("output.flush_seconds=inf", "output.flush_seconds"),
    ("run.temperature=nan", "run.temperature"),
    ("batching.max_frames=1", "batching.max_frames"),
    ('tasks.chart={prompt="Read the chart.", name="other"}', "tasks.chart.name"),
    ("batching.mode=dynamic", "batching.mode"),
    ("tasks.reasoning.max_thinking_tokens=-1", "tasks.reasoning.max_thinking_tokens"),
])
def test_bad_keys_and_values_are_rejected_with_the_key_named(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load(tmp_path, overrides=[override])


def test_structural_errors(tmp_path):
    with pytest.raises(ConfigError, match="exactly one of input.uri"):
        load(tmp_path, overrides=["input.manifest=/m.csv"])
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(tmp_path, text="[input\n")
    with pytest.raises(ConfigError, match="does not exist"):
        config.load(tmp_path / "missing.toml")
    (tmp_path / "folder.toml").mkdir()   # these were tracebacks, exit 1
    with pytest.raises(ConfigError, match=r"folder\.toml cannot be read as UTF-8 text: .*Is a directory"):
        config.load(tmp_path / "folder.toml")
    (tmp_path / "latin1.toml").write_bytes('[model]\nname = "caf\xe9"\n'.encode("latin-1"))
    with pytest.raises(ConfigError, match=r"latin1\.toml cannot be read as UTF-8 text: .*codec can't decode"):
        config.load(tmp_path / "latin1.toml")
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load(tmp_path, overrides=["run.batch_size"])
    manifest = ["input.uri=", "input.manifest=/m.csv", "run.tasks=[]"]
    assert load(tmp_path, overrides=manifest).input.manifest_prompt_task == "prompt"   # the rows' own prompts
    with pytest.raises(ConfigError, match=r"run\.tasks: at least one task is needed"):   # ran nothing, exit 0
        load(tmp_path, overrides=[*manifest, 'input.manifest_prompt_task=""'])


def test_custom_tasks_and_result_hash(tmp_path):
    text = BASE + '[run]\ntasks = ["caption", "chart"]\n[tasks.chart]\nprompt = "Chart in this {media}?"\n'
    cfg = load(tmp_path, text)
    specs = cfg.task_specs()
    assert [s.name for s in specs] == ["caption", "chart"] and specs[1].prompt.startswith("Chart")
    # where data comes from or goes to does not change the hash; what the model is asked does
    assert load(tmp_path, text, ["input.uri=/elsewhere", "actors.count=4"]).result_hash() == cfg.result_hash()
    assert load(tmp_path, text, ["run.max_new_tokens=9"]).result_hash() != cfg.result_hash()
    assert load(tmp_path, text, ["tasks.chart.prompt=Other"]).result_hash() != cfg.result_hash()


def test_a_rerun_with_other_result_settings_says_what_changed(tmp_path):
    """Pairs done before are skipped whatever the settings: a changed prompt, model or max_new_tokens must not pass
    silently as "skipped as already done"; settings that change nothing in the results say nothing."""
    import io

    from pipeline.run import _note_changed_settings
    from pipeline.state import StateDir
    from pipeline.storage import StorageOptions

    state = StateDir(str(tmp_path / "out"), StorageOptions())

    def note(cfg):
        printed = io.StringIO()
        _note_changed_settings(cfg, state, printed)
        return printed.getvalue()

    first = load(tmp_path, overrides=["run.max_new_tokens=64"])
    assert note(first) == ""   # a new output
    state.write_json("runs/20260101-000000-a.json", {"config": first.to_dict(),
                                                     "result_settings": first.result_settings()})
    assert note(load(tmp_path, overrides=["run.max_new_tokens=64", "run.retry_errors=true"])) == ""
    line = note(load(tmp_path, overrides=["run.max_new_tokens=128", "model.path=/models/other"]))
    assert "note: model.path, run.max_new_tokens changed since the last run on this output" in line
    assert "tasks" in note(load(tmp_path, overrides=["run.max_new_tokens=64", "run.tasks=['ocr']"]))
    kept = note(load(tmp_path, overrides=["run.max_new_tokens=64", "input.manifest=m.csv", "input.uri=''",
                                          "input.keep_columns=['score']"]))
    assert kept.startswith("note: input.keep_columns is ['score'] where the last run on this output kept []")
    state.write_json("runs/20260101-000001-a.json", {"config": load(tmp_path, overrides=[
        "input.manifest=m.csv", "input.uri=''", "input.keep_columns=['a', 'b']"]).to_dict()})
    assert note(load(tmp_path, overrides=["input.manifest=m.csv", "input.uri=''",
                                          "input.keep_columns=['b', 'a']"])) == ""   # the same columns
    state.write_json("runs/20260102-000000-b.json", {"config": {}})   # an older version's record: nothing to compare
    assert note(load(tmp_path, overrides=["run.max_new_tokens=128"])) == ""
