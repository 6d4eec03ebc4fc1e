"""glmv on CUDA (tests marked `gpu`, skipped without a CUDA device; `make gpu-check` runs them and bench_gpu.py).

Tolerances: bfloat16 logits are compared with float32 transformers logits on the same inputs, against the error
of transformers' own bfloat16 run: glmv's error may be at most 2x transformers' + 0.05 (bfloat16 keeps 8 bits of
mantissa; its error grows with depth and differs by kernel, so an absolute bound alone would be arbitrary).
Token equality (compile on vs off, refill vs static, shared prefix vs alone) is checked in float32, where kernels
agree to ~1e-6; in bfloat16 a different batch shape or kernel rounds differently and a near-tie may flip.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import glmv
from test_engine import item_batch, new_tokens  # noqa: F401  (item_batch is a fixture)
from test_model_parity import mixed_batch, reference_logits, write_video

transformers = pytest.importorskip("transformers")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def video_path(tmp_path_factory):
    return write_video(tmp_path_factory.mktemp("media") / "clip.mp4", frames=24, fps=8)


def on_cuda(inputs):
    return {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}


def last_token_logits(logits, inputs):
    return logits[:, -1].float()  # left-padded: every row's last position is real


def load_on_cuda(checkpoint):
    """transformers in float32 (the truth) and bfloat16, and glmv in bfloat16, of the class the checkpoint's
    model_type names (GLM-4.1V or GLM-OCR)."""
    auto = transformers.AutoModelForImageTextToText
    ref32 = auto.from_pretrained(checkpoint, dtype=torch.float32).cuda().eval()
    ref16 = auto.from_pretrained(checkpoint, dtype=torch.bfloat16).cuda().eval()
    ours = glmv.AutoModelForImageTextToText.from_pretrained(checkpoint, dtype=torch.bfloat16, device="cuda")
    return ref32, ref16, ours


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("preset", ["tiny_gqa", "tiny_ocr"])
def test_bf16_logits_match_transformers_on_cuda(preset, video_path, request):
    checkpoint = request.getfixturevalue(preset)
    inputs = on_cuda(mixed_batch(checkpoint, video_path))
    valid = inputs["attention_mask"].bool()
    ref32, ref16, ours = load_on_cuda(checkpoint)
    truth = reference_logits(ref32, inputs).float()
    with torch.no_grad():
        theirs = reference_logits(ref16, inputs).float()
        got = ours(**inputs).logits.float()
    err_ref = (theirs - truth)[valid].abs().max().item()
    err_ours = (got - truth)[valid].abs().max().item()
    print(f"bf16 max |logits - fp32 transformers|: glmv {err_ours:.3f}, transformers {err_ref:.3f}")
    assert err_ours <= 2 * err_ref + 0.05


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("attention", ["auto", "sdpa"])
@pytest.mark.parametrize("preset", ["tiny_gqa", "tiny_ocr"])
def test_bf16_engine_logits_match_transformers(preset, video_path, attention, monkeypatch, request):
    """The engine's packed prefill (flash varlen on CUDA, or SDPA) and CUDA-graph decode give each row's next-token
    logits as close to float32 transformers as transformers' own bfloat16 forward (GLM-OCR too: head_dim 48)."""
    monkeypatch.setenv("GLMV_ATTENTION", attention)
    checkpoint = request.getfixturevalue(preset)
    inputs = on_cuda(mixed_batch(checkpoint, video_path))
    ref32, ref16, ours = load_on_cuda(checkpoint)
    truth = last_token_logits(reference_logits(ref32, inputs), inputs)
    with torch.no_grad():
        theirs = last_token_logits(reference_logits(ref16, inputs), inputs)
    captured = []
    prefill = ours.prefill

    def spy(*args, **kwargs):
        logits = prefill(*args, **kwargs)
        if logits is not None:
            captured.append(logits.float())
        return logits

    monkeypatch.setattr(ours, "prefill", spy)
    ours.generate(**inputs, max_new_tokens=3, compile_decode=True)
    got = torch.cat(captured)
    err_ref, err_ours = (theirs - truth).abs().max().item(), (got - truth).abs().max().item()
    print(f"{attention}: bf16 next-token logits vs fp32: glmv {err_ours:.3f}, transformers {err_ref:.3f}")
    assert err_ours <= 2 * err_ref + 0.05


@pytest.mark.gpu
@cuda
def test_float32_tokens_equal_across_compile_refill_and_prefix_modes(tiny_gqa, video_path, item_batch):  # noqa: F811
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, dtype=torch.float32, device="cuda")
    inputs = on_cuda(mixed_batch(tiny_gqa, video_path))
    T = inputs["input_ids"].shape[1]
    kw = dict(max_new_tokens=24, return_dict_in_generate=True)
    eager = new_tokens(model.generate(**inputs, **kw), T)
    assert new_tokens(model.generate(**inputs, compile_decode=True, **kw), T) == eager
    assert new_tokens(model.generate(**inputs, max_batch_size=2, compile_decode=True, **kw), T) == eager
    batch, alone = item_batch
    shared = new_tokens(model.generate(**on_cuda(batch), max_batch_size=2, compile_decode=True, **kw),
                        batch["input_ids"].shape[1])
    for row, single in zip(shared, alone):
        assert row == new_tokens(model.generate(**on_cuda(single), **kw), single["input_ids"].shape[1])[0]


@pytest.mark.gpu
@cuda
def test_bf16_compiled_refill_runs_and_mostly_agrees(tiny_gqa, item_batch):  # noqa: F811
    """bf16 end to end (vision, flash varlen prefill, CUDA-graph decode): the same text as eager static on most rows."""
    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, dtype=torch.bfloat16, device="cuda")
    batch = on_cuda(item_batch[0])
    T = batch["input_ids"].shape[1]
    kw = dict(max_new_tokens=16, return_dict_in_generate=True)
    eager = new_tokens(model.generate(**batch, share_prefix=False, **kw), T)
    graphed = new_tokens(model.generate(**batch, max_batch_size=3, compile_decode=True, **kw), T)
    same = sum(a == b for a, b in zip(eager, graphed))
    print(f"bf16 rows identical, eager static vs compiled refill + prefix: {same}/{len(eager)}")
    assert same >= len(eager) - 1


def test_bench_gpu_script_runs_on_tiny_shapes():
    """bench_gpu.py --smoke: every part of the GPU benchmark, on tiny shapes, on whatever device is here."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--smoke"], capture_output=True,
                         text=True, timeout=300, cwd=REPO, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    for heading in ("decode (", "prefill (packed rows)", "vision:", "end to end:", "feed:"):
        assert heading in out.stdout


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("dtype, block, new", [(torch.float32, 16, 40), (torch.bfloat16, 256, 300)])
def test_a_small_kv_pool_preempts_and_recomputes_on_cuda(tiny_gqa, item_batch, dtype, block, new):  # noqa: F811
    """A fixed pool smaller than 3 slots x the longest row: float32 runs SDPA over blocks gathered through the
    tables (tokens exact), bfloat16 flash varlen over the block tables in 256-position blocks (the same text as an
    unlimited pool on most rows); rows are preempted and recomputed, every row completes."""
    import dataclasses

    from glmv.engine import Engine
    from glmv.generate import engine_config, prompt_batch

    model = glmv.Glm4vForConditionalGeneration.from_pretrained(tiny_gqa, dtype=dtype, device="cuda")
    batch = on_cuda(item_batch[0])
    out = model.generate(**batch, max_batch_size=3, max_new_tokens=new, eos_token_id=[], return_dict_in_generate=True)
    expected = new_tokens(out, batch["input_ids"].shape[1])
    prompt = max(r.num_prompt_tokens for r in out.rows)
    blocks = 2 * -(-(prompt + 1) // block) + 1   # two prompts and a block to grow: the rows outgrow it
    assert blocks < 3 * -(-(prompt + new) // block)
    config = dataclasses.replace(engine_config(model, 3, eos_token_id=[]), kv_blocks=blocks, block_size=block)
    engine = Engine(model, config)
    ticket = engine.add(prompt_batch(model, **batch), [new] * 6, list(range(6)))
    with torch.inference_mode():
        engine.run()
    got = [o.tokens for o in ticket.wait()]
    same = sum(a == b for a, b in zip(got, expected))
    print(f"{dtype}: {engine.stats.preempted} preemptions, rows identical to an unlimited pool: {same}/6")
    assert engine.stats.preempted >= 1 and all(len(t) == new for t in got)
    assert same == 6 if dtype == torch.float32 else same >= 5
