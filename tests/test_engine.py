"""The generation engine: shared prefixes, per-(item, task) seeds in every mode, the thinking budget, the module
contract of the CPU fast path, and the library's import graph."""

import ast
from pathlib import Path

import pytest
import torch

import glmv
from glmv.engine import Engine
from glmv.sampling import row_seed
from glmv.thinking import ThinkingMarkers, markers_for_checkpoint
from test_model_parity import random_image

PROMPTS = ["Describe this image.", "Read all the text in the image.", "Give a short caption."]


def conversation(image, prompt):
    content = [{"type": "image", "image": image}] if image is not None else []
    return [{"role": "user", "content": content + [{"type": "text", "text": prompt}]}]


@pytest.fixture(scope="module")
def item_batch(tiny_gqa):
    """Rows: image A x 3 tasks, image B x 1 task, a text-only row, image A's first task again at the end."""
    processor = glmv.Glm4vProcessor.from_pretrained(tiny_gqa)
    a, b = random_image(84, 112, 11), random_image(56, 56, 12)
    conversations = [conversation(a, p) for p in PROMPTS] + [conversation(b, PROMPTS[0]),
                                                             conversation(None, "Tell me a story."),
                                                             conversation(a, PROMPTS[1])]
    batch = processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=True,
                                          return_dict=True, return_tensors="pt", padding=True)
    alone = [processor.apply_chat_template([c], add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", padding=True) for c in conversations]
    return batch, alone


def new_tokens(out, prompt_len):
    return [out.sequences[i, prompt_len:prompt_len + r.num_generated_tokens].tolist() for i, r in enumerate(out.rows)]


def spy(monkeypatch, obj, name, record):
    original = getattr(obj, name)

    def wrapper(*args, **kwargs):
        record(*args, **kwargs)
        return original(*args, **kwargs)

    monkeypatch.setattr(obj, name, wrapper)


def test_shared_prefix_rows_equal_the_same_rows_alone(tiny_gqa, item_batch, monkeypatch):
    batch, alone = item_batch
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    settings = dict(max_new_tokens=24, eos_token_id=[], return_dict_in_generate=True)
    expected = [new_tokens(model.generate(**row, **settings), row["input_ids"].shape[1])[0] for row in alone]

    encoded, prefilled = [], []
    spy(monkeypatch, model, "encode_vision", lambda pixels=None, grid=None, *rest: encoded.append(
        0 if grid is None else len(grid)) or None)
    spy(monkeypatch, model, "prefill", lambda x, *rest, **kw: prefilled.append(x.shape[0]))
    out = model.generate(**batch, max_batch_size=2, **settings)
    assert new_tokens(out, batch["input_ids"].shape[1]) == expected
    assert sum(encoded) == 2, "image A (four rows) and image B are each encoded once"
    lengths = [r.num_prompt_tokens for r in out.rows]
    image_tokens = int((batch["mm_token_type_ids"][0] == 1).sum())
    assert sum(prefilled) <= sum(lengths) - 3 * image_tokens, "A's prefix is prefilled once for its four rows"


def test_media_are_shared_only_when_identical(tiny_gqa):
    from glmv.prompts import build

    processor = glmv.Glm4vProcessor.from_pretrained(tiny_gqa)
    a, a_copy, c = random_image(56, 84, 3), random_image(56, 84, 3), random_image(56, 84, 4)  # c: same size as a
    inputs = processor([f"<|begin_of_image|><|image|><|end_of_image|>{t}" for t in ("x y", "x z", "x y")],
                       images=[a, a_copy, c], return_tensors="pt", padding=True)
    valid = inputs["attention_mask"].bool()
    batch = build(inputs["input_ids"], valid, inputs["mm_token_type_ids"], inputs["pixel_values"],
                  inputs["image_grid_thw"])
    assert len(batch.media) == 2 and [p.media for p in batch.prompts] == [[0], [0], [1]]
    assert [g.members for g in batch.groups] == [[0, 1]]
    first, second = batch.prompts[0], batch.prompts[1]
    differs = int((first.ids != second.ids).nonzero()[0])  # the last word
    assert first.media_end < batch.groups[0].length == differs < first.length
    alone = build(inputs["input_ids"], valid, inputs["mm_token_type_ids"], inputs["pixel_values"],
                  inputs["image_grid_thw"], share_prefix=False)
    assert alone.groups == [] and len(alone.media) == 2


def test_many_same_size_images_are_matched_without_comparing_each_with_every_other(tiny_gqa, monkeypatch):
    """A window of same-size images x 3 tasks: each duplicate is compared in full once (with its own first copy),
    never with the other images of its size (which was quadratic in the window)."""
    from glmv.prompts import build

    processor = glmv.Glm4vProcessor.from_pretrained(tiny_gqa)
    images = [random_image(56, 56, seed) for seed in range(30)]
    rows = [(img, task) for img in images for task in ("x", "y", "z")]
    inputs = processor([f"<|begin_of_image|><|image|><|end_of_image|>{task}" for _, task in rows],
                       images=[img for img, _ in rows], return_tensors="pt", padding=True)
    compared = []
    real_equal = torch.equal
    monkeypatch.setattr(torch, "equal", lambda a, b: compared.append(1) or real_equal(a, b))
    batch = build(inputs["input_ids"], inputs["attention_mask"].bool(), inputs["mm_token_type_ids"],
                  inputs["pixel_values"], inputs["image_grid_thw"])
    assert len(batch.media) == 30 and [p.media[0] for p in batch.prompts] == [i // 3 for i in range(90)]
    assert len(compared) == 60


def test_seeded_samples_depend_on_seed_item_and_task_only(tiny_gqa, item_batch):
    batch, alone = item_batch
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    settings = dict(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.98, eos_token_id=[],
                    repetition_penalty=1.1, return_dict_in_generate=True)
    items = ["a", "a", "a", "b", "t", "a2"]  # the last row repeats item a's second task as another item
    tasks = ["caption", "ocr", "short", "caption", "story", "ocr"]
    seeds = [row_seed(7, item, task) for item, task in zip(items, tasks)]
    T = batch["input_ids"].shape[1]
    static = new_tokens(model.generate(**batch, seed=seeds, share_prefix=False, **settings), T)
    refill = new_tokens(model.generate(**batch, seed=seeds, max_batch_size=2, **settings), T)
    single = new_tokens(model.generate(**batch, seed=seeds, max_batch_size=1, **settings), T)
    assert static == refill == single
    for i in (0, 3, 4):
        one = model.generate(**alone[i], seed=[seeds[i]], **settings)
        assert new_tokens(one, alone[i]["input_ids"].shape[1])[0] == static[i]
    assert static[1] != static[5], "the same prompt of two items must draw different streams"
    same_item = new_tokens(model.generate(**batch, seed=seeds[:5] + [seeds[1]], **settings), T)
    assert same_item[5] == same_item[1] == static[1]


def test_thinking_budget_closes_the_block_and_the_row_answers(tiny_gqa):
    processor = glmv.Glm4vProcessor.from_pretrained(tiny_gqa)
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    markers = markers_for_checkpoint(tiny_gqa)
    tok = processor.tokenizer
    assert markers == ThinkingMarkers(tok.convert_tokens_to_ids("<think>"),
                                      (tok.convert_tokens_to_ids("</think>"), tok.convert_tokens_to_ids("<answer>")))
    prompts = ["<|user|>\nWhy is the sky blue?<|assistant|>\n<think>", "<|user|>\nHello<|assistant|>\n<think>"]
    inputs = processor(prompts, return_tensors="pt", padding=True)
    T = inputs["input_ids"].shape[1]
    free = model.generate(**inputs, max_new_tokens=20, eos_token_id=[], return_dict_in_generate=True)
    budget = model.generate(**inputs, max_new_tokens=20, eos_token_id=[], max_thinking_tokens=[5, None],
                            return_dict_in_generate=True)
    got = new_tokens(budget, T)
    close = list(markers.close_ids)
    assert close not in [new_tokens(free, T)[0][i:i + 2] for i in range(19)], "the free row should not close"
    assert got[0][:5] == new_tokens(free, T)[0][:5] and got[0][5:7] == close
    assert got[1] == new_tokens(free, T)[1], "a row without a budget is untouched"
    assert [r.finish_reason for r in budget.rows] == ["length", "length"]
    # the answer ends at eos: that row's finish_reason tells that its reasoning was cut
    answer_end = got[0][7]
    ended = model.generate(**inputs, max_new_tokens=20, eos_token_id=[answer_end], max_thinking_tokens=5,
                           return_dict_in_generate=True)
    assert ended.rows[0].finish_reason == "thinking_budget" and ended.rows[0].num_generated_tokens == 8


def test_glm46v_answer_follows_a_newline(tiny_glm46v):
    tok = glmv.Glm4vProcessor.from_pretrained(tiny_glm46v).tokenizer
    markers = markers_for_checkpoint(tiny_glm46v)
    assert markers.close_ids == (tok.convert_tokens_to_ids("</think>"), *tok.encode("\n", add_special_tokens=False))


def test_fast_cpu_model_lists_and_saves_every_weight(tiny_gqa):
    from glmv.cpu_kernels import is_packed

    fast = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    plain = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, fast_cpu=False)
    assert is_packed(fast) and not is_packed(plain)
    assert sum(p.numel() for p in fast.parameters()) == sum(p.numel() for p in plain.parameters())
    # q, k and v of each layer are one packed parameter (one matmul); state_dict still has the checkpoint's keys
    separate = {n for n, _ in plain.named_parameters() if any(f".{p}." in n for p in ("q_proj", "k_proj", "v_proj"))}
    fused = {n for n, _ in fast.named_parameters() if ".qkv_proj." in n}
    assert len(separate) == 3 * len(fused) > 0
    assert {n for n, _ in fast.named_parameters()} - fused == {n for n, _ in plain.named_parameters()} - separate
    ours, theirs = fast.state_dict(), plain.state_dict()
    assert list(ours) == list(theirs) and all(torch.equal(ours[k], theirs[k]) for k in theirs)
    other = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    for p in other.parameters():
        if p.layout == torch.strided:
            p.zero_()
    other.load_state_dict(theirs)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert torch.equal(other(ids).logits, fast(ids).logits)


def test_generation_arguments_are_checked(tiny_gqa):
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    ids = torch.tensor([[3, 4, 5]])
    with pytest.raises(ValueError, match="max_batch_size must be >= 1"):
        model.generate(input_ids=ids, max_batch_size=0)
    with pytest.raises(ValueError, match="max_thinking_tokens must be >= 0"):
        model.generate(input_ids=ids, max_thinking_tokens=-1)
    with pytest.raises(ValueError, match="max_new_tokens: got 2 values for a batch of 1 rows"):
        model.generate(input_ids=ids, max_new_tokens=[3, 4])


def test_engine_keeps_static_shapes(tiny_gqa, monkeypatch):
    """Every decode step of a run sees the same tensor shapes, however rows come and go (CUDA-graph ready)."""
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    shapes = set()
    spy(monkeypatch, model, "decode", lambda tokens, positions, batch: shapes.add(
        (tuple(tokens.shape), tuple(positions.shape), tuple(batch.cache.k[0].shape))))
    ids = torch.tensor([[3, 4, 5, 6], [0, 7, 8, 9], [0, 0, 5, 5]])
    model.generate(input_ids=ids, attention_mask=(ids > 0).long(), max_new_tokens=[3, 9, 5], max_batch_size=2,
                   eos_token_id=[])
    assert len(shapes) == 1 and next(iter(shapes))[0] == (2,)
    assert Engine.__module__ == "glmv.engine"


def test_glmv_has_no_import_cycles():
    """Imports between glmv modules (top level and inside functions) form no cycle: model -> generate -> engine ...
    never back to model."""
    root = Path(glmv.__file__).parent
    graph = {}
    for path in root.glob("*.py"):
        name = path.stem
        deps = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("glmv"):
                target = node.module.split(".")[1] if "." in node.module else None
                deps.update([target] if target else [a.name for a in node.names])
            elif isinstance(node, ast.Import):
                deps.update(a.name.split(".")[1] for a in node.names if a.name.startswith("glmv."))
        graph[name] = {d for d in deps if (root / f"{d}.py").exists() and d != name}
    graph.pop("__init__")

    def visit(node, stack):
        assert node not in stack, f"import cycle: {' -> '.join(stack + [node])}"
        for dep in graph.get(node, ()):
            visit(dep, stack + [node])

    for module in graph:
        visit(module, [])


def reference_varlen_attn(q, k, v, cu_seq_q, cu_seq_k, max_q, max_k, *, window_size=(-1, -1), enable_gqa=False,
                          seqused_k=None, block_table=None, **_):
    """torch.nn.attention.varlen.varlen_attn's documented semantics in plain SDPA, for CPU: sequence i has queries
    cu_seq_q[i]:cu_seq_q[i+1] and its first seqused_k[i] keys, from cu_seq_k[i] of k, or with a block_table from
    the pages block_table[i] of k (pages, page_size, H_kv, Dh) in order; window (-1, 0) is causal aligned to the
    bottom right (the last query sees every key)."""
    out = torch.empty_like(q)
    for i in range(len(cu_seq_q) - 1):
        q0, q1 = int(cu_seq_q[i]), int(cu_seq_q[i + 1])
        if block_table is not None:
            keys, values = (t[block_table[i].long()].flatten(0, 1) for t in (k, v))
        else:
            keys, values = k[int(cu_seq_k[i]):], v[int(cu_seq_k[i]):]
        n_k = int(seqused_k[i]) if seqused_k is not None else int(cu_seq_k[i + 1]) - int(cu_seq_k[i])
        assert q1 - q0 <= max_q and n_k <= max_k
        qi, ki, vi = (t.transpose(0, 1)[None] for t in (q[q0:q1], keys[:n_k], values[:n_k]))
        mask = None
        if tuple(window_size) == (-1, 0):
            mask = torch.arange(n_k)[None, :] <= torch.arange(n_k - (q1 - q0), n_k)[:, None]
        y = torch.nn.functional.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, enable_gqa=enable_gqa)
        out[q0:q1] = y[0].transpose(0, 1)
    return out


def test_flash_varlen_path_gives_the_same_tokens(tiny_gqa, item_batch, monkeypatch):
    """The CUDA path's packing (block tables, per-row key counts, prefix offsets) run on CPU through a reference of
    the kernel's semantics: the same tokens as the SDPA path."""
    from glmv import attention, engine

    batch, _ = item_batch
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    kw = dict(max_new_tokens=12, eos_token_id=[], max_batch_size=3, return_dict_in_generate=True)
    T = batch["input_ids"].shape[1]
    expected = new_tokens(model.generate(**batch, **kw), T)
    calls = []

    def counted(*args, **kwargs):
        calls.append(args[0].shape[0])
        return reference_varlen_attn(*args, **kwargs)

    monkeypatch.setattr(attention, "varlen_attn", counted)
    monkeypatch.setattr(engine, "use_varlen", lambda like: True)
    assert new_tokens(model.generate(**batch, **kw), T) == expected
    assert calls and 3 in calls, "decode steps of 3 slots went through varlen"


def test_a_torch_whose_varlen_lacks_key_counts_or_gqa_runs_sdpa(monkeypatch, caplog):
    """torch 2.9-2.11's varlen_attn takes neither seqused_k nor enable_gqa (calling it with them fails in every
    layer on CUDA): such a torch must run SDPA, and say so once."""
    from types import SimpleNamespace

    from glmv import attention

    def varlen_of_torch_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None,
                             window_size=(-1, -1)):
        raise AssertionError("never called")

    half_on_cuda = SimpleNamespace(is_cuda=True, dtype=torch.bfloat16)  # all use_varlen looks at
    monkeypatch.setattr(attention, "varlen_attn", reference_varlen_attn)
    assert attention.use_varlen(half_on_cuda)
    assert not attention.use_varlen(SimpleNamespace(is_cuda=True, dtype=torch.float32))
    monkeypatch.setattr(attention, "varlen_attn", varlen_of_torch_2_11)
    attention._log_no_varlen.cache_clear()
    with caplog.at_level("WARNING", logger="glmv.attention"):
        assert not attention.use_varlen(half_on_cuda)
        assert not attention.use_varlen(half_on_cuda)
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert "seqused_k" in caplog.records[0].getMessage()
    monkeypatch.setattr(attention, "varlen_attn", None)
    assert not attention.use_varlen(half_on_cuda)
    if tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 14):
        from torch.nn.attention.varlen import varlen_attn
        assert attention.varlen_supported(varlen_attn), "the pinned test torch's kernel takes them all"


def test_prefill_and_vision_passes_are_split_to_fit_their_budgets(tiny_gqa, item_batch, monkeypatch):
    from glmv import engine

    batch, _ = item_batch
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    kw = dict(max_new_tokens=6, eos_token_id=[], max_batch_size=4, return_dict_in_generate=True)
    T = batch["input_ids"].shape[1]
    expected = new_tokens(model.generate(**batch, **kw), T)
    passes, vision = [], []
    spy(monkeypatch, model, "encode_vision", lambda *args: vision.append(1))
    spy(monkeypatch, model, "prefill", lambda x, positions, batch, **kw: passes.append((x.shape[0],
                                                                                      len(batch.lengths))))
    monkeypatch.setattr(engine, "PREFILL_TOKENS", 40)
    monkeypatch.setattr(engine, "VISION_PATCHES", 30)
    assert new_tokens(model.generate(**batch, **kw), T) == expected
    assert len(passes) >= 3 and all(tokens <= 40 or rows == 1 for tokens, rows in passes)
    assert len(vision) >= 2, "image A (48 patches) and B (16) exceed 30 patches together"
    assert any(rows > 1 for _, rows in passes), "short rows still share a pass"
    assert engine.chunks([1, 2, 3, 4], [30, 20, 50, 5], 50) == [[1, 2], [3], [4]]


def test_generating_on_cpu_never_imports_torch_dynamo(tiny_gqa):
    """torch.nn.attention's bias and varlen modules import torch._dynamo: ~2 s of every model actor's start, for
    kernels only CUDA uses. A CPU run with a shared prefix (the lower-right causal mask) must not import it, and the
    mask built instead is the one torch materialises."""
    import subprocess
    import sys

    code = f"""
import sys, torch
from PIL import Image
import glmv
processor = glmv.Glm4vProcessor.from_pretrained({str(tiny_gqa)!r})
model = glmv.Glm4vForConditionalGeneration.from_pretrained({str(tiny_gqa)!r})
image = Image.new("RGB", (56, 56), (200, 30, 30))
convs = [[{{"role": "user", "content": [{{"type": "image", "image": image}}, {{"type": "text", "text": t}}]}}]
         for t in ("caption it", "read the text")]
inputs = processor.apply_chat_template(convs, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt", padding=True)
out = model.generate(**inputs, max_new_tokens=2, do_sample=False, return_dict_in_generate=True)
print(len(out.rows), "torch._dynamo" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr[-3000:]
    from torch.nn.attention.bias import causal_lower_right

    from glmv import attention
    for n, total in ((1, 1), (3, 7), (5, 5)):
        expected = causal_lower_right(n, total)._materialize(torch.device("cpu"))
        assert torch.equal(attention.lower_right_causal(n, total, torch.device("cpu")), expected)


def test_cache_bytes_is_what_new_cache_allocates(tiny_gqa):
    """The pipeline sizes KV memory on a GPU by cache_bytes: it must be the real size of a pool of those positions."""
    for dtype in (torch.float32, torch.bfloat16):
        model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, dtype=dtype)
        cache = model.new_cache(3 * 512 // 16, 16, 3, 32)
        assert model.cache_bytes(3, 512) == sum(t.numel() * t.element_size() for t in cache.k + cache.v)
        assert cache.block_bytes() == model.cache_bytes(1, 16)


def test_a_persistent_engine_serves_callers_in_any_thread(tiny_gqa, item_batch, monkeypatch):
    """glmv.server: rows submitted from several threads at once share one engine's two slots, each caller gets its
    rows as generate gives them, an exclusive ticket's row never shares the slots, and the counters add up (a row
    is live for one decode step per token after its first, which its prefill chose)."""
    import threading

    from glmv.generate import engine_config, prompt_batch
    from glmv.server import EngineServer

    batch, alone = item_batch
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    max_new = [5, 12, 7, 9, 4, 10]
    out = model.generate(**batch, max_new_tokens=max_new, eos_token_id=[], return_dict_in_generate=True)
    expected = new_tokens(out, batch["input_ids"].shape[1])
    engine = Engine(model, engine_config(model, 2, eos_token_id=[]))
    together = []
    admit = engine._admit

    def spy(admitted):
        together.append({row.ticket for row in engine.occupant if row is not None} | {row.ticket for _, row in admitted})
        admit(admitted)

    monkeypatch.setattr(engine, "_admit", spy)
    server = EngineServer(engine)
    tickets = [None] * len(alone)

    def call(i):
        tickets[i] = server.submit(prompt_batch(model, **alone[i]), [max_new[i]], [i], exclusive=i == 4)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(len(alone))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [t.wait(120)[0].tokens for t in tickets] == expected
    assert all(len(group) == 1 for group in together if tickets[4] in group), "the exclusive row ran alone"
    stats = server.stats()
    assert stats["rows"] == 6 and stats["tokens"] == sum(max_new)
    assert stats["live_steps"] == sum(n - 1 for n in max_new) <= stats["steps"] * 2
    server.close()
    with pytest.raises(RuntimeError, match="closed"):
        server.submit(prompt_batch(model, **alone[0]), [2], [0])


def test_a_small_kv_pool_preempts_rows_and_recomputes_the_same_tokens(tiny_gqa, item_batch, capsys):
    """A fixed pool that holds less than slots x the longest row: rows are admitted while blocks are free, the
    youngest row is preempted when one cannot grow, and it runs again from its prompt later. Every row completes
    with the tokens an unlimited pool gives (sampled: its draws depend only on its seed and how far it got), and the
    blocks in use never pass the pool."""
    import dataclasses

    from glmv.generate import engine_config, prompt_batch

    batch, _ = item_batch
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa)
    kw = dict(max_new_tokens=40, eos_token_id=[], do_sample=True, temperature=1.0, top_k=0)
    seeds = list(range(6))
    out = model.generate(**batch, max_batch_size=3, seed=seeds, return_dict_in_generate=True, **kw)
    expected = new_tokens(out, batch["input_ids"].shape[1])
    prompt = max(r.num_prompt_tokens for r in out.rows)
    config = engine_config(model, 3, eos_token_id=[], do_sample=True, temperature=1.0, top_k=0)
    # two prompts and one block to grow: rows outgrow it, and a row alone needs what a waiting group's prefix holds
    config = dataclasses.replace(config, kv_blocks=2 * -(-(prompt + 1) // 16) + 1, block_size=16)
    longest = prompt + 40
    assert config.kv_blocks * 16 < 3 * longest, "the pool holds less than every slot at the longest row"
    engine = Engine(model, config)
    ticket = engine.add(prompt_batch(model, **batch), [40] * 6, seeds)
    with torch.inference_mode():
        engine.run()
    assert [o.tokens for o in ticket.wait()] == expected
    s = engine.stats
    assert s.preempted >= 1 and s.recomputed >= 1
    assert s.kv_used_peak_blocks <= config.kv_blocks and engine.cache.pool.in_use == 0
    # a row longer than the whole pool fails alone, as an input error; the engine goes on
    too_long = engine.add(prompt_batch(model, torch.arange(3, 3 + config.kv_blocks * 16)[None]), [4], [0])
    short = engine.add(prompt_batch(model, torch.arange(3, 13)[None]), [4], [0])
    with torch.inference_mode():
        engine.run()
    with pytest.raises(glmv.InputError, match="cannot hold a row"):
        too_long.wait()
    assert len(short.wait()[0].tokens) == 4
    with capsys.disabled():
        print(f"\nKV pool {config.kv_blocks} blocks x 16 positions ({s.kv_blocks * s.kv_block_bytes} bytes) for 3 slots"
              f" x {longest} positions: peak {s.kv_used_peak_blocks} blocks in use, {s.preempted} preemptions, "
              f"{s.recomputed} tokens recomputed, occupancy {s.occupancy:.2f}")
