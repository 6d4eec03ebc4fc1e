"""The run: Ray Data graph from the input's read units to the model actors, the driver-side writer, the summary.

    read units (one read task per group: list / read each shard, drop finished work, report shard counts)
      -> decode + resize on CPU tasks (objects fetched concurrently; compact uint8 frames; error items)
      -> model actors (map_batches with an actor class: load once, keep one engine whose slots every call feeds)
      -> driver: whole zstd Parquet files under the output URI; completion records of finished shards
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import ray

from pipeline import (changes, engine_stats, listing, memory_plan, output, poison, preflight, progress, readers,
                      storage)
from pipeline.breaker import Breaker
from pipeline.cluster import GracefulStop, cluster_fault, describe, on_driver_node
from pipeline.config import AUTO, Config, ConfigError, decode_slots, read_ahead
from pipeline.decode import DecodeSettings, decode_batch
from pipeline.errors import HideOwnErrors, Interrupted, RunStopped
from pipeline.predictor import CALLS_IN_FLIGHT, Predictor
from pipeline.preflight import read_spec
from pipeline.report import write_report
from pipeline.sources import PendingItems, RepeatCounter, TaskPlan, UnitWork
from pipeline.state import StateDir
from pipeline.store import OutputSettings, OutputStore
from pipeline.storage import StorageOptions

log = logging.getLogger("pipeline")
# where Ray Data logs a failed task's traceback before raising its error (e.g. an outage met by a read task)
for _name in ("ray.data._internal.execution.streaming_executor_state", "ray.data.exceptions"):
    logging.getLogger(_name).addFilter(HideOwnErrors())

BLOCK_BYTES = 1 << 20      # Ray Data's block size cap: a listing's tiny rows must not merge into huge blocks
CUT_TASKS = 4              # repartition tasks at once (they hold no CPU: bounded here)
READ_TASKS = 4             # read tasks at once (they hold no CPU either)
TRACKER_POLL_S = 1.0
STALL_S = 120.0           # no result for this long: say what the cluster has free


def init_ray(cfg: Config) -> None:
    """Connect to the cluster the user means; start a local Ray only when there is none.

    RAY_ADDRESS (set by `ray job submit` for its entry point) always wins. Otherwise `ray.address` is a cluster
    address, "" (a Ray already running on this machine, else a new local one) or "local" (always a new one)."""
    if ray.is_initialized():
        return
    cpus = cfg.ray.num_cpus or os.cpu_count() or 1
    # Ray keeps as many idle worker processes as the node has CPUs and ends the others after a second idle. The read
    # and cut tasks hold no CPU, so a small node runs more workers than CPUs all the time: each cut task's worker was
    # ended as it finished and a new one started (~1.5 s of CPU each) for the next, a third of two cores' CPU at
    # 1e6 items (measured by bench/bench_scale.py part 3). Room for them all keeps them.
    local = {"num_cpus": cfg.ray.num_cpus or None, "include_dashboard": False,
             "_system_config": {"num_workers_soft_limit": cpus + READ_TASKS + CUT_TASKS}}
    address = cfg.ray.address
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    elif address == "local":
        _start_local_ray(local)
    elif address:
        _probe_cluster(address)
        try:
            ray.init(address=address)
        except ValueError as e:   # Ray's "Invalid address format", raised before it connects to anything
            raise ConfigError(f"ray.address: {address!r} is not a cluster address ({e})") from None
    else:
        try:
            ray.init(address="auto")
        except ConnectionError:
            _start_local_ray(local)


def _start_local_ray(options: dict) -> None:
    ray.init(**options)
    # registered after Ray's own atexit shutdown, so run before it (last in, first out); once per process
    atexit.unregister(stop_local_ray)
    atexit.register(stop_local_ray)


def stop_local_ray() -> None:
    """Shut down the local Ray this process started, its autoscaler monitor first. Ray stops its daemons one by one,
    the GCS before the monitor; the monitor's SIGTERM handler then reports its own end to that stopped GCS and is
    SIGKILLed after a 1 s wait: a second of every job's end. A local Ray's monitor has nothing to save (no node to
    scale), so it is killed at once; the rest stop as Ray stops them. Ray's internals, looked up with getattr: a Ray
    without them just stops as it always does."""
    node = getattr(ray._private.worker, "_global_node", None)
    for info in getattr(node, "all_processes", {}).get("monitor", []):
        if info.process.poll() is None:
            info.process.kill()
            info.process.wait(timeout=5)
    ray.shutdown()


def _probe_cluster(address: str, timeout_s: float = 10.0) -> None:
    """A `host:port` where nothing answers is a config error at once: ray.init would retry it for minutes."""
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit() or "/" in host:
        return   # not host:port (e.g. a dashboard's http:// URL): Ray reports what it makes of it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as e:
        reason = "no answer" if isinstance(e, TimeoutError) else (e.strerror or str(e))
        raise ConfigError(f"ray.address: no Ray cluster answers at {address} ({reason}); start it, or set "
                          f"ray.address = \"\" to start a local one") from None


def input_fingerprint(cfg: Config, spec: readers.ReadSpec) -> str:
    """What the output's completion records are trusted for: the input settings and, for a listed prefix, its
    listing snapshot (listed afresh after `_state/listing/` was deleted, its shards hold other keys)."""
    fingerprint = cfg.input.fingerprint()
    listed = cfg.input.format == "files" and not cfg.input.manifest
    snapshot = listing.ListingSnapshot(spec.state, spec.input_uri).identity() if listed else ""
    return f"{fingerprint}-{snapshot}" if snapshot else fingerprint


def task_plan(cfg: Config) -> TaskPlan:
    return TaskPlan(tuple(cfg.run.tasks), cfg.input.manifest_prompt_task if cfg.input.manifest else "")


def kept_columns(cfg: Config, spec: readers.ReadSpec, units: list[readers.Unit]) -> pa.Schema | None:
    """Columns kept from the input, typed so that every input file's fit (readers.kept_schema): decided here, before
    the first result file is written, as result files share one schema."""
    if not cfg.input.keep_columns:
        return None
    return readers.kept_schema(units, list(cfg.input.keep_columns), spec.opts)


def build_dataset(cfg: Config, source: PendingItems, predictor=Predictor, decode=decode_batch,
                  run_tag: str = "") -> ray.data.Dataset:
    """`predictor` / `decode`: the stages (benchmarks swap in zero-cost stand-ins to time the machinery)."""
    slots = decode_slots(cfg.run.batch_size, cfg.actors.on_gpu)
    items_per_call = max(1, slots * cfg.batching.sort_window // max(1, len(cfg.run.tasks)))
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ctx.target_max_block_size = BLOCK_BYTES
    # A stage's own error (a model actor that could not load its checkpoint) must reach the driver as itself, to be
    # said in one line with its exit code: Ray Data's wrapper (UserCodeException) loses it on its way to the driver.
    ctx.raise_original_map_exception = True
    # Read tasks mostly wait on storage: they hold no CPU, so a long listing never keeps decoding from starting.
    # One output block stream per read task: without override_num_blocks, Ray Data cuts every block into ~200
    # slivers to reach its default read parallelism, and each sliver then costs a task downstream.
    tasks = source.num_tasks()
    ds = ray.data.read_datasource(source, num_cpus=0, override_num_blocks=tasks,
                                  concurrency=max(1, min(tasks, READ_TASKS)))
    # Cut the read blocks (~1 MB, thousands of items) into blocks of a few model-actor calls each: decode tasks run
    # in parallel and stream their output out as they go, so an actor's first window waits for one call's worth of
    # items, not a block's (a run of fewer than block_items items per decode CPU decodes on fewer CPUs, seconds
    # ahead of its model actors all the same). Ray Data spends ~60 ms of CPU per block across the driver (its
    # scheduling loop) and the workers, whatever its rows (measured): one call's worth (512 items at batch_size 64)
    # capped the zero-cost machinery of two cores at ~3,000 items/s, batching.block_items (2,048) at ~10,000. The cut
    # holds no CPU (on a small machine it would queue behind the decode tasks for the one CPU the model actor leaves)
    # and at most CUT_TASKS run at once: unbounded, a 1e6-row manifest's 200 read blocks started 150 worker
    # processes and kept the model actor from being placed for minutes.
    block_rows = items_per_call * max(1, -(-cfg.batching.block_items // items_per_call))   # whole calls
    ds = ds.repartition(target_num_rows_per_block=block_rows)
    _bounded_without_cpu(ds, CUT_TASKS)
    # A decode task takes one block and decodes it decode_batch_size items at a time (what one batch's frames hold
    # in memory), its output streaming out as it goes.
    ds = ds.map_batches(_decode_in_batches, fn_kwargs={"decode": decode, "batch_rows": cfg.batching.decode_batch_size,
                                                       "settings": DecodeSettings.from_config(cfg, run_tag)},
                        batch_size=None, batch_format="pyarrow",
                        num_cpus=cfg.actors.decode_num_cpus, max_calls=1000, max_retries=poison.MAX_RETRIES)
    # Refill mode: a threaded actor with CALLS_IN_FLIGHT calls at once, all feeding the actor's one engine, so the
    # next window is queued while the current one decodes (pipeline.predictor); at most that many wait per actor.
    calls = CALLS_IN_FLIGHT if cfg.batching.mode == "refill" else 1
    pool = ray.data.ActorPoolStrategy(size=cfg.actors.count, max_concurrent_calls_per_actor=calls,
                                      max_tasks_in_flight_per_actor=calls, enable_true_multi_threading=calls > 1)
    ds = ds.map_batches(predictor, fn_constructor_kwargs={"cfg": cfg, "run_tag": run_tag}, batch_size=items_per_call,
                        batch_format="pyarrow", compute=pool,
                        # per rank in the config; the actor holds its followers' share too (pipeline.tp)
                        num_gpus=cfg.actors.num_gpus * cfg.model.tensor_parallel,
                        num_cpus=cfg.actors.num_cpus * cfg.model.tensor_parallel,
                        max_restarts=poison.MAX_RETRIES, max_task_retries=poison.MAX_RETRIES)
    return ds


def _decode_in_batches(block: pa.Table, decode, batch_rows: int, settings) -> Iterator[pa.Table]:
    """A block decoded `batch_rows` items at a time, each batch's rows yielded as they are ready. Sliced here rather
    than by Ray Data's batch_size, whose batching cost ~60 us of CPU per batch (a zero-cost decode's CPU per item went
    from 17.8 to 15.9 us, bench/bench_scale.py part 3)."""
    for start in range(0, block.num_rows, batch_rows):
        yield decode(block.slice(start, batch_rows), settings)


def _bounded_without_cpu(ds: ray.data.Dataset, tasks: int) -> None:
    """Let the dataset's last operator (the repartition: cutting blocks costs microseconds) hold no CPU slot, with at
    most `tasks` of its tasks at once. Ray Data's repartition has no public knob for either."""
    op = getattr(ds._logical_plan, "dag", None)
    if isinstance(getattr(op, "ray_remote_args", None), dict) and hasattr(op, "compute"):
        op.ray_remote_args["num_cpus"] = 0
        object.__setattr__(op, "compute", ray.data.TaskPoolStrategy(size=tasks))


@dataclass
class Summary:
    done: int = 0          # (item, task) rows written by this run, errors included
    skipped: int = 0       # (item, task) pairs found done at start
    errors: int = 0
    items: int = 0         # distinct items written by this run
    generated_tokens: int = 0
    seconds: float = 0.0
    first_result_s: float = 0.0   # start-up: listing, Ray Data, actors loading the model, the first window
    files: int = 0
    restarts: int = 0      # datasets restarted after a cluster fault (a lost node, a model actor gone)
    redone: int = 0        # pairs in flight at those faults, read and run again
    admitted: int = 0      # items the model actors took (a window Ray retried after losing it counts twice)
    repeated_items: int = 0      # items read again from another manifest file (so written again): see Repeats
    repeats_exact: bool = True   # False: more items than Repeats keeps; repeated_items is then a lower bound
    compacted: int = 0           # small result files merged ...
    compacted_into: int = 0      # ... into this many
    engine: dict = field(default_factory=dict)          # the model engines' figures (pipeline.engine_stats)
    engine_actors: dict = field(default_factory=dict)   # each actor's latest engine counters
    sample: list = field(default_factory=list)

    def count(self, batch: pa.Table) -> None:
        self.done += batch.num_rows
        self.errors += batch.num_rows - batch["error"].null_count
        self.generated_tokens += pc.sum(batch["num_output_tokens"]).as_py() or 0
        # all of an item's pending tasks run in one actor call, whose rows arrive together
        self.items += pc.count_distinct(batch["id"]).as_py()
        if "_engine" in batch.column_names:
            engine_stats.latest(self.engine_actors, batch["_engine"].drop_null().to_pylist())
            self.engine = engine_stats.figures(self.engine_actors)
        if len(self.sample) < 3:
            self.sample.extend(batch.slice(0, 3 - len(self.sample)).select(
                ["uri", "task", "error", "answer", "text"]).to_pylist())

    def lines(self, output_uri: str) -> list[str]:
        s = max(self.seconds, 1e-9)
        lines = [f"done: {self.done} (item, task) rows ({self.items} items) in {self.seconds:.1f}s "
                f"(first result after {self.first_result_s:.1f}s)",
                f"skipped as already done: {self.skipped}",
                f"errors: {self.errors}",
                f"items/s: {self.items / s:.3f}",
                f"generated tokens/s: {self.generated_tokens / s:.1f}",
                *([engine_stats.line(self.engine)] if self.engine else []),
                f"output: {output_uri} ({self.files} new file(s)); read it with pandas.read_parquet({output_uri!r})"]
        if self.repeated_items or not self.repeats_exact:
            at_least = "" if self.repeats_exact else "at least "
            lines.insert(3, f"duplicates: {at_least}{self.repeated_items} item(s) named in more than one manifest "
                            f"file, read once per file (their rows repeat in the output: same id and task)")
        if self.compacted:
            lines.append(f"compacted: {self.compacted} result files of finished shards into {self.compacted_into}")
        if self.admitted > self.items:   # windows lost with a worker or node, and run again (by Ray or a restart)
            lines.append(f"redone: {self.admitted - self.items} items run again by the model after their window was "
                         f"lost with a worker or node (written once)")
        if self.restarts:
            lines.append(f"restarts after cluster faults: {self.restarts} ({self.redone} (item, task) pairs redone)")
        return lines


def run(cfg: Config, out=sys.stdout, predictor=Predictor, decode=decode_batch,
        units: list[readers.Unit] | None = None) -> Summary:
    """`units`: the input's manifests or shard files as preflight found them (a glob over thousands of S3 shards is
    listed once per start, not twice); None finds them here."""
    opts = StorageOptions.from_config(cfg.storage)
    start = time.monotonic()
    store = OutputStore(OutputSettings.from_config(cfg), opts)
    try:
        return _run(cfg, opts, store, start, out, (predictor, decode), units)
    finally:
        store.close()


def _say(out, line: str) -> None:
    print(line, file=out, flush=True)


def _run(cfg: Config, opts: StorageOptions, store: OutputStore, start: float, out, stages,
         units: list[readers.Unit] | None) -> Summary:
    spec = dataclasses.replace(read_spec(cfg, store.state), started_at=time.time(), run_tag=store.run_tag,
                               relist_before=ended_at(store.last_run_record()) if cfg.input.relist else 0.0)
    plan = task_plan(cfg)
    units = readers.find_units(spec) if units is None else units
    resume = store.open(input_fingerprint(cfg, spec), plan.all(), cfg.run.retry_errors, lambda s: _say(out, s))
    _note_changed_settings(cfg, store.state, out)

    spec = dataclasses.replace(spec, keep_schema=kept_columns(cfg, spec, units))
    store.set_schema(output.output_schema(cfg.input.format in ("webdataset", "parquet"), spec.keep_schema))
    work, skipped, notes = _open_work(units, resume, plan, spec, keep_finished=bool(cfg.input.max_items))
    for line in notes:
        _say(out, line)
    finished = sum(progress.covers(resume.records.get(u.id), plan.all()) for u in units)
    again = finished - (len(units) - len(work)) if not cfg.input.max_items else 0
    _say(out, f"output {cfg.output.uri}: {finished} of {len(units)} input unit(s) finished" +
              (f" ({again} read again for what was added since)" if again else "") +
              f", {len(resume.done_keys)} (item, task) rows of unfinished shards" +
              (" (whole output scanned: no completion records yet)" if store.scanned_existing else ""))

    if not work:   # found before Ray starts: a rerun of a finished run costs a listing, no model actor
        _say(out, f"nothing to do: {skipped} (item, task) rows done")
    summary = Summary(skipped=skipped)
    breaker = Breaker(cfg.run.stop_failure_rate, cfg.run.stop_failure_window)
    if work:
        cfg = _start_ray(cfg, out)
        store.use_ray()
        # only manifests can name one item in two units (a listing's partitions and shard files' items are disjoint)
        repeats = (RepeatCounter.options(scheduling_strategy=on_driver_node()).remote()
                   if cfg.input.manifest and len(work) > 1 else None)
        parts = Parts(cfg, spec, plan, units, store, breaker, summary, start, out, stages, repeats)
        resume = _process(parts, work, resume)
        if repeats is not None:
            summary.repeated_items, summary.repeats_exact = ray.get(repeats.result.remote())
    # every shard of the input has its record: the records are trusted for this input from now on
    store.commit(complete=resume.scanned and not store.shards.open and not breaker.total and not cfg.input.max_items)
    summary.compacted, summary.compacted_into = store.compacted
    _finish(cfg, opts, store, summary, start, out)
    breaker.check_finished()
    return summary


@dataclass
class Parts:
    """What every dataset attempt of a run shares."""
    cfg: Config
    spec: readers.ReadSpec
    plan: TaskPlan
    units: list
    store: OutputStore
    breaker: Breaker
    summary: "Summary"
    start: float
    out: object
    stages: tuple
    repeats: object = None   # a RepeatCounter for inputs of several manifests, kept across attempts


def _process(parts: Parts, work: list[UnitWork], resume: progress.Resume) -> progress.Resume:
    """Stream the pending work through a dataset; when the cluster loses what Ray Data cannot recover by itself
    (pipeline.cluster), write what finished and start a new dataset from the completion records, in this process,
    up to actors.max_restarts times. Returns the last attempt's resume point."""
    cfg, summary, restarts = parts.cfg, parts.summary, 0
    # pairs found done by the attempts so far: after a restart the read tasks also find this run's own rows done,
    # and those are not "skipped"
    counted = 0
    with GracefulStop(cfg.run.drain_s) as stop:
        while True:
            tracker = _new_tracker(parts.store.run_tag)
            stop.watch(tracker)
            # in pairs: an item is as many result rows as it has tasks to do
            window = (read_ahead(cfg.batching.read_ahead_items, cfg.actors.count) * len(parts.plan.all()),
                      cfg.batching.read_ahead_mb << 20)
            source = PendingItems(work, parts.spec, parts.plan, ray.put(resume.done_keys), tracker,
                                  cfg.input.max_items, parts.repeats, window)
            drain = Drain(parts.store, parts.breaker, summary, tracker, parts.start, stop)
            written_before = summary.done
            try:
                _stream(cfg, source, drain, parts.stages)
                break
            except Exception as e:  # noqa: BLE001 - only cluster faults are retried; the rest re-raised as they are
                fault = cluster_fault(e)
                if fault is None:
                    raise
                parts.store.flush_what_is_done()
                lost = drain.lost_pairs()
                restarts += 1
                summary.restarts, summary.redone = restarts, summary.redone + lost
                if restarts > cfg.actors.max_restarts:
                    raise RunStopped(f"the cluster failed {restarts} times (last: {describe(fault)}), more than "
                                     f"actors.max_restarts = {cfg.actors.max_restarts}; what finished is written: "
                                     f"rerun the same command to go on") from None
                _say(parts.out, f"cluster fault: {describe(fault)}; {lost} (item, task) pairs in flight go back to "
                                f"the queue; restarting the dataset from the completion records (restart {restarts}"
                                f" of at most {cfg.actors.max_restarts})")
            finally:
                parts.store.flush_what_is_done()
                summary.admitted += _admitted(tracker)
                _kill_quietly(tracker)
                counted = max(counted, summary.skipped - written_before)
            cfg = parts.cfg = _replan_actors(cfg, parts.out)
            resume = parts.store.reopen()
            work, summary.skipped, _ = _open_work(parts.units, resume, parts.plan, parts.spec,
                                                  keep_finished=bool(cfg.input.max_items))
            if not work or stop.requested:   # nothing left, or a SIGTERM came while the cluster failed
                counted = max(counted, summary.skipped - summary.done)
                break
    summary.skipped = counted
    if stop.requested:
        raise Interrupted(f"SIGTERM received; in-flight work drained for {time.monotonic() - stop.requested_at:.0f}s "
                          f"(run.drain_s = {cfg.run.drain_s:g}): {summary.done} (item, task) rows written, the rest "
                          f"pending; rerun the same command to go on")
    return resume


def _new_tracker(run_tag: str):
    # on the driver's node: a lost worker node must not take the run's bookkeeping with it
    return progress.TrackerActor.options(name=progress.tracker_name(run_tag),
                                    scheduling_strategy=on_driver_node()).remote()


def _admitted(tracker) -> int:
    try:
        return ray.get(tracker.admitted_items.remote(), timeout=10)
    except Exception as e:  # noqa: BLE001 - the count is for the user: the records stay exact without it
        log.debug("tracker: %s", e)
        return 0


def _kill_quietly(actor) -> None:
    try:
        ray.kill(actor)
    except Exception as e:  # noqa: BLE001 - a tracker already gone is what we wanted
        log.debug("tracker: %s", e)


def _replan_actors(cfg: Config, out) -> Config:
    """After a lost node: as many model actors as the cluster now has room for (at least one), so a dataset does not
    wait forever for the GPUs of a node that is gone; the next restart plans again."""
    resources = ray.cluster_resources()
    fits = preflight.plan_actors(resources, dataclasses.replace(cfg.actors, count=AUTO), cfg.model.device,
                                 cfg.model.tensor_parallel).count
    count = max(1, min(cfg.actors.count, fits))
    if count != cfg.actors.count:
        _say(out, f"model actors: {count} (was {cfg.actors.count}) while the cluster has "
                  f"{resources.get('GPU', 0):g} GPU, {resources.get('CPU', 0):g} CPU")
    return dataclasses.replace(cfg, actors=dataclasses.replace(cfg.actors, count=count))


def _start_ray(cfg: Config, out) -> Config:
    """Ray up, and `cfg` with its "auto" actor settings sized to the cluster."""
    init_ray(cfg)
    resources = ray.cluster_resources()
    ranks = cfg.model.tensor_parallel
    actors = preflight.plan_actors(resources, cfg.actors, cfg.model.device, ranks)
    # raises for plans that would wait forever, unless the cluster grows on demand
    for warning in preflight.check_resources(resources, actors, strict=not cfg.ray.autoscaling, ranks=ranks):
        log.warning("%s", warning)
    gpus = f"{actors.num_gpus:g} GPU and " if actors.num_gpus else ""
    each = f"each of {ranks} ranks" if ranks > 1 else "each"
    _say(out, f"model actors: {actors.count}, {gpus}{actors.num_cpus:g} CPU {each} (cluster: "
              f"{resources.get('GPU', 0):g} GPU, {resources.get('CPU', 0):g} CPU)")
    cfg = dataclasses.replace(cfg, actors=actors)
    _say(out, _memory_plan(cfg))
    return cfg


def _memory_plan(cfg: Config) -> str:
    """The memory plan of one rank; refuses (ConfigError) weights that cannot fit a GPU this driver sees. A driver
    without one leaves that check to the model actor, before it loads anything (pipeline.predictor). One rank on
    CPUs: read from the checkpoint's headers, without importing torch in the driver (pipeline.memory_plan)."""
    from pipeline.predictor import KV_SHARE

    on_gpu = cfg.actors.on_gpu and cfg.model.device != "cpu"
    dtype = cfg.model.dtype if cfg.model.dtype != AUTO else ("bfloat16" if on_gpu else "float32")
    if cfg.model.tensor_parallel == 1 and not on_gpu:
        return memory_plan.one_rank_from_headers(cfg.model.path, dtype).describe(KV_SHARE, on_gpu)
    import torch

    from pipeline import tp

    memory = tp.rank_memory(cfg.model.path, cfg.model.tensor_parallel, getattr(torch, dtype))
    if on_gpu and torch.cuda.is_available():
        memory.check_fits(torch.cuda.get_device_properties(0).total_memory, "this node's GPU 0 (its whole memory)")
    return memory.describe(KV_SHARE, on_gpu)


@dataclass
class Drain:
    """Where result blocks go in the driver: past the circuit breaker, counted, into the output store; and the read
    tasks' shard reports handed to the store now and then."""
    store: OutputStore
    breaker: Breaker
    summary: "Summary"
    tracker: object
    start: float
    stop: GracefulStop | None = None
    polled: float = 0.0
    written: int = 0   # rows written by this attempt: what the read tasks' window counts as no longer ahead

    def take(self, batch: pa.Table) -> None:
        if not self.summary.first_result_s:
            self.summary.first_result_s = time.monotonic() - self.start
        self.store.check()   # taken over: stop before the breaker counts rows another run may be writing
        batch = self.breaker.admit(batch)
        self.summary.count(batch)
        self.written += batch.num_rows
        # every block, not every poll: read tasks waiting on a full window must see the last items land
        self.tracker.wrote.remote(self.written)
        if "_engine" in batch.column_names:   # counters for the summary, on some blocks only: never buffered
            batch = batch.drop_columns(["_engine"])
        self.store.write(batch)
        if time.monotonic() - self.polled > TRACKER_POLL_S:
            self.poll()

    def poll(self) -> None:
        reported, units, skipped = ray.get(self.tracker.drain.remote())
        self.store.shards_read(reported, units)
        self.summary.skipped += skipped
        self.polled = time.monotonic()
        if self.stop is None or not self.stop.requested:
            self.store.maintain()

    def lost_pairs(self) -> int:
        """After a failed attempt: the pairs its read tasks handed on that never landed (they are read again)."""
        try:
            self.poll()
        except Exception as e:  # noqa: BLE001 - the count is for the user; the records stay exact without it
            log.warning("could not ask the tracker for the last shard reports: %s", e)
        return self.store.pending_pairs()


def _stream(cfg: Config, source: PendingItems, drain: Drain, stages) -> None:
    """The Ray Data graph, drained into the writer as its result blocks arrive; after a SIGTERM, until what was in
    flight has come out or `run.drain_s` has passed."""
    ds = build_dataset(cfg, source, *stages, run_tag=drain.store.run_tag)
    watchdog = Watchdog(STALL_S)
    # No prefetching: with it, a window's rows reach the writer only once the next window is done too.
    batches = iter(ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0))
    stop = drain.stop or GracefulStop(0.0)   # not entered: no signal handlers, never requested
    try:
        for batch in stop.blocks(batches):
            watchdog.progress()
            drain.take(batch)
    finally:
        stop.disarm()
        batches.close()   # a stream left early shuts its executor down
        watchdog.stop()
    drain.store.flush()
    drain.poll()


class Watchdog:
    """Says so when no result has come for a while, with what the cluster has free: a run that waits on a
    resource nobody releases must not look like one that works."""

    def __init__(self, after_s: float):
        self.after_s, self.last = after_s, time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True, name="stall-watchdog")
        self._thread.start()

    def progress(self) -> None:
        self.last = time.monotonic()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _watch(self) -> None:
        while not self._stop.wait(min(30.0, self.after_s)):
            idle = time.monotonic() - self.last
            if idle >= self.after_s:
                free, total = ray.available_resources(), ray.cluster_resources()
                have = ", ".join(f"{free.get(k, 0):g} of {total[k]:g} {k}" for k in ("CPU", "GPU") if k in total)
                log.warning("no result for %.0fs: Ray has %s free; the model actors ask for actors.num_cpus / "
                            "actors.num_gpus each, decode tasks for actors.decode_num_cpus (Ray Data's progress "
                            "lines show which stage waits: 'pending' resources, 'backpressured')", idle, have)


def _finish(cfg: Config, opts: StorageOptions, store: OutputStore, summary: Summary, start: float, out) -> None:
    summary.seconds = time.monotonic() - start
    summary.files = store.writer.files
    store.write_run_record({"config": cfg.to_dict(), "result_settings": cfg.result_settings(),
                             "summary": {k: v for k, v in summary.__dict__.items() if k != "sample"},
                             "ended_at": time.time()})   # a later run lists the input again for new objects
    for line in summary.lines(cfg.output.uri):
        _say(out, line)
    for row in summary.sample:
        text = row["error"] or (row["answer"] or row["text"])
        _say(out, f"  {storage.redact(row['uri'])} [{row['task']}] {storage.redact(text)[:100]!r}")
    try:   # the results are written: a report that fails must not fail the run
        # the result files as the manifest has them where the run will seal the output: not listed again
        _say(out, f"report: {write_report(cfg.output.uri, opts, current_run=store.run_tag, listed=store.known())}")
    except Exception as e:  # noqa: BLE001
        log.warning("could not write the run report under %s: %s: %s", cfg.output.uri, type(e).__name__, e)


# run settings that decide what is done, not what the model writes
_NOT_RESULTS = {"run.retry_errors", "run.stop_failure_rate", "run.stop_failure_window"}


def _note_changed_settings(cfg: Config, state: StateDir, out) -> None:
    """A rerun with another model, prompt or generation setting skips the pairs already done, which keep the old
    settings' results: one line says so, rather than letting "skipped as already done" pass for the new ones."""
    records = [n for n in state.list("runs") if n.endswith(".json")]
    record = (state.read_json(f"runs/{records[-1]}") or {}) if records else {}
    _note_changed_columns(cfg, record.get("config", {}).get("input", {}).get("keep_columns"), out)
    last = record.get("result_settings")
    if last is None:   # a new output, or a record from before result settings were kept
        return
    now = json.loads(json.dumps(cfg.result_settings(), default=str))   # as the record stored them
    changed = []
    for section in sorted(set(last) | set(now)):
        old, new = last.get(section), now.get(section)
        if isinstance(old, dict) and isinstance(new, dict):
            changed += [f"{section}.{k}" for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
        elif old != new:
            changed.append(section)
    changed = [c for c in changed if c not in _NOT_RESULTS]
    if changed:
        _say(out, f"note: {', '.join(changed)} changed since the last run on this output: the (item, task) pairs it "
                  f"finished are skipped and keep their results (their run_config_hash differs); write to a new "
                  f"output.uri to run them with these settings")


def _note_changed_columns(cfg: Config, last: list[str] | None, out) -> None:
    """Result files with other kept columns than the earlier ones make a mixed-schema output, and readers that take
    the schema from one file (pandas.read_parquet, pyarrow.dataset) silently drop the new columns."""
    if last is None or sorted(last) == sorted(cfg.input.keep_columns):   # readers match columns by name
        return
    _say(out, f"note: input.keep_columns is {cfg.input.keep_columns} where the last run on this output kept {last}: "
              f"its files and this run's will have different columns, and readers that take the schema from one "
              f"file drop the others (pass pyarrow.dataset a schema, or write to a new output.uri)")


def _open_work(units: list[readers.Unit], resume: progress.Resume, plan: TaskPlan, spec: readers.ReadSpec,
               keep_finished: bool = False) -> tuple[list[UnitWork], int, list[str]]:
    """The units still to read, each with its shards' records and their extents; the pairs of finished units; and
    lines to say about input that changed since its records were made. A finished unit is read again where its input
    grew (pipeline.changes). keep_finished (input.max_items, which counts the first items of the input, done or not):
    finished units are read too, their shards skipped unread."""
    records: dict[str, dict[str, dict[str, int]]] = {}
    extents: dict[str, dict[str, dict]] = {}
    for name, counts in resume.records.items():
        if "#" in name:
            unit, number = name.rsplit("#", 1)
            records.setdefault(unit, {})[number] = counts
            if name in resume.extents:
                extents.setdefault(unit, {})[number] = resume.extents[name]
    finished = [u for u in units if progress.covers(resume.records.get(u.id), plan.all())]
    found = changes.finished_units(finished, resume.extents, spec, {u: set(r) for u, r in records.items()})
    notes = changes.Notes()
    work, again, skipped = [], [], 0
    for unit in units:
        shards = UnitWork(unit, records.get(unit.id, {}), extents.get(unit.id, {}))
        change = found.get(unit.id)
        if change is None:
            if changes.moved_under(unit, shards.extents):
                notes.moved.append(unit.uri)
            work.append(shards)
            continue
        notes.add(change)
        if change.read or (keep_finished and not change.refused):
            again.append(dataclasses.replace(shards, grown=change.grown))
        else:
            skipped += sum(resume.records[unit.id].get(t, 0) for t in plan.all())
    # finished units read again (listed again, grown) go last, where most of their rows are done: the others'
    # work starts first, then theirs known to hold some (the others list again first); max_items counts the input in
    # its order
    again.sort(key=lambda shards: not found[shards.unit.id].new)
    return (_in_input_order(units, work + again) if keep_finished else work + again), skipped, notes.lines()


def _in_input_order(units: list[readers.Unit], work: list[UnitWork]) -> list[UnitWork]:
    position = {unit.id: i for i, unit in enumerate(units)}
    return sorted(work, key=lambda w: position[w.unit.id])


def ended_at(record: dict) -> float:
    """When the run of this run record ended (wall clock): partitions listed before it are listed again. An earlier
    version's record says nothing of it, and its listings have no time: any time after none will do."""
    return record.get("ended_at", 1.0 if record else 0.0)
