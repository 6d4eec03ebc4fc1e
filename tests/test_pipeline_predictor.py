"""The model actor on its own (no Ray): decoded rows in, one row per (item, task) out; in refill mode every call
feeds the actor's one engine (calls from several threads share its slots), in static mode windows are sorted by
prompt length into static batches; a failing window is retried row by row and only the bad row becomes an error
row."""

import dataclasses
import json
import threading

import pyarrow as pa
import pytest

from pipeline import config, output
from pipeline import predictor as predictor_mod
from pipeline.corpus import image_bytes
from pipeline.decode import DecodeSettings, decode_batch
from pipeline.items import ITEM_SCHEMA, Item, item_id, to_table
from pipeline.predictor import Predictor


@pytest.fixture(scope="module")
def setup(tiny_gqa, tmp_path_factory):
    folder = tmp_path_factory.mktemp("items")
    items = []
    # sizes chosen so that prompt lengths differ a lot; listed out of size order
    for i, (w, h) in enumerate([(300, 220), (60, 60), (200, 150), (56, 84), (280, 280), (90, 70)]):
        path = folder / f"img{i}.png"
        path.write_bytes(image_bytes(w, h, seed=i))
        items.append(Item(item_id(str(path)), str(path), "image", tasks=["caption", "ocr"], shard="u#0"))
    items.append(Item("broken", str(folder / "gone.png"), "image", tasks=["caption", "ocr"], shard="u#0"))
    cfg = config.from_dict({"input": {"uri": str(folder)}, "output": {"uri": str(folder / "out")},
                            "model": {"path": str(tiny_gqa)},
                            "run": {"tasks": ["caption", "ocr"], "batch_size": 3, "max_new_tokens": 3}})
    decoded = decode_batch(to_table(items), DecodeSettings.from_config(cfg))
    assert decoded.schema.equals(ITEM_SCHEMA)
    return cfg, decoded, Predictor(cfg)


def test_window_is_sorted_into_static_batches(setup, monkeypatch):
    cfg, decoded, predictor = setup
    monkeypatch.setattr(cfg.batching, "mode", "static")
    calls = []
    generate = predictor.model.generate

    def spy(**inputs):
        calls.append(inputs["input_ids"].shape)
        return generate(**inputs)

    predictor.model.generate = spy
    try:
        out = predictor(decoded)
    finally:
        predictor.model.generate = generate
    assert out.select(output.SCHEMA.names).schema.equals(output.SCHEMA)
    assert out["_shard"].to_pylist() == ["u#0"] * 14   # for the writer's count of landed rows per shard
    rows = out.to_pylist()
    assert len(rows) == 7 * 2 and len({(r["id"], r["task"]) for r in rows}) == 14
    assert [r["finish_reason"] for r in rows if r["id"] == "broken"] == ["error", "error"]
    assert [b for b, _ in calls] == [3, 3, 3, 3]   # 12 sequences, static batches of run.batch_size
    lengths = [t for _, t in calls]
    assert lengths == sorted(lengths) and lengths[0] < lengths[-1]   # sorted by prompt length: less padding
    good = [r for r in rows if r["error"] is None]
    assert all(r["num_output_tokens"] >= 1 and r["model"] == cfg.model_name() for r in good)


def spy_submissions(monkeypatch, predictor, record):
    """Record what each call hands the actor's engine."""
    submit = predictor.server.submit

    def spy(batch, max_new, seeds, budgets=None, **ticket):
        record(batch, max_new, seeds, budgets, ticket)
        return submit(batch, max_new, seeds, budgets, **ticket)

    monkeypatch.setattr(predictor.server, "submit", spy)


def test_refill_feeds_the_window_to_the_actors_engine_with_the_same_texts(setup, monkeypatch):
    """batching.mode = "refill" (the default): a window's sequences go to the actor's engine in one submission
    (run.batch_size slots, seeds from (run.seed, item id, task)); greedy texts equal to static batches'."""
    cfg, decoded, predictor = setup
    assert cfg.batching.mode == "refill" and predictor.server.engine.c.slots == 3
    calls = []
    spy_submissions(monkeypatch, predictor, lambda batch, max_new, seeds, *_: calls.append(
        (len(batch.prompts), len(set(seeds)))))
    refill = predictor(decoded)
    assert calls == [(12, 12)]
    stats = json.loads(refill["_engine"][0].as_py())   # the engine's counters ride on the first row
    assert refill["_engine"].null_count == refill.num_rows - 1
    assert stats["rows"] >= 12 and stats["tokens"] >= 12 and stats["slots"] == 3 and stats["steps"] > 0
    refill = {(r["id"], r["task"]): r["text"] for r in refill.to_pylist()}
    monkeypatch.setattr(cfg.batching, "mode", "static")
    static = {(r["id"], r["task"]): r["text"] for r in predictor(decoded).to_pylist()}
    assert refill == static and len(refill) == 14


def test_calls_in_flight_share_the_engines_slots(setup, monkeypatch):
    """Two windows called at once (as Ray Data's threaded actor does) are admitted into one engine: a slot freed by
    the first window's rows takes the second window's while the first still has rows decoding, so the slots do not
    drain between windows; each call gets exactly its own rows, with the texts a lone call gives."""
    cfg, decoded, predictor = setup
    # ocr rows run longer than caption rows, so that the first window's rows leave the slots at different steps
    monkeypatch.setitem(predictor.specs, "ocr", dataclasses.replace(predictor.specs["ocr"], max_new_tokens=8))
    first, second = decoded.slice(0, 3), decoded.slice(3, 1)
    expected = {(r["id"], r["task"]): r["text"] for w in (first, second) for r in predictor(w).to_pylist()}
    engine = predictor.server.engine
    mixed_rounds = []
    admit = engine._admit

    def spy(admitted):
        # the first round waits until the second window is queued behind the first, as a busy actor's would be
        while not mixed_rounds and len({row.ticket for row in engine.queue} | {row.ticket for _, row in admitted}) < 2:
            threading.Event().wait(0.01)
        decoding = {row.ticket for row in engine.occupant if row is not None}
        mixed_rounds.append(bool(decoding - {row.ticket for _, row in admitted}))
        admit(admitted)

    monkeypatch.setattr(engine, "_admit", spy)
    results = {}
    threads = [threading.Thread(target=lambda w=w, k=k: results.__setitem__(k, predictor(w))) for k, w in
               enumerate((first, second))]
    for t in threads:
        t.start()
        threading.Event().wait(0.2)   # the first window's submission first
    for t in threads:
        t.join()
    got = {k: {(r["id"], r["task"]): r["text"] for r in results[k].to_pylist()} for k in results}
    assert set(got[0]) == {(r["id"], t) for r in first.to_pylist() for t in ("caption", "ocr")}
    assert set(got[1]) == {(r["id"], t) for r in second.to_pylist() for t in ("caption", "ocr")}
    assert {**got[0], **got[1]} == expected
    assert any(mixed_rounds), "a round admitted rows of one window beside rows of the other"


@pytest.mark.parametrize("mode", ["static"])
def test_a_call_whose_kv_cache_would_not_fit_runs_with_fewer_slots(setup, monkeypatch, caplog, mode):
    """On a GPU a static call's slots are capped by the free device memory (faked here): the same texts, fewer
    slots, said once per actor."""
    cfg, decoded, predictor = setup
    monkeypatch.setattr(cfg.batching, "mode", mode)
    expected = {(r["id"], r["task"]): r["text"] for r in predictor(decoded).to_pylist()}
    calls = []
    generate = predictor.model.generate

    def spy(**inputs):
        calls.append((inputs["input_ids"].shape[0], inputs["max_batch_size"]))
        return generate(**inputs)

    monkeypatch.setattr(predictor.model, "generate", spy)
    two_slots = predictor.model.cache_bytes(2, 256) / predictor_mod.KV_SHARE   # every call here fits in 256
    monkeypatch.setattr(predictor_mod, "free_device_bytes", lambda device: two_slots + 1)
    monkeypatch.setattr(predictor, "capped", False)
    with caplog.at_level("WARNING", logger="pipeline.predictor"):
        capped = {(r["id"], r["task"]): r["text"] for r in predictor(decoded).to_pylist()}
    assert capped == expected
    assert calls == ([(12, 2)] if mode == "refill" else [(3, 2)] * 4)
    warned = [r.getMessage() for r in caplog.records if "decode slots" in r.getMessage()]
    assert len(warned) == 1 and "runs with 2 decode slots, not 3" in warned[0]
    calls.clear()   # an actor on half a GPU takes half the share: its neighbour sees the same free memory
    monkeypatch.setattr(predictor, "kv_share", predictor_mod.KV_SHARE * 0.5)
    assert {(r["id"], r["task"]): r["text"] for r in predictor(decoded).to_pylist()} == expected
    assert calls == ([(12, 1)] if mode == "refill" else [(3, 1)] * 4)


def test_on_a_gpu_the_engines_kv_pool_is_sized_to_the_free_memory(setup, monkeypatch):
    """Refill mode on a GPU (free memory faked): the actor's engine gets a fixed pool of KV_SHARE of the free memory
    in 256-position blocks, here 3 blocks for 3 slots, so rows wait for blocks (and may be preempted), and every
    row still ends with the text an unlimited pool gives."""
    cfg, decoded, predictor = setup
    expected = {(r["id"], r["task"]): r["text"] for r in predictor(decoded).to_pylist()}
    three_blocks = predictor.model.cache_bytes(3, 256) / predictor_mod.KV_SHARE
    monkeypatch.setattr(predictor_mod, "free_device_bytes", lambda device: three_blocks + 1)
    on_gpu = Predictor(cfg)
    assert (on_gpu.server.engine.c.kv_blocks, on_gpu.server.engine.block_size) == (3, 256)
    got = on_gpu(decoded)
    assert {(r["id"], r["task"]): r["text"] for r in got.to_pylist()} == expected
    assert json.loads(got["_engine"][0].as_py())["kv_blocks"] == 4   # and the scratch block


def test_batch_size_auto_is_64_slots_on_a_gpu_and_8_on_cpu(tiny_gqa, tmp_path):
    assert config.decode_slots("auto", on_gpu=True) == 64 and config.decode_slots("auto", on_gpu=False) == 8
    assert config.decode_slots(5, on_gpu=True) == 5
    cfg = config.from_dict({"input": {"uri": str(tmp_path)}, "output": {"uri": str(tmp_path / "out")},
                            "model": {"path": str(tiny_gqa)}})
    assert cfg.run.batch_size == "auto" and Predictor(cfg).slots == 8   # this machine has no GPU
    half = dataclasses.replace(cfg, actors=dataclasses.replace(cfg.actors, num_gpus=0.5))
    assert Predictor(half).kv_share == predictor_mod.KV_SHARE * 0.5


@pytest.mark.parametrize("mode", ["refill", "static"])
def test_a_failing_window_is_retried_row_by_row(setup, monkeypatch, mode):
    """The 60x60 image fails in the vision tower: the window (refill: its engine ticket; static: its batch) fails,
    its sequences run again one by one (refill: each alone in the engine), and only that image's rows are errors."""
    _, decoded, predictor = setup
    monkeypatch.setattr(setup[0].batching, "mode", mode)
    poison = decoded.to_pylist()[1]["frames_shape"]   # the 60x60 image
    encode = predictor.model.encode_vision
    alone = []

    def flaky(pixels=None, grid=None, *rest):
        if grid is not None and (1, poison[1] // 14, poison[2] // 14) in [tuple(g) for g in grid.tolist()]:
            raise RuntimeError("simulated bad row")
        return encode(pixels, grid, *rest)

    monkeypatch.setattr(predictor.model, "encode_vision", flaky)
    if mode == "refill":
        spy_submissions(monkeypatch, predictor, lambda batch, max_new, seeds, budgets, ticket: alone.append(ticket["exclusive"]))
    rows = predictor(decoded).to_pylist()
    errors = {(r["uri"].rsplit("/", 1)[-1], r["task"]): r["error"] for r in rows if r["error"]}
    assert set(errors) == {("img1.png", "caption"), ("img1.png", "ocr"), ("gone.png", "caption"),
                           ("gone.png", "ocr")}
    assert "model failed (RuntimeError: simulated bad row)" in errors[("img1.png", "ocr")]
    assert sum(r["error"] is None for r in rows) == 10
    if mode == "refill":
        assert alone == [False] + [True] * 12, "the window, then each of its 12 sequences alone"


def test_videos_are_read_through_a_handle_not_whole(setup, tmp_path, monkeypatch):
    """A multi-GB video must not be read into a decode worker's memory: only images go through read_bytes."""
    from pipeline import decode, storage
    from pipeline.corpus import video_bytes

    cfg = setup[0]
    path = tmp_path / "clip.mp4"
    path.write_bytes(video_bytes(num_frames=24, fps=8, width=84, height=56))

    def whole_read(uri, opts):
        raise AssertionError(f"read whole: {uri}")

    monkeypatch.setattr(storage, "read_bytes", whole_read)
    item = Item(item_id(str(path)), str(path), "video", tasks=["caption"])
    row = decode.decode_batch(to_table([item]), DecodeSettings.from_config(cfg)).to_pylist()[0]
    assert row["error"] is None and row["num_frames"] >= 2 and row["duration_s"] == pytest.approx(3.0, abs=0.2)


def test_per_task_thinking_budget_reaches_the_model(setup, tiny_gqa, monkeypatch):
    from glmv.thinking import NO_BUDGET

    cfg, decoded, _ = setup
    budget_cfg = config.from_dict({"input": {"uri": cfg.input.uri}, "output": {"uri": cfg.output.uri},
                                   "model": {"path": str(tiny_gqa)},
                                   "run": {"tasks": ["caption", "ocr"], "batch_size": 4, "max_new_tokens": 3},
                                   "tasks": {"ocr": {"max_thinking_tokens": 2}}})
    predictor = Predictor(budget_cfg)
    calls = []
    spy_submissions(monkeypatch, predictor, lambda batch, max_new, seeds, budgets, _: calls.append(budgets))
    rows = predictor(decoded.slice(0, 2)).to_pylist()
    # two items' caption (no budget) and ocr (budget 2) in one submission
    assert calls == [[NO_BUDGET, 2, NO_BUDGET, 2]]
    assert len(rows) == 4 and all(r["error"] is None for r in rows)


def test_refill_mixes_template_switches_in_one_call(setup, tiny_glm46v, monkeypatch):
    """A thinking task (reasoning) and a plain one (caption) go to the engine in one submission; every row's prompt
    and text equal those of static batches, which render each switch apart."""
    cfg, decoded, _ = setup
    mixed_cfg = config.from_dict({"input": {"uri": cfg.input.uri}, "output": {"uri": cfg.output.uri},
                                  "model": {"path": str(tiny_glm46v)},
                                  "run": {"tasks": ["caption", "reasoning"], "batch_size": 2, "max_new_tokens": 4}})
    predictor = Predictor(mixed_cfg)
    calls = []
    spy_submissions(monkeypatch, predictor, lambda batch, *_: calls.append(len(batch.prompts)))
    generate = predictor.model.generate

    def spy(**inputs):
        calls.append(inputs["input_ids"].shape[0])
        return generate(**inputs)

    monkeypatch.setattr(predictor.model, "generate", spy)

    window = decoded.slice(0, 3)
    tasks = window.schema.get_field_index("tasks")
    window = window.set_column(tasks, window.schema.field(tasks),
                               pa.array([["caption", "reasoning"]] * 3, window.schema.field(tasks).type))

    def run():
        rows = predictor(window).to_pylist()
        return {(r["id"], r["task"]): (r["num_input_tokens"], r["text"]) for r in rows if r["error"] is None}

    refill = run()
    assert calls == [6]
    monkeypatch.setattr(mixed_cfg.batching, "mode", "static")
    calls.clear()
    static = run()
    assert calls == [2, 1, 2, 1]   # static batches never mix switches
    assert refill == static and len(refill) == 6


def test_the_summary_keeps_each_actors_latest_engine_counters_and_adds_them_up():
    """Result blocks carry each call's engine counters on their first row (`_engine`); the driver keeps the latest
    per actor (a later call's counters include the earlier ones), adds actors up, and never writes the column."""
    from pipeline.run import Summary

    def stats(actor, wall, steps, live, busy):
        return json.dumps({"id": actor, "slots": 4, "steps": steps, "live_steps": live, "tokens": live + 10,
                           "rows": 10, "busy_s": busy, "wall_s": wall, "kv_blocks": 9, "kv_block_bytes": 1024,
                           "kv_used_peak_blocks": 6, "preempted": 1, "recomputed": 5})

    def block(values):
        return pa.table({"id": ["a"] * len(values), "error": pa.array([None] * len(values), pa.string()),
                         "num_output_tokens": [1] * len(values), "uri": ["u"] * len(values),
                         "task": ["t"] * len(values), "answer": [""] * len(values), "text": [""] * len(values),
                         "_engine": pa.array(values, pa.string())})

    summary = Summary()
    summary.count(block([stats("x", 10.0, 100, 380, 9.0), None]))
    summary.count(block([stats("y", 20.0, 100, 300, 20.0)]))
    summary.count(block([stats("x", 5.0, 40, 100, 5.0)]))   # an older call of x answered late: ignored
    e = summary.engine
    assert e["actors"] == 2 and e["slots"] == 8 and e["decode_steps"] == 200
    assert e["occupancy"] == pytest.approx(680 / 800) and e["idle_share"] == pytest.approx(1 / 30)
    assert e["tokens_per_s"] == pytest.approx(390 / 10 + 310 / 20) and e["preempted"] == 2
    line = next(x for x in summary.lines("out") if x.startswith("model engines"))
    assert "slot occupancy 85.0%" in line and "idle 3.3%" in line and "2 rows preempted" in line
