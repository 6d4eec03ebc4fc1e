"""The run: Ray Data graph from the listing to the model actors, the driver-side writer, the summary.

    listing (read task, streams blocks, drops (item, task) pairs already done)
      -> decode + resize on CPU tasks (compact uint8 frames, error rows for bad media)
      -> model actors (map_batches with an actor class: load once, sort a window by prompt length, static batches)
      -> driver: whole zstd Parquet files under the output URI
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass, field

import ray
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipeline import listing, output, preflight, storage
from pipeline.config import Config
from pipeline.decode import decode_batch
from pipeline.lease import Lease
from pipeline.predictor import Predictor
from pipeline.storage import StorageOptions

log = logging.getLogger("pipeline")


@ray.remote(num_cpus=0)
class Tally:
    """Counters that workers report to the driver (items skipped as already done)."""

    def __init__(self):
        self.counts: dict[str, int] = {}

    def add(self, key: str, n: int) -> None:
        self.counts[key] = self.counts.get(key, 0) + n

    def get(self) -> dict[str, int]:
        return dict(self.counts)


class PendingItems(Datasource):
    """One read task that streams the listing (or manifest) in blocks, minus the done-set."""

    def __init__(self, src: listing.Source, done_ref, tally):
        super().__init__()
        self.src, self.done_ref, self.tally = src, done_ref, tally

    def get_name(self) -> str:
        return "ListMedia"

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        src, done_ref, tally = self.src, self.done_ref, self.tally

        def read():
            done = ray.get(done_ref)
            yield from listing.pending_blocks(src, done, tally)

        meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
        return [ReadTask(read, meta, schema=listing.ITEM_SCHEMA)]


def init_ray(cfg: Config) -> None:
    """Connect to the cluster the user means; start a local Ray only when there is none.

    RAY_ADDRESS (set by `ray job submit` for its entry point) always wins. Otherwise `ray.address` is a cluster
    address, "" (a Ray already running on this machine, else a new local one) or "local" (always a new one)."""
    if ray.is_initialized():
        return
    local = {"num_cpus": cfg.ray.num_cpus or None, "include_dashboard": False}
    address = cfg.ray.address
    if os.environ.get("RAY_ADDRESS"):
        ray.init()
    elif address == "local":
        ray.init(**local)
    elif address:
        ray.init(address=address)
    else:
        try:
            ray.init(address="auto")
        except ConnectionError:
            ray.init(**local)


def build_dataset(cfg: Config, done_ref, tally) -> ray.data.Dataset:
    items_per_call = max(1, cfg.run.batch_size * cfg.batching.sort_window // max(1, len(cfg.run.tasks)))
    src = listing.Source.from_config(cfg)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = True
    ds = ray.data.read_datasource(PendingItems(src, done_ref, tally), override_num_blocks=1)
    # Ray Data merges the listing's small blocks into big ones; cut them back (streaming) to one model-actor call
    # each. Decode tasks then run in parallel, an actor task returns its rows after one sort window rather than
    # after thousands of items, and a killed run loses at most a few windows of work.
    ds = ds.repartition(target_num_rows_per_block=items_per_call)
    # Decoding runs on CPU tasks of its own, never inside the model actor. Ray Data fuses a task map into the next
    # actor map when their remote args match (they do on a CPU-only machine); `max_calls` makes them differ, and
    # recycling decode workers now and then also bounds what native decoders may leak over millions of files.
    ds = ds.map_batches(decode_batch, fn_kwargs={"cfg": cfg}, batch_size=cfg.batching.decode_batch_size,
                        batch_format="pyarrow", num_cpus=cfg.actors.decode_num_cpus, max_calls=1000)
    ds = ds.map_batches(Predictor, fn_constructor_kwargs={"cfg": cfg}, batch_size=items_per_call,
                        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=cfg.actors.count),
                        num_gpus=cfg.actors.num_gpus, num_cpus=cfg.actors.num_cpus)
    return ds


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
    sample: list = field(default_factory=list)

    def lines(self, output_uri: str) -> list[str]:
        s = max(self.seconds, 1e-9)
        return [f"done: {self.done} (item, task) rows ({self.items} items) in {self.seconds:.1f}s "
                f"(first result after {self.first_result_s:.1f}s)",
                f"skipped as already done: {self.skipped}",
                f"errors: {self.errors}",
                f"items/s: {self.items / s:.3f}",
                f"generated tokens/s: {self.generated_tokens / s:.1f}",
                f"output: {output_uri} ({self.files} new file(s)); read it with pandas.read_parquet({output_uri!r})"]


def run(cfg: Config, out=sys.stdout) -> Summary:
    opts = StorageOptions.from_config(cfg.storage)
    if cfg.input.manifest:
        listing.check_manifest(cfg.input.manifest, opts)
    start = time.monotonic()
    writer = output.ResultWriter(cfg.output.uri, opts, cfg.output.rows_per_file, cfg.output.flush_seconds)
    # before touching the output's state
    lease = Lease(cfg.output.uri, opts, writer.run_tag, takeover=cfg.output.takeover)
    try:
        return _run(cfg, opts, writer, start, out)
    finally:
        lease.release()


def _run(cfg: Config, opts: StorageOptions, writer: output.ResultWriter, start: float, out) -> Summary:
    _clear_staging(writer)
    if cfg.run.retry_errors:
        reopened = output.reopen_errors(cfg.output.uri, opts, writer.staging)
        print(f"output {cfg.output.uri}: {reopened} error row(s) reopened to run again", file=out, flush=True)
    done = output.load_done(cfg.output.uri, opts)
    print(f"output {cfg.output.uri}: {len(done)} (item, task) rows already done", file=out, flush=True)

    init_ray(cfg)
    for warning in preflight.check_resources(ray.cluster_resources(), cfg.actors):   # raises for a plan that hangs
        log.warning("%s", warning)
    tally = Tally.remote()
    summary = Summary()
    ds = build_dataset(cfg, ray.put(done), tally)
    # No prefetching: with it, a window's rows reach the writer only once the next window is done too.
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        if not summary.first_result_s:
            summary.first_result_s = time.monotonic() - start
        rows = batch.to_pylist()
        writer.add(rows)
        summary.done += len(rows)
        summary.errors += sum(r["error"] is not None for r in rows)
        summary.generated_tokens += sum(r["num_output_tokens"] or 0 for r in rows)
        # all of an item's pending tasks run in one actor call, whose rows arrive together
        summary.items += len({r["id"] for r in rows})
        if len(summary.sample) < 3:
            summary.sample.extend(rows[: 3 - len(summary.sample)])
    writer.flush()
    summary.skipped = ray.get(tally.get.remote()).get("skipped", 0)
    summary.seconds = time.monotonic() - start
    summary.files = writer.files
    writer.write_run_record({"config": cfg.to_dict(), "summary": {k: v for k, v in summary.__dict__.items()
                                                                  if k != "sample"}})
    for line in summary.lines(cfg.output.uri):
        print(line, file=out, flush=True)
    for row in summary.sample:
        text = row["error"] or (row["answer"] or row["text"])
        print(f"  {row['uri']} [{row['task']}] {text[:100]!r}", file=out, flush=True)
    return summary


def _clear_staging(writer: output.ResultWriter) -> None:
    """Staging files left by a killed run are incomplete by definition; they are never read, only removed."""
    staging = writer.staging
    try:
        if storage.is_local(writer.fs):
            shutil.rmtree(staging, ignore_errors=True)
        elif writer.fs.exists(staging):
            writer.fs.rm(staging, recursive=True)
    except OSError as e:
        log.warning("could not clear %s: %s", staging, e)

