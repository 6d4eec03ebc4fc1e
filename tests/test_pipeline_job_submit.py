"""`ray job submit --working-dir . -- python jobs/caption.py --config configs/demo.toml` against a cluster started
with `ray start --head` on 127.0.0.1 with two (logical) GPUs (its own temp dir and ports), stopped afterwards by
ending its process group (`ray stop` would stop every Ray on the machine, not just this one)."""

import subprocess

import pandas as pd
import pytest

from tests.cluster_helpers import RAY, free_ports, ray_env, stop_node
from tests.pipeline_helpers import REPO, good_media, wait_for, write_local


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory):
    temp = tmp_path_factory.mktemp("rayhead")
    gcs, dash, agent, agent_grpc, env_agent, metrics = free_ports(6)
    env = ray_env()
    cmd = [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=3",
           "--num-gpus=2",   # logical GPUs: the demo config's "auto" actors take one each (and run on CPU here)
           "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
           f"--dashboard-agent-listen-port={agent}",
           f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
           f"--metrics-export-port={metrics}", f"--temp-dir={temp}", "--disable-usage-stats"]
    log = open(temp / "head.log", "w")
    head = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"

    def ready():
        probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True)
        return probe.returncode == 0 or head.poll() is not None

    try:
        assert wait_for(ready, timeout=120, interval=1.0) and head.poll() is None, (temp / "head.log").read_text()
        yield address, env
    finally:
        stop_node(head)
        log.close()


def test_ray_job_submit_runs_the_demo_config_on_the_cluster(ray_head, tiny_gqa, tmp_path):
    address, env = ray_head
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_local(corpus, good_media(num_images=5, num_videos=1))
    cmd = [RAY, "job", "submit", "--address", address, "--working-dir", ".", "--",
           "python", "jobs/caption.py", "--config", "configs/demo.toml",
           "--set", f"input.uri={corpus}", "--set", f"output.uri={out}", "--set", f"model.path={tiny_gqa}",
           "--set", "demo.generate=false", "--set", 'run.tasks=["caption"]', "--set", "run.max_new_tokens=4"]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "succeeded" in (result.stdout + result.stderr)
    assert "done: 6 (item, task) rows" in result.stdout
    assert "model actors: 2, 1 GPU and 1 CPU each (cluster: 2 GPU, 3 CPU)" in result.stdout
    assert "Started a local Ray instance" not in result.stdout + result.stderr   # it used the cluster
    df = pd.read_parquet(out)
    assert len(df) == 6 and df.error.isna().all() and set(df.media_type) == {"image", "video"}
