"""The output as standard readers take it: results are the only `*.parquet` files under the output, so pandas,
pyarrow.dataset, duckdb and polars, pointed at the folder or at `OUT/**/*.parquet`, each read exactly its rows,
locally and on S3, with the files directly under the prefix or in hive folders (`output.partition_by = ["task"]`). State an earlier version wrote under `*.parquet` names is still resumed from, and renamed."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import listing, output, progress
from pipeline.state import StateDir
from pipeline.storage import StorageOptions
from tests.pipeline_helpers import S3_ENV, config_text, good_media, run_job, s3fs_for, write_local

OPTS = StorageOptions(retries=2, retry_backoff_s=0.0)


def _state_parquet(out) -> list[str]:
    return sorted(str(p.relative_to(out)) for p in (out / "_state").rglob("*.parquet"))


def test_completion_records_folded_by_an_earlier_version_are_resumed_then_renamed(tmp_path):
    out = tmp_path / "out"
    old = StateDir(str(out), OPTS)
    progress.Ledger(old, "fp").mark_trusted()
    (out / "_state").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"name": ["u#0", "u"], "tasks": [["caption"], ["caption"]], "pairs": [[3], [3]]},
                            schema=pa.schema(list(progress.FOLDED_SCHEMA)[:3])),   # as 0.1 folded them: no extents
                   out / "_state" / "done.parquet")
    ledger = progress.Ledger(StateDir(str(out), OPTS), "fp")
    assert ledger.load({}).records == {"u#0": {"caption": 3}, "u": {"caption": 3}}
    ledger.record("v#0", {"caption": 1})
    ledger.fold()
    assert _state_parquet(out) == [] and (out / "_state" / "done.pq.state").is_file()
    again = progress.Ledger(StateDir(str(out), OPTS), "fp").load({})
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


# --- the readers, on a real run's output ---------------------------------------------------------------------

S3_BUCKET = "s3://readers-layout"   # a bucket of its own: moto keeps buckets across servers in one process
LAYOUTS = {"flat": [], "by_task": ["task"]}


@pytest.fixture(scope="module", params=list(LAYOUTS))
def run_output(request, tiny_gqa, tmp_path_factory, s3):
    """A real run's output with files of only error rows (rows_per_file 1), kept columns all null in some files
    or in all, and every kind of state: folded completion records, run records, the report and a listing snapshot
    (written by the listing code as a listed run leaves it). Copied as it is to S3 too. -> (local path, the rows
    of its result files, read one by one, the output's URL on S3)."""
    layout = LAYOUTS[request.param]
    root = tmp_path_factory.mktemp("layout")
    write_local(root / "media", good_media(num_images=4, num_videos=0))
    images = sorted(str(p) for p in (root / "media").rglob("*.*"))
    (root / "m").mkdir()
    manifests = [({"score": pa.array([1, 2, 3])}, images[:2] + [str(root / "media" / "missing.png")]),
                 ({"score": pa.array([0.5]), "note": pa.array(["x"])}, images[2:3]),
                 ({"score": pa.array(["high"]), "note": pa.array(["y"])}, images[3:])]   # cannot be unified
    for n, (kept, uris) in enumerate(manifests):
        columns = {"note": pa.nulls(len(uris)), "empty": pa.nulls(len(uris)), **kept}
        pq.write_table(pa.table({"uri": uris, **columns}), root / "m" / f"{n}.parquet")
    out = root / "out"
    config = root / "run.toml"
    config.write_text(config_text("", str(out), str(tiny_gqa), tasks=("caption", "ocr") if layout else ("caption",))
                      .replace('uri = ""\n', f'manifest = "{root / "m"}"\nkeep_columns = ["score", "note", "empty"]\n',
                               1))
    result = run_job(config, "output.rows_per_file=1", "output.compact=false",   # files of one row each
                     f"output.partition_by={layout}".replace("'", '"'))
    assert result.returncode == 0, result.stderr[-3000:]
    snapshot = listing.ListingSnapshot(StateDir(str(out), OPTS), str(root / "media"))
    for index, part in enumerate(snapshot.partitions(OPTS)):
        list(listing.partition_parts(str(root / "media"), OPTS, snapshot, index, part, lambda n: False))
    state = {p.relative_to(out / "_state").parts[0] for p in (out / "_state").rglob("*") if p.is_file()}
    assert {"done.pq.state", "runs", "report.html", "listing", "progress.json"} <= state, state
    files = sorted(out.glob("**/part-*.parquet"))
    assert all(("/task=" in str(p)) == bool(layout) for p in files)
    truth = pa.concat_tables([output.with_partitions(pq.read_table(p), str(p.relative_to(out))) for p in files],
                             promote_options="permissive")
    assert any(pq.read_table(p)["error"].null_count == 0 for p in files)           # files of only error rows
    assert truth["empty"].null_count == len(truth) and truth.schema.field("score").type == pa.float64()
    s3_out = f"{S3_BUCKET}/{request.param}"
    s3fs_for(s3).put(str(out), s3_out[len("s3://"):], recursive=True)
    return out, truth, s3_out


def _keys(table) -> list[tuple[str, str]]:
    if not isinstance(table, pa.Table):   # pandas or polars
        table = pa.Table.from_pandas(table) if hasattr(table, "iloc") else table.to_arrow()
    return sorted(zip(table["id"].to_pylist(), table["task"].to_pylist()))


def _s3_options(endpoint: str) -> dict:
    return {"key": S3_ENV["AWS_ACCESS_KEY_ID"], "secret": S3_ENV["AWS_SECRET_ACCESS_KEY"],
            "client_kwargs": {"endpoint_url": endpoint}}


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pandas_reads_the_output_folder(run_output, s3, where):
    import pandas as pd

    out, truth, s3_out = run_output
    df = (pd.read_parquet(str(out)) if where == "local" else
          pd.read_parquet(s3_out, storage_options=_s3_options(s3)))
    assert len(df) == len(truth) and _keys(df) == _keys(truth)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_pyarrow_dataset_reads_the_output_folder(run_output, s3, where):
    import pyarrow.dataset as pads
    from pyarrow import fs as pafs

    out, truth, s3_out = run_output
    if where == "local":
        table = pads.dataset(str(out), format="parquet", partitioning="hive").to_table()
    else:
        s3_fs = pafs.S3FileSystem(endpoint_override=s3, access_key=S3_ENV["AWS_ACCESS_KEY_ID"],
                                  secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], region="us-east-1")
        table = pads.dataset(s3_out[len("s3://"):], format="parquet", filesystem=s3_fs, partitioning="hive").to_table()
    assert table.num_rows == len(truth) and _keys(table) == _keys(truth)


@pytest.mark.parametrize("glob", ["**/*.parquet", "*.parquet"])
@pytest.mark.parametrize("where", ["local", "s3"])
def test_duckdb_reads_the_output_by_glob(run_output, s3, where, glob):
    """duckdb's httpfs extension cannot be installed offline: on S3 it reads through s3fs (register_filesystem),
    which globs as httpfs does."""
    import duckdb

    out, truth, s3_out = run_output
    con = duckdb.connect()
    if where == "s3":
        con.register_filesystem(s3fs_for(s3))
    base = str(out) if where == "local" else s3_out
    if glob == "*.parquet" and "by_task" in s3_out:
        assert con.sql(f"select count(*) from read_parquet('{base}/**/*.parquet')").fetchall() == [(len(truth),)]
        return   # in hive folders: nothing directly under the prefix
    rows = con.sql(f"select id, task from read_parquet('{base}/{glob}')").fetchall()
    assert len(rows) == len(truth) and sorted(rows) == _keys(truth)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_polars_scans_the_output_by_the_readmes_glob(run_output, s3, where):
    """polars reads a folder only when all its files are Parquet (the report under _state/ is not): the README
    gives it the glob."""
    import polars as pl

    out, truth, s3_out = run_output
    if where == "local":
        frame = pl.scan_parquet(f"{out}/**/*.parquet", hive_partitioning=True).collect()
    else:
        frame = pl.scan_parquet(f"{s3_out}/**/*.parquet", hive_partitioning=True, storage_options={
            "aws_endpoint_url": s3, "aws_access_key_id": S3_ENV["AWS_ACCESS_KEY_ID"],
            "aws_secret_access_key": S3_ENV["AWS_SECRET_ACCESS_KEY"], "aws_region": "us-east-1",
            "aws_allow_http": "true"}).collect()
    assert frame.height == len(truth) and _keys(frame) == _keys(truth)


def test_a_run_over_kept_columns_of_unified_and_conflicting_types_finishes(run_output):
    """int then float manifests, a first manifest whose columns are all null, and one whose score is a string: the
    run exits 0 (the fixture checks), scores are doubles, notes strings, and the string file's item is an error row
    naming the column and both types."""
    out, truth, s3_out = run_output
    assert truth.schema.field("note").type == pa.string() and truth.schema.field("empty").type == pa.null()
    rows = {r["uri"].rsplit("/", 1)[-1]: r for r in truth.to_pylist()}
    assert {name: (r["score"], r["note"]) for name, r in rows.items()} == {
        "img_01.png": (1.0, None), "img_02.webp": (2.0, None), "missing.png": (3.0, None),   # manifest 0
        "img_00.jpg": (0.5, "x"), "img_03.bmp": (None, "y")}                                 # 1, 2
    assert rows["img_01.png"]["error"] is None and rows["img_00.jpg"]["error"] is None
    assert "input.keep_columns: column 'score' is string in " in rows["img_03.bmp"]["error"]
    assert rows["img_03.bmp"]["error"].endswith("2.parquet and double in the other input files: no one type holds both")


def test_the_report_counts_the_rows_in_either_layout_and_shows_every_task(run_output):
    """The run report (per-file summaries from the manifest; the gallery from sampled files, whose task a hive
    folder holds) counts exactly the rows, with every task of a sampled item on its card."""
    from pipeline.report import build_report, survey

    out, truth, _ = run_output
    scanned = survey(str(out), OPTS, sample=100)
    strata = {}
    for row in truth.select(["task", "media_type", "error"]).to_pylist():
        key = (row["task"], row["media_type"] or "", "ok" if row["error"] is None else "error")
        strata[key] = strata.get(key, 0) + 1
    assert scanned.rows == len(truth) and dict(scanned.strata) == strata
    html = build_report(str(out), OPTS, sample=100)
    assert all(f">{task}<" in html for task in set(truth["task"].to_pylist()))
