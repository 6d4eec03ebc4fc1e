"""A model actor over N ranks (`model.tensor_parallel = N`): rank 0 is the Ray Data actor (pipeline.predictor), ranks
1..N-1 are follower processes it starts on its own node, each loading its shard (glmv.parallel) and running the same
engine in step.

Placement: the actor asks Ray for N times the per-rank GPUs and CPUs (pipeline.run), so Ray places the whole actor on
one node and hands it N GPUs; rank r uses the actor's r-th visible GPU. Followers are child processes, not Ray actors
in a placement group: Ray Data schedules its actors itself, so rank 0 cannot sit in a placement group with them, and a
STRICT_PACK group started by rank 0 would hold N more bundles without any guarantee of landing on rank 0's node.

Lockstep (what glmv.parallel asks of the caller: every rank adds the same requests at the same engine step): rank 0
alone takes submissions. Its engine thread (`LockstepServer`) starts every round by broadcasting a *plan* over a gloo
control group: the batches submitted since the last round (prompt batch moved to the CPU, max_new, seeds, budgets,
exclusive), or "close". Then every rank adds those batches to its engine in the same order and runs one round; the
engine's schedule depends only on its queue, its config and the tokens chosen, which are the same bits on every rank,
so the ranks admit, preempt and finish the same rows at the same step. Followers run exactly that loop (`follow`).
The alternative, broadcasting rank 0's admission decisions, would need a second path through the engine's scheduler;
forwarding its inputs keeps the engine unchanged. The cost is one small broadcast per round (per decode step on a
CPU, per 8 on CUDA; an empty plan between 2 gloo ranks measured ~1 ms on this project's loaded 2-core machine, load
average 7), and while idle rank 0 sends an empty plan every HEARTBEAT_S so a follower's wait never reaches the
control group's timeout. Rank 0's on_admit / on_leave callbacks (the crash guard) run on rank 0 only. The engine
config (the KV pool included, sized from the smallest free memory over the ranks) is sent from rank 0. A round that
raises (a bad input) raises on every rank alike; the plan says whether rank 0's last round raised, and a follower
whose own round did otherwise (out of memory on one GPU) ends, which ends rank 0 (below).

A rank that dies: the other ranks' next collective (the model's, or a plan) fails, gloo at once (the peer's socket
closes), NCCL at COLLECTIVE_TIMEOUT; rank 0 also watches its followers' processes (WATCH_S), so a follower's death
ends it at once on NCCL too, and one that dies while starting does not leave it waiting. Every collective goes
through `Lockstep`, which ends the process on any failure (os._exit, no ticket is failed and no row written), so rank
0's death is a crashed actor: Ray restarts it, its windows retry and an item that kills it twice is isolated
(pipeline.poison), as for a single-rank actor. Followers also exit when rank 0 is gone (a failed plan receive, or
their parent process changing).
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from glmv import parallel
from glmv.prompts import PromptBatch
from glmv.server import EngineServer
from pipeline.memory_plan import RankMemory, kv_per_position

log = logging.getLogger(__name__)

HEARTBEAT_S = 20.0   # an idle rank 0 sends an empty plan this often
WATCH_S = 1.0        # rank 0 looks this often whether a follower process has exited
COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=600)   # a peer that neither answers nor closes its socket
EXIT_CODE = 75       # a rank that lost a peer
LOAD_FAILED = 76     # a follower that could not load the model (rank 0 meets the same error and says it in one line)


def _die(what: str, e: BaseException) -> None:
    """A lost peer ends this rank as a crash ends a worker: nothing more is computed or written."""
    log.error("tensor parallel rank %s: %s failed (%s: %s); ending this process", os.environ.get("GLMV_TP_RANK", 0),
              what, type(e).__name__, e)
    logging.shutdown()
    os._exit(EXIT_CODE)


@dataclass(frozen=True)
class Lockstep(parallel.Group):
    """The model's collectives, ending the process when one fails (a dead or stuck rank)."""

    def all_reduce(self, t):
        try:
            return super().all_reduce(t)
        except Exception as e:  # noqa: BLE001 - any failure of a collective means the ranks are no longer in step
            _die("all_reduce", e)

    def gather_rows(self, t, counts):
        try:
            return super().gather_rows(t, counts)
        except Exception as e:  # noqa: BLE001
            _die("all_gather", e)

    def all_gather_last(self, t):
        try:
            return super().all_gather_last(t)
        except Exception as e:  # noqa: BLE001
            _die("all_gather", e)


@dataclass
class Plan:
    """What every rank adds to its engine before the next round."""
    batches: list[tuple]   # (PromptBatch on the CPU, max_new, seeds, budgets, exclusive)
    close: bool = False
    failed: bool = False   # rank 0's last round raised: a follower whose own did not (or did alone) is out of step


def rank_memory(path: str, ranks: int, dtype: torch.dtype) -> RankMemory:
    """The memory plan of one rank, from the checkpoint's config alone (the model built on the meta device and cut
    as rank 0 cuts it: the ranks hold the same shares)."""
    from glmv.auto import model_class
    from glmv.config import Glm4vConfig
    from glmv.weights import build_on_meta

    config = Glm4vConfig.from_pretrained(path)
    model = build_on_meta(model_class(config), config)
    parallel.shard(model, parallel.Group(0, ranks))
    # the state dict: parameters and the buffers a checkpoint fills (the MoE router's correction bias)
    weights = sum(t.numel() for t in model.state_dict().values()) * dtype.itemsize
    return RankMemory(ranks, weights, kv_per_position(config, ranks, dtype.itemsize))


def moved(batch: PromptBatch, device) -> PromptBatch:
    """The batch with its tensors on `device` (a plan travels pickled, on the CPU)."""
    prompts = [replace(p, ids=p.ids.to(device), types=p.types.to(device), positions=p.positions.to(device))
               for p in batch.prompts]
    return PromptBatch(prompts, [replace(m, pixels=m.pixels.to(device)) for m in batch.media], batch.groups)


class Ranks:
    """Rank 0's side: the follower processes, the default process group (the model's) and the control group."""

    def __init__(self, cfg, device: str):
        self.world = cfg.model.tensor_parallel
        backend = "nccl" if device == "cuda" else "gloo"
        port, addr = _free_port(), "127.0.0.1"   # followers are on this node
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self.procs = []
        for rank in range(1, self.world):
            env["GLMV_TP_RANK"] = str(rank)
            proc = subprocess.Popen([sys.executable, "-m", "pipeline.tp", str(rank), str(self.world), addr,
                                     str(port), backend, str(os.getpid())], stdin=subprocess.PIPE, env=env)
            proc.stdin.write(pickle.dumps(cfg))
            proc.stdin.close()
            self.procs.append(proc)
        log.info("tensor parallel: rank 0 of %d (%s); followers pid %s", self.world, backend,
                 [p.pid for p in self.procs])
        self.closing = False
        threading.Thread(target=self._watch, daemon=True, name="tp-followers-watch").start()
        self.control = _init(0, self.world, addr, port, backend)
        self.group = Lockstep(0, self.world)

    def smallest(self, free: int | None) -> int | None:
        return smallest(self.control, free)

    def _watch(self) -> None:
        """A follower that exits ends rank 0 at once: NCCL would only notice at COLLECTIVE_TIMEOUT, and one that
        dies while starting would leave rank 0 waiting in init_process_group as long."""
        while not self.closing:
            for rank, proc in enumerate(self.procs, 1):
                if proc.poll() not in (None, LOAD_FAILED) and not self.closing:
                    _die(f"follower rank {rank} (pid {proc.pid})", RuntimeError(f"exit code {proc.returncode}"))
            time.sleep(WATCH_S)

    def close(self) -> None:
        """End the followers (rank 0 failed to start: they would wait for it until the collective timeout)."""
        self.closing = True
        for proc in self.procs:
            proc.kill()
            proc.wait()

    def server(self, engine, max_new: int) -> "LockstepServer":
        """Rank 0's engine thread; the followers build the same engine from its config."""
        _send(self.control, (engine.c, max_new))
        return LockstepServer(engine, self.control)


class LockstepServer(EngineServer):
    """EngineServer whose submissions join at a round boundary that rank 0 announces to the followers."""

    def __init__(self, engine, control):
        self.control = control
        self.pending: list[tuple] = []
        self.failed = False   # the last round raised
        super().__init__(engine, name="glmv-engine-rank0")

    def submit(self, batch, max_new, seeds, budgets=None, **ticket):
        """As EngineServer.submit; returns once the batch is in the engine (at most one round's wait)."""
        done: Future = Future()
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self.pending.append((batch, max_new, seeds, budgets, ticket, done))
            self._wake.notify()
        return done.result()

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    if not self._closed and not self.pending and not self.engine.busy():
                        self._wake.wait(HEARTBEAT_S)
                    closed, taken, self.pending = self._closed, self.pending, []
                if taken and self.started is None:
                    self.started = time.perf_counter()
                _send(self.control, Plan([(moved(b, "cpu"), m, s, g, t.get("exclusive", False))
                                          for b, m, s, g, t, _ in taken], closed, self.failed))
                for batch, max_new, seeds, budgets, ticket, done in taken:
                    try:
                        done.set_result(self.engine.add(batch, max_new, seeds, budgets, **ticket))
                    except Exception as e:  # noqa: BLE001 - the caller's error (the followers' add raised it too)
                        done.set_exception(e)
                if closed:
                    return
                self.failed = _round(self.engine)


def follow(engine, control) -> None:
    """A follower's life: each plan from rank 0 into its engine, then one round, until rank 0 closes."""
    failed = False
    with torch.inference_mode():
        while True:
            plan = _receive(control)
            if plan.failed != failed:   # e.g. out of memory on one GPU: the engines no longer hold the same rows
                where = "rank 0" if plan.failed else "this rank"
                _die("staying in step", RuntimeError(f"the last round failed on {where} only"))
            for batch, max_new, seeds, budgets, exclusive in plan.batches:
                try:
                    engine.add(moved(batch, engine.device), max_new, seeds, budgets, exclusive=exclusive)
                except Exception:  # noqa: BLE001 - rank 0's add raised the same and its caller has the error
                    pass
            if plan.close:
                return
            failed = _round(engine)


def smallest(control, free: int | None) -> int | None:
    """The least free device memory over the ranks (None on CPUs): the KV pool must be the same on all."""
    t = torch.tensor([-1 if free is None else free], dtype=torch.int64)
    _collective("agreeing on the KV pool", lambda: dist.all_reduce(t, dist.ReduceOp.MIN, group=control))
    return None if t.item() < 0 else int(t.item())


def _round(engine) -> bool:
    """One round when the engine has rows; whether it raised."""
    if not engine.busy():
        return False
    try:
        engine.round()
    except Exception as e:  # noqa: BLE001 - the failed tickets carry it (every rank failed the same rows)
        log.warning("engine round failed (%s: %s); its tickets fail, the queue goes on", type(e).__name__, e)
        return True
    return False


def _send(control, obj) -> None:
    _collective("sending the plan", lambda: dist.broadcast_object_list([obj], group_src=0, group=control))


def _receive(control):
    box = [None]
    _collective("receiving the plan", lambda: dist.broadcast_object_list(box, group_src=0, group=control))
    return box[0]


def _collective(what: str, call) -> None:
    try:
        call()
    except Exception as e:  # noqa: BLE001
        _die(what, e)


def _init(rank: int, world: int, addr: str, port: int, backend: str):
    """The default process group (the model's collectives) and a gloo control group (plans travel on the CPU)."""
    dist.init_process_group(backend, init_method=f"tcp://{addr}:{port}", rank=rank, world_size=world,
                            timeout=COLLECTIVE_TIMEOUT)
    return dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if backend != "gloo" else dist.group.WORLD


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _watch_parent(pid: int) -> None:
    """End this follower when rank 0's process is gone (while it loads, before any collective would notice)."""
    def watch():
        while os.getppid() == pid:
            time.sleep(1.0)
        os._exit(EXIT_CODE)

    threading.Thread(target=watch, daemon=True, name="tp-parent-watch").start()


def main(argv: list[str]) -> None:
    """A follower: `python -m pipeline.tp RANK WORLD ADDR PORT BACKEND PARENT_PID`, the run's Config pickled on
    stdin."""
    from glmv.auto import AutoModelForImageTextToText
    from glmv.engine import Engine
    from glmv.errors import GlmvError
    from pipeline.errors import PipelineError
    from pipeline.predictor import free_device_bytes, resolve_device

    rank, world, addr, port, backend, parent = argv
    rank, world = int(rank), int(world)
    _watch_parent(int(parent))
    cfg = pickle.loads(sys.stdin.buffer.read())
    # rank 0 logs the load's progress; a follower's own lines would only repeat it (warnings and errors still show)
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s tp rank {rank} %(levelname)s %(message)s")
    device, dtype = resolve_device(cfg)
    if device == "cuda":
        torch.cuda.set_device(rank)
        device = f"cuda:{rank}"
    else:
        torch.set_num_threads(max(1, int(cfg.actors.num_cpus)))
    control = _init(rank, world, addr, int(port), backend)
    try:
        model = AutoModelForImageTextToText.from_pretrained(cfg.model.path, dtype=dtype, device=device,
                                                            tensor_parallel=Lockstep(rank, world))
    except (GlmvError, PipelineError) as e:   # rank 0 loads the same files: its error reaches the driver
        log.error("could not load the model: %s", e)
        logging.shutdown()
        os._exit(LOAD_FAILED)
    model.eval()
    smallest(control, free_device_bytes(model.device))
    config, max_new = _receive(control)
    follow(Engine(model, dataclasses.replace(config), max_new=max_new), control)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
