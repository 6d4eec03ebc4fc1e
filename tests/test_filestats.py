"""Per-file summaries (pipeline.filestats): a merge of parts' summaries has the counts of the whole, merge() leaves
its inputs alone, and the item count is right."""

from __future__ import annotations

import copy
import json
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pytest

from pipeline import filestats, output


def _table(n: int, seed: int = 0, first_id: int = 0) -> pa.Table:
    rng = np.random.default_rng(seed)
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rows = []
    for k in range(n):
        item = first_id + k // 3
        failed = rng.random() < 0.1
        uri = f"s3://b/{item}.{'mp4' if item % 5 == 0 else 'jpg'}"
        rows.append({**output.error_row({"id": f"{item:032x}", "uri": uri,
                                         "media_type": "video" if item % 5 == 0 else "image"},
                                        ["caption", "ocr", "reasoning"][k % 3], "p",
                                        f"{uri}: {'empty file (0 bytes)' if k % 2 else 'image has 7 frames'}",
                                        f"m{k % 2}", "h"),
                     "error": None if not failed else f"{uri}: {'empty file (0 bytes)' if k % 2 else 'frame 3 bad'}",
                     "finish_reason": "error" if failed else ("length" if k % 7 == 0 else "eos"),
                     "num_output_tokens": 0 if failed else int(rng.integers(0, 3000)),
                     "num_input_tokens": int(rng.integers(1, 5000)), "width": 640, "height": int(rng.integers(1, 900)),
                     "processed_at": start + timedelta(seconds=float(rng.uniform(0, 900)))})
    return pa.Table.from_pylist(rows, schema=output.SCHEMA)


def _counts(s: dict) -> dict:
    return {"rows": s["rows"], "strata": s["strata"], "finish": s["finish"], "models": s["models"],
            "errors": {k: n for k, (n, _) in s["errors"].items()}, "at": s["at"],
            "out": {t: (total, sum(c)) for t, (_, total, c) in s["out"].items()},
            "times": {run: sum(r for _, r, _ in bins) for run, (_, bins) in s["times"].items()}}


def _hist(s: dict, task: str, width: int) -> np.ndarray:
    w, _, counts = s["out"][task]
    return filestats._rebin(np.asarray(counts), w, width)


def test_a_merge_of_parts_has_the_counts_of_the_whole():
    whole = _table(900)
    parts = [whole.slice(0, 100), whole.slice(100, 500), whole.slice(600)]
    summaries = [filestats.summarize(p, "run-a") for p in parts]
    merged, direct = filestats.merge(summaries), filestats.summarize(whole, "run-a")
    assert _counts(merged) == _counts(direct)
    assert merged["ids"] == direct["ids"] and filestats.items(merged) == filestats.items(direct)   # same registers
    assert abs(filestats.items(merged) - 300) <= 3   # an estimate
    for task in ("caption", "ocr", "reasoning"):   # the same histogram at the coarser of the two widths
        width = max(merged["out"][task][0], direct["out"][task][0])
        assert np.array_equal(_hist(merged, task, width), _hist(direct, task, width))
    assert merged["in"] == direct["in"] and merged["px"] == direct["px"]
    # order-free in every count, and associative
    assert _counts(filestats.merge(summaries[::-1])) == _counts(merged)
    assert _counts(filestats.merge([filestats.merge(summaries[:2]), summaries[2]])) == _counts(merged)
    # the text form round-trips, and is small
    assert filestats.loads(filestats.dumps(merged)) == json.loads(json.dumps(merged))
    assert len(filestats.dumps(filestats.summarize(whole.slice(0, 512), "run-a"))) < 4000


def test_merge_is_pure_and_needs_every_summary():
    summaries = [filestats.summarize(_table(60, seed=s, first_id=100 * s), f"run-{s}") for s in range(3)]
    before = copy.deepcopy(summaries)
    merged = filestats.merge(summaries)
    assert summaries == before
    assert set(merged["times"]) == {"run-0", "run-1", "run-2"} and merged["rows"] == 180
    assert filestats.merge(summaries + [None]) is None
    texts = [filestats.dumps(s) for s in summaries]
    assert filestats.loads(filestats.merge_json(texts)) == json.loads(filestats.dumps(merged))
    assert filestats.merge_json(texts + [None]) is None and filestats.merge_json([]) is None
    assert filestats.merge([{**summaries[0], "v": 0}]) is None   # another version's: unknown
    assert filestats.loads(json.dumps({**summaries[0], "v": 99})) is None and filestats.loads(None) is None


def test_the_counts_of_the_summary_are_those_of_the_rows():
    table = _table(600, seed=3)
    s = filestats.summarize(table, "r")
    df = table.to_pandas()
    ok = df[df.error.isna()]
    strata = df.assign(status=np.where(df.error.isna(), "ok", "error")).groupby(["task", "media_type", "status"])
    assert {(t, m, st): n for t, m, st, n in s["strata"]} == strata.size().to_dict()
    assert dict(((t, r), n) for t, r, n in s["finish"]) == df.groupby(["task", "finish_reason"]).size().to_dict()
    kinds = df.error.dropna().map(lambda e: filestats.error_kind(e.split(": ", 1)[0], e)).value_counts().to_dict()
    assert {k: n for k, (n, _) in s["errors"].items()} == kinds == {"empty file": kinds["empty file"],
                                                                   "frame # bad": kinds["frame # bad"]}
    for task, group in ok.groupby("task"):
        width, total, counts = s["out"][task]
        assert total == group.num_output_tokens.sum() and len(counts) <= filestats.MAX_TOKEN_BINS_FILE
        assert np.array_equal(counts, np.bincount(group.num_output_tokens // width))
    for media, group in ok.groupby("media_type"):
        lo, counts = s["in"][media]
        bins = np.floor(np.log2(group.num_input_tokens.clip(lower=1))).astype(int)
        assert np.array_equal(np.bincount(bins)[lo:], counts)
    width, bins = s["times"]["r"]
    secs = table["processed_at"].cast(pa.int64()).to_numpy() // 10**6
    assert sum(r for _, r, _ in bins) == len(df) and len(bins) <= filestats.MAX_TIME_BINS_FILE
    assert {int(x) for x in secs // width} == {b for b, _, _ in bins}


@pytest.mark.parametrize("n", [1, 37, 5_000, 200_000])
def test_items_is_the_number_of_distinct_ids(n):
    ids = [f"{k:032x}" for k in range(n)]
    regs = filestats._registers(ids + ids[: n // 2])   # repeats count once
    estimate = filestats._estimate(regs)
    assert abs(estimate - n) <= max(1, 0.02 * n), (estimate, n)
