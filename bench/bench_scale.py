"""The pipeline at corpus scale, each figure beside its reference measured in the same run:

    .venv/bin/python bench/bench_scale.py [--listing-items 200000] [--resume 100000,1000000,10000000] \\
        [--layouts manifests,big,grown,grown-csv,listed,listed-middle] [--listed-max 1000000] \\
        [--machinery-items 1000000] [--single-manifest-items 1000000] [--before-max 1000000] [--parts 1,2,3,4] \\
        [--skip-ratio]

    (run with PYTHONPATH=<repo>:<repo>/bench: the zero-cost stages are this module's, imported by Ray's workers)

1. Reading items/s per input format (the read side alone, no Ray): a listed local folder, Parquet / CSV / JSONL
   manifests, WebDataset tars, Parquet with embedded bytes.
2. Resume start-up: an output with N (item, task) rows done (synthetic result files in the exact schema, as a
   finished run leaves them: completion records with their extents, the finished shards' ids), the same command
   again with a zero-cost model, time until the first new row reaches the driver (Ray start-up included), for each
   input layout (--layouts): a folder of manifests whose new rows are in a new file; one big Parquet manifest whose
   last rows are not done (a run killed there); one finished then rewritten with rows more (Parquet) or appended to
   (CSV); a listed folder of 16 sub-folders finished, then objects added to one, named to sort after its files
   (found by a listing of the keys after its last) or among them (found by listing that folder again in full; the
   folders unchanged are not listed again). --listed-max caps these, a file per object being made on disk. Beside
   it, what the previous design did before any new work: read every result file's keys and re-read the whole input.
3. The machinery with zero-cost stages (decode and model stand-ins), the default config (run.batch_size 64, a
   GPU's default): items/s through read -> cut -> decode tasks -> actor -> writer, the driver's CPU per item (the
   items/s the driver alone carries), its RSS every second (growth while rows stream), Ray's worker processes and
   the time to place the model actor; over manifests of 100,000 rows, then one manifest of as many rows.
4. The tiny model: pipeline / direct ratio (`bench/bench_pipeline.py`, both sides in its one run).
Prints a table per part and an extrapolation to 1e8 and 1e9 items.
"""

from __future__ import annotations

import argparse
import io
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline import config as config_mod  # noqa: E402
from pipeline import listing, output, progress, readers, storage  # noqa: E402
from pipeline.items import canonical_uri, item_id, key_hash  # noqa: E402
from pipeline.sources import StoredIds, TaskPlan, UnitWork, id_keys, pending_items  # noqa: E402
from pipeline.state import StateDir  # noqa: E402
from pipeline.storage import StorageOptions  # noqa: E402

OPTS = StorageOptions()
ROWS_PER_MANIFEST = 10_000
PNG = None


def tiny_png() -> bytes:
    global PNG
    if PNG is None:
        from pipeline.corpus import image_bytes

        PNG = image_bytes(32, 32, seed=0, ext="png")
    return PNG


class NullTracker:
    class _M:
        def remote(self, *a):
            pass

    shard = unit = _M()


# --- 1. reading ------------------------------------------------------------------------------------------------


def read_rate(spec) -> tuple[int, float, float]:
    """(items, seconds, seconds until the first block of items was ready for decoding)."""
    start, n, first = time.perf_counter(), 0, None
    for unit in readers.find_units(spec):
        for block in pending_items(UnitWork(unit, {}), spec, TaskPlan(("caption",), ""), np.zeros(0, np.uint64),
                                   NullTracker()):
            first = first if first is not None else time.perf_counter() - start
            n += block.num_rows
    return n, time.perf_counter() - start, first or 0.0


def bench_reading(root: Path, items: int) -> list[tuple]:
    spec = lambda out, **kw: readers.ReadSpec(kw.get("uri", ""), kw.get("fmt", "files"), kw.get("manifest", ""),  # noqa
                                              "uri", kw.get("bytes_column", ""), "", (), ("*",), (), OPTS,
                                              StateDir(str(out), OPTS))
    results = []
    folder = root / "listed"
    for i in range(items):   # empty files: listing never opens them
        sub = folder / f"d{i % 16:02d}"
        sub.mkdir(parents=True, exist_ok=True)
        (sub / f"{i:09d}.jpg").touch()
    results.append(("listed local folder (16 partitions, snapshot written)",
                    *read_rate(spec(root / "o1", uri=str(folder)))))
    results.append(("same folder again (read from the snapshot)", *read_rate(spec(root / "o1", uri=str(folder)))))
    uris = [f"/data/media/{i:09d}.jpg" for i in range(items)]
    mdir = root / "manifests"
    mdir.mkdir()
    for k in range(0, items, 100_000):
        pq.write_table(pa.table({"uri": uris[k:k + 100_000], "caption": ["x"] * len(uris[k:k + 100_000])}),
                       mdir / f"{k // 100_000:05d}.parquet")
    results.append((f"Parquet manifests ({len(list(mdir.iterdir()))} files)",
                    *read_rate(spec(root / "o2", manifest=str(mdir)))))
    (root / "m.csv").write_text("uri\n" + "\n".join(uris) + "\n")
    results.append(("one CSV manifest", *read_rate(spec(root / "o3", manifest=str(root / "m.csv")))))
    (root / "m.jsonl").write_text("".join(f'{{"uri": "{u}"}}\n' for u in uris))
    results.append(("one JSONL manifest", *read_rate(spec(root / "o4", manifest=str(root / "m.jsonl")))))
    wds, data = root / "wds", tiny_png()
    wds.mkdir()
    per_tar = 10_000
    for t in range(max(1, items // per_tar // 4)):   # embedded media: a quarter as many items
        with tarfile.open(wds / f"{t:06d}.tar", "w") as tar:
            for i in range(per_tar):
                info = tarfile.TarInfo(f"{t}{i:06d}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    results.append((f"WebDataset tars ({len(data)} B images)",
                    *read_rate(spec(root / "o5", uri=str(wds), fmt="webdataset"))))
    pqdir = root / "pqbytes"
    pqdir.mkdir()
    count = max(1, items // 4)
    pq.write_table(pa.table({"jpg": pa.array([data] * count, pa.binary())}), pqdir / "a.parquet",
                   row_group_size=10_000)
    results.append((f"Parquet with embedded bytes ({len(data)} B images)",
                    *read_rate(spec(root / "o6", uri=str(pqdir), fmt="parquet", bytes_column="jpg"))))
    return results


# --- 2. resume -------------------------------------------------------------------------------------------------


class DoneOutput:
    """An output as a finished run leaves it: result files of the done rows (exact schema, a file per shard),
    completion records with their extents, the finished shards' ids; trusted for `fingerprint`."""

    def __init__(self, out: Path, fingerprint: str):
        out.mkdir(parents=True, exist_ok=True)
        self.out, self.state = out, StateDir(str(out), OPTS)
        self.ledger = progress.Ledger(self.state, fingerprint)
        self.files = 0

    def shard(self, unit: readers.Unit, shard: str, uris: list[str], extent: dict | None, ids: StoredIds | None):
        n, now = len(uris), pa.scalar(0, pa.timestamp("us", tz="UTC"))
        item_ids = [item_id(u) for u in uris]
        rows = {name: pa.nulls(n, t) for name, t in zip(output.SCHEMA.names, output.SCHEMA.types)}
        rows.update(id=pa.array(item_ids), uri=pa.array(uris), task=pa.array(["caption"] * n),
                    text=pa.array(["a caption"] * n), processed_at=pa.repeat(now, n))
        name = f"part-20260101-000000-0000beef-{self.files:06d}.parquet"   # named as a run of ours names them
        pq.write_table(pa.Table.from_pydict(rows, schema=output.SCHEMA), self.out / name, compression="zstd")
        self.files += 1
        # a finished run's records count every task of the run: manifests may add their rows' own prompts
        self.record(f"{unit.id}#{shard}", n, extent)
        if ids is not None:
            ids.write(shard, id_keys(item_ids))

    def record(self, name: str, n: int, extent: dict | None) -> None:
        self.ledger.records[name] = {"caption": n, "prompt": 0}
        if extent is not None:
            self.ledger.extents[name] = extent

    def close(self) -> None:
        self.ledger.fold()
        self.ledger.mark_trusted()


def new_media(media: Path, pending: int, stem: str = "new_") -> list[str]:
    media.mkdir(parents=True, exist_ok=True)
    for i in range(pending):
        (media / f"{stem}{i:04d}.png").write_bytes(tiny_png())
    return [str(media / f"{stem}{i:04d}.png") for i in range(pending)]


def virtual_uris(start: int, end: int) -> list[str]:
    return [f"/virtual/{i // ROWS_PER_MANIFEST:06d}/{i:09d}.jpg" for i in range(start, end)]


def stamp_of(path: Path) -> str:
    return storage.file_stamp(storage.filesystem(str(path), OPTS)[0].info(str(path)))


def synth_manifests(root: Path, done: int, pending: int, model: Path):
    """A folder of finished 10,000-row manifests, and the new rows in a new one."""
    mdir, out = root / "manifests", root / "out"
    mdir.mkdir(parents=True)
    pq.write_table(pa.table({"uri": new_media(root / "media", pending)}), mdir / "zzzzzz.parquet")
    cfg = load_cfg(mdir, out, model)
    synth = DoneOutput(out, cfg.input.fingerprint())
    for f in range(-(-done // ROWS_PER_MANIFEST)):
        uris = virtual_uris(f * ROWS_PER_MANIFEST, min(done, (f + 1) * ROWS_PER_MANIFEST))
        path = mdir / f"{f:06d}.parquet"
        pq.write_table(pa.table({"uri": uris}), path)
        unit, stamp = readers.Unit("manifest", str(path)), stamp_of(path)
        synth.shard(unit, "0.0", uris, {"rows": len(uris), "of": stamp}, None)
        synth.record(unit.id, len(uris), {"of": stamp, "groups": [len(uris)], "tail": _tail(uris)})
    synth.close()
    return cfg


def _tail(uris: list[str]) -> str:
    """The tail digest a reader notes of a Parquet manifest's last URIs (readers.Tail)."""
    return readers._digest([u.encode() for u in uris[-readers.TAIL_ROWS:]])


GROUP_ROWS = 1_000_000   # row groups of the big manifests (a multiple of a shard's rows)


def synth_big(root: Path, done: int, pending: int, model: Path, grown: str = ""):
    """One manifest of `done` rows with its shards finished (and its ids stored), then `pending` new rows: in the
    same file not yet done (a run killed there), or (`grown`: "parquet" or "csv") added after a run finished it,
    the Parquet file rewritten with its old rows first, the CSV appended to."""
    fmt = grown or "parquet"
    path, out = root / f"m.{fmt}", root / "out"
    root.mkdir(parents=True)
    new, old = new_media(root / "media", pending), virtual_uris(0, done)
    write = {"parquet": lambda uris: pq.write_table(pa.table({"uri": uris}), path, row_group_size=GROUP_ROWS),
             "csv": lambda uris: path.write_text("uri\n" + "".join(u + "\n" for u in uris))}[fmt]
    write(old if grown else old + new)
    cfg = load_cfg(path, out, model)
    synth, unit, stamp = DoneOutput(out, cfg.input.fingerprint()), readers.Unit("manifest", str(path)), stamp_of(path)
    ids = StoredIds(synth.state, unit, kept=True)
    for start in range(0, done, ROWS_PER_MANIFEST):
        shard = (f"{start // GROUP_ROWS}.{start % GROUP_ROWS // ROWS_PER_MANIFEST}" if fmt == "parquet"
                 else str(start // ROWS_PER_MANIFEST))
        uris = old[start:start + ROWS_PER_MANIFEST]
        synth.shard(unit, shard, uris, {"rows": len(uris), "of": stamp}, ids)
    if grown:
        groups = [min(GROUP_ROWS, done - g) for g in range(0, done, GROUP_ROWS)]
        extent = ({"of": stamp, "groups": groups, "tail": _tail(old[(len(groups) - 1) * GROUP_ROWS:])}
                  if fmt == "parquet" else
                  {"of": stamp, "rows": done, "tail": readers.text_tail(str(path), path.stat().st_size, OPTS)})
        synth.record(unit.id, done, extent)
        if fmt == "csv":
            with path.open("a") as f:
                f.write("".join(u + "\n" for u in new))
        else:
            write(old + new)
    synth.close()
    return cfg


def synth_listed(root: Path, done: int, pending: int, model: Path, middle: bool = False):
    """A folder of 16 sub-folders of `done` empty .jpg files (never opened: their pairs are done), listed and
    finished by a run that ended, then `pending` images added to the 8th sub-folder: named to sort after its
    files, or with `middle` among them (found only by listing it again in full)."""
    from pipeline.run import input_fingerprint
    from pipeline.preflight import read_spec

    media, out = root / "media", root / "out"
    folders = [media / f"d{k:02d}" for k in range(16)]
    for folder in folders:
        folder.mkdir(parents=True)
    for i in range(done):
        os.close(os.open(folders[i % 16] / f"{i:09d}.jpg", os.O_CREAT | os.O_WRONLY))
    cfg = load_cfg(media, out, model, input__manifest="", input__uri=str(media))
    listed_at = time.time() - 3600
    out.mkdir(parents=True)
    snapshot = listing.ListingSnapshot(StateDir(str(out), OPTS), str(media))
    partitions = snapshot.partitions(OPTS)
    synth = DoneOutput(out, input_fingerprint(cfg, read_spec(cfg, StateDir(str(out), OPTS))))
    time.sleep(listing.SETTLE_S)   # as a run's listing would find them: a folder changed just now is not stamped
    for index, part in enumerate(partitions):
        unit = readers.Unit("listing", str(media), index, part.prefix, part.recursive)
        keys = 0
        for number in listing.relist(str(media), OPTS, snapshot, index, part, 0.0, listed_at):
            chunk = snapshot.read_part(index, number)
            synth.shard(unit, str(number), [canonical_uri(str(media / k)) for k in chunk], None, None)
            keys += len(chunk)
        synth.record(unit.id, keys, {"listed_at": listed_at})
    synth.state.write_json("runs/20000101-000000-00000000.json", {"ended_at": listed_at + 60})
    synth.close()
    new_media(folders[7], pending, f"{done // 2:09d}_" if middle else "new_")
    return cfg


RESUME_LAYOUTS = {
    "manifests": ("folder of manifests, new rows in a new one", synth_manifests),
    "big": ("one big Parquet manifest, its last rows open", synth_big),
    "grown": ("one Parquet manifest finished, then rewritten with rows more",
              lambda *a: synth_big(*a, grown="parquet")),
    "grown-csv": ("one CSV manifest finished, then appended to", lambda *a: synth_big(*a, grown="csv")),
    "listed": ("a listed folder finished, then objects added to it", synth_listed),
    "listed-middle": ("the same, the new objects' keys among the old", lambda *a: synth_listed(*a, middle=True)),
}


def null_decode(batch: pa.Table, settings) -> pa.Table:
    return batch.drop_columns(["data"]).append_column("data", pa.nulls(batch.num_rows, pa.large_binary()))


class NullPredictor:
    """One output row per (item, task), no model: the machinery's cost alone."""

    def __init__(self, cfg, run_tag=""):
        self.cfg = cfg

    def __call__(self, batch: pa.Table) -> pa.Table:
        from pipeline import items as items_mod
        from pipeline.predictor import _with_item_columns

        items = items_mod.from_table(batch.drop_columns(["frames"]).append_column(
            "frames", pa.nulls(batch.num_rows, pa.large_binary())))
        rows = [{"id": it.id, "uri": it.uri, "media_type": it.media_type, "task": t, "prompt": "", "text": "x",
                 "thinking": "", "answer": "x", "boxes": [], "error": None, "num_input_tokens": 1,
                 "num_output_tokens": 1, "finish_reason": "eos", "model": "null", "run_config_hash": "0",
                 "processed_at": None} for it in items for t in it.tasks]
        return _with_item_columns(pa.Table.from_pylist(rows, schema=output.SCHEMA), rows, items, batch)


def load_cfg(mdir: Path, out: Path, model: Path, **overrides):
    raw = {"input": {"manifest": str(mdir)}, "output": {"uri": str(out)},
           "model": {"path": str(model)}, "run": {"tasks": ["caption"], "batch_size": 64},
           "ray": {"address": "local"}}
    for key, value in overrides.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return config_mod.from_dict(raw)


def time_resume(root: Path, done: int, model: Path, layout: str = "manifests") -> dict:
    import ray

    from pipeline.run import run

    start = time.perf_counter()
    cfg = RESUME_LAYOUTS[layout][1](root, done, 64, model)
    made_s = time.perf_counter() - start
    printed = io.StringIO()
    summary = run(cfg, out=printed, predictor=NullPredictor, decode=null_decode)
    ray.shutdown()
    return {"done": done, "layout": layout, "first_new_s": summary.first_result_s, "skipped": summary.skipped,
            "new": summary.done, "made_s": made_s, "said": [line for line in printed.getvalue().splitlines()
                                                          if line.startswith(("input changed", "note"))]}


def time_previous_design(root: Path, done: int) -> dict:
    """What the previous design did before any new item: every result file's keys, then the whole input re-read
    and checked against them (np.unique as it did)."""
    out, mdir = root / "out", root / "manifests"
    start = time.perf_counter()
    names = output.result_files(*storage.filesystem(str(out), OPTS), OPTS)
    keys = progress.read_keys(StateDir(str(out), OPTS), names)
    keys = np.unique(keys)
    load_s = time.perf_counter() - start
    start = time.perf_counter()
    for f in sorted(mdir.glob("*.parquet")):
        uris = pq.read_table(f)["uri"].to_pylist()
        k = key_hash([item_id(u) for u in uris], ["caption"] * len(uris))
        np.searchsorted(keys, k)
    relist_s = time.perf_counter() - start
    return {"load_done_s": load_s, "reread_s": relist_s}


# --- 3. machinery ----------------------------------------------------------------------------------------------


class RssSampler:
    """Every second: the driver's RSS, how many Ray worker processes this machine runs (a storm of tasks that hold
    no CPU shows as hundreds), and the CPU time of each process under the driver (local Ray: its daemons and
    workers), charged to what the process was doing when sampled (a worker's title names its task or actor)."""

    def __init__(self, every_s: float = 1.0, cpu_every_s: float = 0.2):
        self.samples, self.workers, self._stop = [], [], threading.Event()
        self.every_s, self.cpu_every_s = every_s, cpu_every_s
        self.cpu_by_kind: dict[str, float] = {}
        self._cpu_seen: dict[int, float] = {}
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        # CPU more often than RSS: a decode or read task lasts well under a second, and CPU is charged to the
        # title a worker has when sampled (time spent in a task that ended before the sample reads as ray::IDLE)
        next_rss = time.monotonic() + self.every_s
        while not self._stop.wait(self.cpu_every_s):
            self._charge_cpu()
            if time.monotonic() >= next_rss:
                next_rss += self.every_s
                self.samples.append((time.monotonic(), rss_mb()))
                self.workers.append(ray_workers())

    def _charge_cpu(self):
        for pid, (kind, cpu) in descendants_cpu(os.getpid()).items():
            self.cpu_by_kind[kind] = self.cpu_by_kind.get(kind, 0.0) + cpu - self._cpu_seen.get(pid, 0.0)
            self._cpu_seen[pid] = cpu

    def stop(self):
        self._stop.set()
        self.thread.join()
        self._charge_cpu()   # CPU since the last sample (a process gone before it is lost: Ray keeps its workers)


def descendants_cpu(root: int) -> dict[int, tuple[str, float]]:
    """{pid: (what it is, CPU seconds so far)} of every process under `root` (from /proc: no psutil here)."""
    procs, tick = {}, os.sysconf("SC_CLK_TCK")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().split(b"\0")
        except OSError:
            continue
        procs[int(pid)] = (int(fields[1]), _process_kind(cmd), (int(fields[11]) + int(fields[12])) / tick)
    under, frontier = {}, [root]
    while frontier:
        parent = frontier.pop()
        for pid, (ppid, kind, cpu) in procs.items():
            if ppid == parent and pid not in under:
                under[pid] = (kind, cpu)
                frontier.append(pid)
    return under


def _process_kind(cmd: list[bytes]) -> str:
    first = cmd[0].decode(errors="replace") if cmd else "?"
    if first.startswith("ray::"):   # a worker's title: ray::<task or actor>.<method>, cut to its operator
        return first.split(" ")[0].split(".")[0]
    words = [w.decode(errors="replace") for w in cmd if w]
    script = next((w for w in words[1:] if w.endswith(".py")), "")
    return os.path.basename(script or first)


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def ray_workers() -> int:
    """Ray worker processes (default_worker.py) running on this machine now."""
    count = 0
    for pid in os.listdir("/proc"):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                count += b"default_worker.py" in f.read()
        except (OSError, ValueError):
            continue
    return count


class PlacedPredictor(NullPredictor):
    """NullPredictor that notes when the first model actor was placed (its constructor ran)."""

    def __init__(self, cfg, run_tag=""):
        super().__init__(cfg, run_tag)
        marker = Path(cfg.output.uri + ".placed")
        if not marker.exists():
            marker.write_text(str(time.time()))


def manifests(mdir: Path, items: int, per_file: int) -> None:
    mdir.mkdir(parents=True)
    for k in range(0, items, per_file):
        n = min(per_file, items - k)
        pq.write_table(pa.table({"uri": [f"/virtual/{k + i:09d}.png" for i in range(n)]}),
                       mdir / f"{k // per_file:05d}.parquet")


def time_machinery(root: Path, items: int, model: Path, per_file: int = 100_000, **overrides) -> dict:
    """The job with zero-cost decode and model over `items` virtual URIs in manifests of `per_file` rows, with the
    default config (run.batch_size 64: a GPU actor's default slots); the driver's RSS and Ray's worker processes
    sampled every second."""
    import ray

    from pipeline import run as run_module
    from pipeline.run import run

    mdir, out = root / "m", root / "out"
    manifests(mdir, items, per_file)
    cfg = load_cfg(mdir, out, model, **overrides)
    sampler = RssSampler()
    start, wall, cpu = time.monotonic(), time.time(), driver_cpu_s()
    streamed = []   # when the last row was written: the run's end (commit, compaction, report) is not read-ahead
    real_finish = run_module._finish
    run_module._finish = lambda *a: streamed.append(time.monotonic()) or real_finish(*a)
    try:
        summary = run(cfg, out=io.StringIO(), predictor=PlacedPredictor, decode=null_decode)
    finally:
        run_module._finish = real_finish
    cpu = driver_cpu_s() - cpu
    sampler.stop()
    ray.shutdown()
    placed = Path(str(out) + ".placed")
    end = streamed[0] if streamed else math.inf
    after_first = [r for t, r in sampler.samples if summary.first_result_s <= t - start and t <= end]
    return {"items": summary.done, "seconds": summary.seconds, "first_s": summary.first_result_s,
            "items_per_s": summary.done / max(1e-9, summary.seconds - summary.first_result_s),
            "placed_s": float(placed.read_text()) - wall if placed.exists() else float("nan"),
            "rss_start_mb": after_first[0] if after_first else rss_mb(),
            "rss_peak_mb": max(after_first) if after_first else rss_mb(),
            "rss_end_mb": max((r for _, r in sampler.samples), default=0.0),
            "rss": [round(r) for _, r in sampler.samples], "workers_max": max(sampler.workers, default=0),
            "driver_cpu_s": cpu, "cpu_by_kind": sampler.cpu_by_kind}


def driver_cpu_s() -> float:
    """CPU seconds of this process, all its threads (Ray Data's scheduling loop and block fetching included)."""
    t = os.times()
    return t.user + t.system


def print_machinery(m: dict, what: str) -> None:
    print(f"  {what}: {m['items']:,} items in {m['seconds']:.1f}s (model actor placed after {m['placed_s']:.1f}s, "
          f"first row after {m['first_s']:.1f}s): {m['items_per_s']:,.0f} items/s after start-up; at most "
          f"{m['workers_max']} Ray worker processes")
    print(f"  driver CPU: {m['driver_cpu_s']:.1f}s, {1e6 * m['driver_cpu_s'] / max(1, m['items']):.0f} us per item: "
          f"the driver alone could carry {m['items'] / max(1e-9, m['driver_cpu_s']):,.0f} items/s on a free core "
          f"(this machine's other load slows the whole run, not this figure)")
    print(f"  driver RSS: {m['rss_start_mb']:.0f} MB at the first row, peak {m['rss_peak_mb']:.0f} MB "
          f"while rows streamed (growth {m['rss_peak_mb'] - m['rss_start_mb']:.0f} MB over {m['items']:,} items); "
          f"{m['rss_end_mb']:.0f} MB at the run's end (commit, compaction, report)")
    print(f"  driver RSS each second (MB): {' '.join(str(r) for r in m['rss'])}", flush=True)
    per_item = {kind: 1e6 * s / max(1, m['items']) for kind, s in m['cpu_by_kind'].items()}
    per_item["driver"] = 1e6 * m['driver_cpu_s'] / max(1, m['items'])
    total = sum(per_item.values())
    print(f"  CPU per item, start-up included, every process of the run: {total:.0f} us in all, "
          f"{1e6 / total:,.0f} items/s per core if each core were free:")
    for kind, us in sorted(per_item.items(), key=lambda kv: -kv[1]):
        if us >= 1:
            print(f"    {us:7.1f} us  {kind}")


# --- main ------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--listing-items", type=int, default=200_000)
    parser.add_argument("--resume", default="100000,1000000,10000000", help="done-row counts to resume from")
    parser.add_argument("--layouts", default=",".join(RESUME_LAYOUTS), help="input layouts to resume from")
    parser.add_argument("--listed-max", type=int, default=1_000_000,
                        help="largest done count for the listed layout (it makes a file per object)")
    parser.add_argument("--before-max", type=int, default=1_000_000,
                        help="largest done count at which the previous design is timed too (it is slow)")
    parser.add_argument("--machinery-items", type=int, default=1_000_000)
    parser.add_argument("--single-manifest-items", type=int, default=1_000_000,
                        help="items of one manifest file: time to place the model actor, worker processes (0: skip)")
    parser.add_argument("--parts", default="1,2,3,4", help="parts to run")
    parser.add_argument("--skip-ratio", action="store_true", help="skip the tiny-model ratio (bench_pipeline.py)")
    parser.add_argument("--work", default="", help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    from glmv.testing import make_tiny_checkpoint

    model = make_tiny_checkpoint(work / "tiny", preset="gqa", seed=0)
    parts = set(args.parts.split(","))
    if "1" in parts:
        part_reading(work, args)
    resume = part_resume(work, args, model) if "2" in parts else []
    m = part_machinery(work, args, model) if "3" in parts else None
    if "4" in parts and not args.skip_ratio:
        part_ratio()
    extrapolation(resume, m)
    return 0


def part_reading(work: Path, args) -> None:
    print("## 1. reading (no Ray), items/s")
    for name, n, s, first in bench_reading(work / "read", args.listing_items):
        print(f"  {name:55s} {n:>9d} items {s:6.2f}s {n / s:>10,.0f} items/s; first block after {first:.2f}s")


def part_resume(work: Path, args, model: Path) -> list[dict]:
    print("\n## 2. resume start-up: time to the first new row (Ray start-up included), 64 new rows each")
    time_resume(work / "resume-warm-up", 1_000, model)   # the first Ray start of a process is slower: not timed
    resume = []
    for layout in args.layouts.split(","):
        for done in (int(x) for x in args.resume.split(",")):
            if layout.startswith("listed") and done > args.listed_max:
                continue
            root = work / f"resume-{layout}-{done}"
            r = time_resume(root, done, model, layout)
            if done <= args.before_max and layout == "manifests":
                r.update(time_previous_design(root, done))
            resume.append(r)
            before = (f"; previous design before any new work: {r['load_done_s']:.1f}s keys + {r['reread_s']:.1f}s "
                      f"re-read = {r['load_done_s'] + r['reread_s']:.1f}s" if "load_done_s" in r else "")
            print(f"  {RESUME_LAYOUTS[layout][0]:62s} {done:>11,d} done: first new row after "
                  f"{r['first_new_s']:5.1f}s (skipped {r['skipped']:,}, new {r['new']}; made in {r['made_s']:.0f}s)"
                  f"{before}" + "".join(f"\n    said: {line}" for line in r["said"]), flush=True)
            shutil.rmtree(root, ignore_errors=True)
    return resume


def part_machinery(work: Path, args, model: Path) -> dict:
    print("\n## 3. machinery with zero-cost decode and model, default config (run.batch_size 64, a GPU's default)")
    m = time_machinery(work / "machinery", args.machinery_items, model)
    print_machinery(m, "manifests of 100,000 rows")
    shutil.rmtree(work / "machinery", ignore_errors=True)
    if args.single_manifest_items:
        one = time_machinery(work / "single", args.single_manifest_items, model, per_file=args.single_manifest_items)
        print_machinery(one, "one manifest")
        shutil.rmtree(work / "single", ignore_errors=True)
    return m


def part_ratio() -> None:
    print("\n## 4. tiny model: pipeline / direct (bench/bench_pipeline.py)", flush=True)
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "bench_pipeline.py"), "--items", "48",
                           "--repeats", "1", "--sides", "direct,job"], capture_output=True, text=True)
    print("\n".join("  " + line for line in proc.stdout.strip().splitlines()
                     if line.startswith(("work:", "ratio job/direct", "texts identical"))))


def extrapolation(resume: list[dict], m: dict | None) -> None:
    print("\n## extrapolation (2 cores, local disk)")
    for layout, (what, _) in RESUME_LAYOUTS.items():
        first = {r["done"]: r["first_new_s"] for r in resume if r["layout"] == layout}
        if len(first) > 1 and min(first.values()) > 0:
            low, high = min(first), max(first)
            figures = ", ".join(f"{s:.1f}s ({d:,} done)" for d, s in first.items())
            print(f"  resume, {what}: first new row after {figures}: x{first[high] / first[low]:.2f} from {low:,} "
                  f"to {high:,} done")
    if resume:
        print("  What a start reads grows by one record per 10,000-row shard (1e8 rows: 1e4 records, 1e9: 1e5, a few "
              "MB of done.pq.state) plus the sidecars of shards open at the kill; a big manifest's finished row groups "
              "are skipped unread, their shards' ids read instead (8 bytes a row: 80 MB at 1e7, 8 GB at 1e9 on one "
              "unit); a listed prefix is listed again after a run ended, but before the work only until something "
              "new is found (keys after each partition's last first, local folders unchanged skipped by their "
              "stamps), the rest beside the work (O(objects) on S3). The previous design's pre-work grew linearly "
              "(x10 per decade): ~10 min at 1e8, ~1.5 h at 1e9")
    if m is not None:
        ceiling = m["items"] / max(1e-9, m["driver_cpu_s"])
        print(f"  driver memory: +{m['rss_peak_mb'] - m['rss_start_mb']:.0f} MB over {m['items']:,} items while rows "
              f"streamed: the read runs ahead by batching.read_ahead_items at most, whatever the input's size")
        print(f"  machinery: {m['items_per_s']:,.0f} items/s end to end here (every stage on this machine's cores); "
              f"the driver's own CPU carries {ceiling:,.0f} items/s: 1e8 items in {1e8 / ceiling / 3600:.1f} h of "
              f"driver time, the stages scaling with the cluster")


if __name__ == "__main__":
    sys.exit(main())
