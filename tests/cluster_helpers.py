"""A Ray cluster of two nodes on this machine for tests: a head on 127.0.0.1 and a worker on 127.0.0.2 (both on the
loopback, each with its own ports; the driver, started on 127.0.0.1, attaches to the head), each `ray start --block`
in its own process group, stopped by ending those groups (`ray stop` would stop every Ray on the machine). A node
is lost as a preempted machine is: its raylet killed with SIGKILL."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.pipeline_helpers import PY, REPO, wait_for

RAY = str(REPO / ".venv" / "bin" / "ray") if (REPO / ".venv" / "bin" / "ray").exists() else "ray"
HEAD_IP, WORKER_IP = "127.0.0.1", "127.0.0.2"


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind((host, 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def ray_env() -> dict:
    # the job's `python` must be this environment's; Ray turns token auth on for new clusters, and the CLI only
    # sends the token when told to
    env = {**os.environ, "PATH": f"{os.path.dirname(PY)}:{os.environ.get('PATH', '')}",
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token",
           # a lost node is found in ~3 s instead of ~15 s, so that a short test run sees it
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3",
           # every node's log lines reach the driver as they are (tests look for a model actor's line from the worker:
           # deduplicated, it shows only as "[repeated 2x across cluster]")
           "RAY_DEDUP_LOGS": "0",
           # `ray start --block` stops at once on SIGTERM instead of first draining its node for up to 30 s (it waits
           # that long whenever an actor lives there: Ray Data's detached ones always do on the head)
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0"}
    env.pop("RAY_ADDRESS", None)
    return env


def stop_node(proc: subprocess.Popen) -> None:
    """Stop a `ray start --block` started in a process group of its own: SIGTERM to it alone, which stops its
    node's processes in a second or two (sent to the whole group, the processes it is stopping die under it and it
    hangs for over 30 s), then SIGKILL to whatever is left of the group (a lost node's agents, say)."""
    try:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def _node_ports(ip: str) -> list[str]:
    manager, store, metrics, agent, agent_grpc, env_agent = free_ports(6, ip)
    return [f"--node-manager-port={manager}", f"--object-manager-port={store}", f"--metrics-export-port={metrics}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}", "--min-worker-port=0", "--max-worker-port=0"]


@dataclass
class Cluster:
    temp: Path
    env: dict = field(default_factory=ray_env)
    gcs: int = 0
    dashboard: int = 0
    procs: dict = field(default_factory=dict)
    node_temps: list = field(default_factory=list)   # the temp dirs of nodes other than the head

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.gcs}"

    @property
    def dashboard_address(self) -> str:
        return f"http://{HEAD_IP}:{self.dashboard}"

    def start(self, head: dict, worker: dict, dashboard: bool = False) -> "Cluster":
        """head / worker: {"cpus": n, "gpus": n} (logical GPUs: the model actors ask for them and run on CPU), and
        optionally "ray" (the `ray` command that starts the node, from another environment) and "env".
        dashboard: the head serves `ray job submit` at dashboard_address."""
        (self.gcs,) = free_ports(1)
        # no dashboard unless asked: these clusters take jobs by their GCS address, and its modules sometimes fail to
        # start on a busy machine (MetricsHead: "Received EOF from pipe"), which fails the whole `ray start`
        args = ["--head", f"--port={self.gcs}", "--include-dashboard=false"]
        if dashboard:
            (self.dashboard,) = free_ports(1)
            args[-1:] = ["--include-dashboard=true", f"--dashboard-host={HEAD_IP}",
                         f"--dashboard-port={self.dashboard}"]
        self._start("head", args, HEAD_IP, head)
        assert wait_for(lambda: self.nodes() >= 1, timeout=120, interval=1.0), self.logs()
        self._start("worker", [f"--address={self.address}"], WORKER_IP, worker)
        assert wait_for(lambda: self.nodes() >= 2, timeout=120, interval=1.0), self.logs()
        return self

    def _start(self, name: str, args: list[str], ip: str, res: dict) -> None:
        cmd = [res.get("ray", RAY), "start", "--block", f"--node-ip-address={ip}", f"--num-cpus={res['cpus']}",
               f"--num-gpus={res.get('gpus', 0)}", "--disable-usage-stats", *_node_ports(ip), *args]
        # a temp dir per node, as separate machines have: left to Ray, the worker's session folder would be the
        # head's, and with it the folder of each job's runtime environment (two nodes building one pip env in the
        # same place delete each other's). Short: Ray's sockets live under it (107 bytes at most)
        if name == "head":
            temp = self.temp
        else:
            temp = Path(tempfile.mkdtemp(prefix=f"ray-{name}-", dir="/tmp"))
            self.node_temps.append(temp)
        cmd.append(f"--temp-dir={temp}")
        log = open(self.temp / f"{name}.log", "w")
        self.procs[name] = (subprocess.Popen(cmd, env=res.get("env", self.env), stdout=log, stderr=subprocess.STDOUT,
                                             start_new_session=True), log)

    def nodes(self) -> int:
        probe = subprocess.run([PY, "-c", _COUNT_NODES, self.address], env=self.env, capture_output=True, text=True)
        return int(probe.stdout.strip() or 0) if probe.returncode == 0 else 0

    def actors(self) -> list[dict]:
        """Every actor of the cluster not dead: {"class", "name", "ip", "state"} (ip: of the node it runs on, "?"
        before it has one). Read from the GCS's actor table (these clusters have no dashboard for ray.util.state)."""
        probe = subprocess.run([PY, "-c", _LIST_ACTORS, self.address], env=self.env, capture_output=True, text=True,
                               timeout=120)
        assert probe.returncode == 0, probe.stderr[-3000:]
        return json.loads(probe.stdout.strip().splitlines()[-1])

    def raylet_pid(self, name: str = "worker") -> int | None:
        """The raylet started by that node's `ray start`."""
        parent = self.procs[name][0].pid
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")[0]
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == parent and cmdline.endswith(b"raylet"):
                return int(entry.name)
        return None

    def kill_node(self, name: str = "worker") -> None:
        pid = self.raylet_pid(name)
        assert pid is not None, f"no raylet under {name}'s ray start"
        os.kill(pid, signal.SIGKILL)

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n{(self.temp / f'{n}.log').read_text()[-3000:]}" for n in self.procs)

    def stop(self) -> None:
        for name in reversed(list(self.procs)):
            proc, log = self.procs[name]
            stop_node(proc)
            log.close()
        for temp in self.node_temps:
            shutil.rmtree(temp, ignore_errors=True)
        # a killed raylet's workers may linger in the group's session; the groups are gone by now
        time.sleep(1)


_COUNT_NODES = """
import sys, ray
ray.init(address=sys.argv[1], logging_level="ERROR")
print(sum(1 for n in ray.nodes() if n["Alive"]))
"""

_LIST_ACTORS = """
import json, sys, ray
import ray._private.state as state
ray.init(address=sys.argv[1], logging_level="ERROR")
ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
print(json.dumps([{"class": a["ActorClassName"], "name": a["Name"], "ip": ips.get(a["Address"]["NodeID"], "?"),
                   "state": a["State"]} for a in state.actors().values() if a["State"] != "DEAD"]))
"""
