"""The output as standard readers take it: results are the only `*.parquet` files under the output, so pandas,
pyarrow.dataset, duckdb and polars, pointed at the folder or at `OUT/**/*.parquet`, each read exactly its rows,
locally and on S3. State an earlier version wrote under `*.parquet` names is still resumed from, and renamed."""

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import listing, progress
from pipeline.state import StateDir
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import good_media, write_local

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)


def _state_parquet(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "_state").rglob("*.parquet"))


def test_completion_records_folded_by_an_earlier_version_are_resumed_then_renamed(tmp_path):
    out = tmp_path / "out"
    old = StateDir(str(out), OPTS)
    progress.Ledger(old, "fp").mark_trusted()
    (out / "_state").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"name": ["u#0", "u"], "tasks": [["caption"], ["caption"]], "pairs": [[3], [3]]},
                            schema=progress.FOLDED_SCHEMA), out / "_state" / "done.parquet")   # as 0.1 folded them
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    assert ledger.load(lambda: []).records == {"u#0": {"caption": 3}, "u": {"caption": 3}}
    ledger.record("v#0", {"caption": 1})
    ledger.fold()
    assert _state_parquet(out) == [] and (out / "_state" / "done.pq.state").is_file()
    again = progress.Ledger(StateDir(str(out), OPTS), "fp").load(lambda: [])
    assert again.records == {"u#0": {"caption": 3}, "u": {"caption": 3}, "v#0": {"caption": 1}}
    ledger.forget()
    assert not list((out / "_state").glob("done.*"))


def test_listing_parts_snapshotted_by_an_earlier_version_are_read_then_renamed(tmp_path):
    corpus, out = tmp_path / "corpus", tmp_path / "out"
    write_local(corpus, good_media(num_images=4, num_videos=0))
    snapshot = listing.ListingSnapshot(StateDir(str(out), OPTS), str(corpus))
    parts = snapshot.partitions(OPTS)
    paths = list(listing.walk(str(corpus), OPTS, parts[0]))
    folder = out / "_state" / "listing" / listing.listing_id(str(corpus)) / "p0"
    folder.mkdir(parents=True)
    pq.write_table(pa.table({"path": paths}), folder / "000000.parquet")   # as 0.1 wrote its parts
    snapshot.mark_complete(0, 1)
    assert snapshot.parts(0) == ([0], True)
    assert snapshot.read_part(0, 0) == paths
    assert _state_parquet(out) == [] and (folder / "000000.pq.state").is_file()
    snapshot.write_part(0, 1, ["x.png"])
    assert sorted(p.name for p in folder.iterdir()) == ["000000.pq.state", "000001.pq.state", "complete.json"]
