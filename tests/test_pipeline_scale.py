"""The driver at scale: the read-ahead window (items read and not yet written) holds the read tasks, and the graph
bounds its tasks that hold no CPU and cuts blocks of a few model-actor calls."""

import threading
import time

import numpy as np
import pyarrow as pa
import pytest
import ray

from pipeline import config, progress, readers
from pipeline.run import CUT_TASKS, _decode_in_batches, build_dataset
from pipeline.sources import PendingItems, ReadAhead, TaskPlan, UnitWork, pending_items
from pipeline.state import StateDir
from pipeline.storage import StorageOptions

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)
PLAN = TaskPlan(("caption",), "")


class Direct:
    """A plain progress.Tracker called as the actor is (`tracker.read.remote(...)`), its answers had directly."""

    def __init__(self, tracker):
        self.tracker = tracker

    def __getattr__(self, name):
        return type("Method", (), {"remote": staticmethod(getattr(self.tracker, name))})


def _reader(tmp_path, monkeypatch, window_items: int, window_bytes: int):
    monkeypatch.setattr(readers, "MANIFEST_SHARD_ROWS", 10)   # a block per 10 rows
    manifest = tmp_path / "m.csv"
    manifest.write_text("uri\n" + "".join(f"/media/{i:03d}.png\n" for i in range(100)))
    spec = readers.ReadSpec("", "files", str(manifest), "uri", "", "", (), ("*",), (), OPTS,
                            StateDir(str(tmp_path / "out"), OPTS))
    tracker = progress.Tracker()
    window = ReadAhead(Direct(tracker), window_items, window_bytes, get=lambda answer: answer)
    window.WAIT_S = 0.02
    work = UnitWork(readers.find_units(spec)[0], {})
    blocks = pending_items(work, spec, PLAN, np.zeros(0, np.uint64), Direct(tracker), window=window)
    read = []
    thread = threading.Thread(target=lambda: read.extend(b.num_rows for b in blocks), daemon=True)
    thread.start()
    return tracker, read, thread


def _settled(read: list, rows: int) -> bool:
    """Whether `rows` were read, and no more after a while (the reader waits)."""
    deadline = time.monotonic() + 10
    while sum(read) < rows and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.3)
    return sum(read) == rows


def test_the_read_ahead_window_holds_the_reader_until_the_driver_writes(tmp_path, monkeypatch):
    tracker, read, thread = _reader(tmp_path, monkeypatch, window_items=30, window_bytes=1 << 30)
    assert _settled(read, 30)   # 3 blocks ahead: the window is full
    tracker.wrote(20)           # the driver wrote 20 of them: room for 2 blocks more
    assert _settled(read, 50)
    tracker.wrote(100)
    thread.join(10)
    assert sum(read) == 100 and not thread.is_alive()


def test_the_read_ahead_window_counts_bytes_too(tmp_path, monkeypatch):
    tracker, read, thread = _reader(tmp_path, monkeypatch, window_items=1000, window_bytes=1)
    assert _settled(read, 10)   # one block's bytes fill it
    tracker.wrote(10)
    assert _settled(read, 20)
    tracker.wrote(100)
    thread.join(10)
    assert sum(read) == 100


def test_the_graph_bounds_the_tasks_that_hold_no_cpu_and_cuts_blocks_of_several_calls(local_ray, tmp_path):
    """A 1e6-row manifest's read blocks each started a zero-CPU repartition task, ~150 at once: Ray started a worker
    process for each and the model actor waited minutes to be placed. A block costs Ray Data ~60 ms of CPU whatever
    its rows: blocks of batching.block_items at least, a whole number of model-actor calls."""
    cfg = config.from_dict({"input": {"uri": str(tmp_path)}, "output": {"uri": str(tmp_path / "out")},
                            "model": {"path": "/m"}, "run": {"batch_size": 64},
                            "actors": {"count": 1, "num_gpus": 0}})
    units = [UnitWork(readers.Unit("manifest", f"/m{i}.csv"), {}) for i in range(300)]
    ds = build_dataset(cfg, PendingItems(units, None, PLAN, None, None, 0))
    ops, op = [], ds._logical_plan.dag
    while op is not None:
        ops.append(op)
        op = op.input_dependencies[0] if op.input_dependencies else None
    names = [type(o).__name__ for o in ops]
    assert names == ["MapBatches", "MapBatches", "StreamingRepartition", "Read"], names
    without_cpu = [o for o in ops if o.ray_remote_args.get("num_cpus") == 0]
    assert [type(o).__name__ for o in without_cpu] == ["StreamingRepartition", "Read"]
    assert all(isinstance(o.compute, ray.data.TaskPoolStrategy) and o.compute.size <= CUT_TASKS for o in without_cpu)
    call = 64 * cfg.batching.sort_window   # run.batch_size x sort_window, one task
    assert ops[0].batch_size == call
    assert ops[2].target_num_rows_per_block == cfg.batching.block_items == 2048 and 2048 % call == 0
    assert ops[1].batch_size is None   # a decode task decodes its whole block, 32 at a time:
    assert ops[1].fn_kwargs["batch_rows"] == cfg.batching.decode_batch_size
    block = pa.table({"n": range(70)})
    sizes = [b.num_rows for b in _decode_in_batches(block, lambda b, settings: b.slice(1), 32, None)]
    assert sizes == [31, 31, 5]   # each batch decoded on its own, its rows out as they are ready


def test_a_read_task_run_again_counts_its_items_once():
    tracker = progress.Tracker()
    assert tracker.read("u", 40, 400) == (40, 400)
    assert tracker.read("u", 10, 100) == (40, 400)   # Ray ran the read task again: its first 10 items went by
    assert tracker.read("v", 20, 200) == (60, 600)
    tracker.wrote(50)
    assert tracker.read("u", 50, 500) == (20, 200)


@pytest.mark.parametrize("items, actors, window", [("auto", 1, 65_536), ("auto", 64, 262_144), (500, 64, 500)])
def test_read_ahead_items_auto_feeds_every_actor(items, actors, window):
    assert config.read_ahead(items, actors) == window
