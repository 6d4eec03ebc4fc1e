"""glmv on a CUDA GPU: the real GLM-4.1V-9B shapes with random bf16 weights built on the device (no checkpoint).

    .venv/bin/python bench/bench_gpu.py [--batches 1,16,64,128] [--context 1024] [--new-tokens 64] [--images 128]
    .venv/bin/python bench/bench_gpu.py --smoke   # tiny shapes on whatever device there is: checks the script only

Prints, each beside its roofline:
- decode ms/step at each batch size vs the HBM roofline: decoder weight bytes + the batch's KV bytes, over the
  bandwidth of a device-to-device copy measured here; first eager, and last (compile takes a while) with
  compile_decode on (torch.compile + a CUDA graph): its speed-up and how many rows kept the same greedy tokens;
- prefill tokens/s (packed rows) vs the bf16 FLOP roofline (2 x text parameters x tokens + attention, over the
  throughput of a large bf16 matmul measured here);
- vision images/s for ~1 MP images (1036 x 756: 3996 patches, 999 tokens each);
- end to end images/s: `--images` image prompts through vision, prefill and decode with `--new-tokens` new tokens
  each (eos ignored: random weights), refill over 64 slots: eager, and last with compile on;
- feed: a stream of 2 x `--images` image prompts with long-tailed budgets (a third run to 4 x `--new-tokens`, the
  rest stop early), in windows of 64 submitted by 3 threads to one persistent engine (glmv.server) with a fixed KV
  pool of half the free memory, as a model actor runs: slot occupancy, tokens/s, decode steps/s, idle share, KV
  blocks in use, preemptions.
- moe: one GLM-4.5V-shaped MoE block (router, 128 experts of width 1408 choosing 8, a shared expert; hidden 4096)
  on a decode step of batch 1/16/64: ms/step beside the HBM roofline of the parameters that step reads (the
  router, the shared expert and each expert chosen at least once), in bf16 (grouped_mm where torch has it for the
  GPU, and the loop over experts with tokens) and FP8 kept with block scales where the GPU has FP8 (sm89+).
Each part prints its own wall time; `--skip` leaves parts out.
Figures are for random weights, so outputs are meaningless; the shapes and the work are the real model's.
"""

from __future__ import annotations

import argparse
import math
import time

import torch


DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def build_model(config, device=DEVICE, dtype=torch.bfloat16):
    """Glm4vForConditionalGeneration with random unit-gain weights, made in `dtype` on the device (for the 9B
    shapes: ~20 GB, no float32 copy)."""
    import glmv
    from glmv.weights import build_on_meta

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # parameters are created in dtype (the rotary tables stay float32)
    try:
        model = build_on_meta(glmv.Glm4vForConditionalGeneration, config).to_empty(device=device)
    finally:
        torch.set_default_dtype(default)
    g = torch.Generator(device=device).manual_seed(0)
    for name, p in model.named_parameters():
        noise = torch.randn(p.shape, generator=g, device=device, dtype=dtype)
        if p.dim() == 1:
            p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
        else:
            p.copy_(noise * (1.0 if "embed" in name else 1 / math.sqrt(math.prod(p.shape[1:]))))
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers(device)
    model.eval().requires_grad_(False)
    model.generation_config = {"eos_token_id": [], "pad_token_id": config.text.pad_token_id}
    return model


def copy_bandwidth(gib: float = 2.0) -> float:
    """Bytes/s of a large device-to-device copy (read + write), best of a few."""
    x = torch.empty(int(gib * 2**30), dtype=torch.uint8, device=DEVICE)
    y = torch.empty_like(x)
    best = min(timed(lambda: y.copy_(x))[0] for _ in range(5))
    return 2 * x.numel() / best


def matmul_flops(n: int = 8192, dtype=torch.bfloat16) -> float:
    """FLOP/s of a large matmul in the model's dtype, best of a few."""
    a = torch.randn(n, n, dtype=dtype, device=DEVICE)
    b = torch.randn(n, n, dtype=dtype, device=DEVICE)
    best = min(timed(lambda: [a @ b for _ in range(10)])[0] for _ in range(5)) / 10
    return 2 * n**3 / best


def text_prompts(model, rows: int, length: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1000, 100000, (rows, length), generator=g)
    return {"input_ids": ids.to(DEVICE), "attention_mask": torch.ones_like(ids).to(DEVICE)}


def image_prompts(model, images: int, grid=(1, 54, 74), prompt_tokens: int = 12, seed: int = 0):
    """Image prompts in the GLM-4.1V template's token layout, with random pixels."""
    c = model.config
    g = torch.Generator().manual_seed(seed)
    n_image = math.prod(grid) // c.vision.spatial_merge_size ** 2
    head = [151331, 151333, 151336, 198, c.image_start_token_id]  # [gMASK] <sop> <|user|> \n <|begin_of_image|>
    rows = []
    for _ in range(images):
        prompt = torch.randint(1000, 100000, (prompt_tokens,), generator=g).tolist()
        rows.append(head + [c.image_token_id] * n_image + [c.image_end_token_id] + prompt + [151337, 198])
    ids = torch.tensor(rows)
    patch = 3 * c.vision.temporal_patch_size * c.vision.patch_size ** 2
    pixels = torch.randn(images * math.prod(grid), patch, generator=g)
    return {"input_ids": ids.to(DEVICE), "attention_mask": torch.ones_like(ids).to(DEVICE),
            "pixel_values": pixels.to(DEVICE, model.dtype), "image_grid_thw": torch.tensor([grid] * images)}


def timed(fn):
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


def decode_sweep(model, args, bandwidth, compiled: bool, eager: dict | None = None) -> dict:
    """ms/step and greedy tokens per batch size; with `eager` (the sweep without compile) also the speed-up and how
    many rows kept the same tokens."""
    cfg = model.config.text
    decoder = sum(p.numel() * p.element_size() for p in model.model.language_model.layers.parameters())
    decoder += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    kv_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim * model.dtype.itemsize
    print(f"\ndecode ({args.context}-token context, {args.new_tokens} new tokens, compile_decode={compiled}); "
          f"memory {bandwidth / 1e12:.2f} TB/s (device copy), decoder weights {decoder / 2**30:.2f} GiB")
    print(f"{'batch':>6} {'ms/step':>8} {'roofline ms':>12} {'of roofline':>12} {'tokens/s':>10}"
          + (f" {'vs eager':>9} {'same rows':>10}" if eager else ""), flush=True)
    results = {}
    for batch in args.batches:
        inputs = text_prompts(model, batch, args.context)
        # the same call first: with compile on, any other shape would be compiled again inside the timed run
        model.generate(**inputs, max_new_tokens=args.new_tokens, compile_decode=compiled)
        out = model.generate(**inputs, max_new_tokens=args.new_tokens, compile_decode=compiled,
                             return_dict_in_generate=True)
        step_s = max(r.decode_s for r in out.rows) / (args.new_tokens - 1)
        results[batch] = (step_s, out.sequences)
        kv = batch * (args.context + args.new_tokens / 2) * kv_token
        roof = (decoder + kv) / bandwidth
        line = f"{batch:>6} {1000 * step_s:8.2f} {1000 * roof:12.2f} {roof / step_s:11.0%} {batch / step_s:10.0f}"
        if eager:
            eager_s, eager_seq = eager[batch]
            same = sum(torch.equal(a, b) for a, b in zip(eager_seq, out.sequences))
            line += f" {eager_s / step_s:8.2f}x {f'{same}/{batch}':>10}"
        print(line, flush=True)
    if eager:
        print("(same rows: greedy tokens identical to the eager sweep; in bf16 near-ties may flip)")
    return results


def prefill(model, args, flops):
    cfg = model.config.text
    params = sum(p.numel() for p in model.model.language_model.layers.parameters()) + model.lm_head.weight.numel()
    print(f"\nprefill (packed rows); {model.dtype} matmul {flops / 1e12:.1f} TFLOP/s measured")
    print(f"{'rows x tokens':>14} {'s':>7} {'tokens/s':>10} {'roofline tokens/s':>18} {'of roofline':>12}")
    for rows, length in args.prefill_shapes:
        inputs = text_prompts(model, rows, length, seed=2)
        model.generate(**inputs, max_new_tokens=1)
        seconds = model.generate(**inputs, max_new_tokens=1, return_dict_in_generate=True).rows[0].prefill_s
        tokens = rows * length
        # matmuls + causal attention (QK^T and PV: 2 * 2 * L^2/2 * H * Dh per row and layer)
        work = 2 * params * tokens + rows * cfg.num_hidden_layers * 2 * length**2 * cfg.hidden_size
        print(f"{f'{rows} x {length}':>14} {seconds:7.3f} {tokens / seconds:10.0f} {tokens * flops / work:18.0f} "
              f"{work / flops / seconds:11.0%}")


def vision(model, args, images: int = 16):
    inputs = image_prompts(model, images, grid=args.grid)
    encode = lambda: model.encode_vision(inputs["pixel_values"], inputs["image_grid_thw"])  # noqa: E731
    encode()
    seconds, _ = timed(encode)
    _, h, w = args.grid
    print(f"\nvision: {images} images of {w * 14} x {h * 14} px ({h * w} patches each) in {seconds:.3f}s: "
          f"{images / seconds:.1f} images/s")


def end_to_end(model, args, compiled: bool):
    inputs = image_prompts(model, args.images, grid=args.grid, seed=3)
    slots = min(64, args.images)
    kw = dict(max_new_tokens=args.new_tokens, max_batch_size=slots, compile_decode=compiled)
    model.generate(**inputs, **kw)  # the same call first, so that the timed one compiles nothing
    seconds, out = timed(lambda: model.generate(**inputs, **kw))
    print(f"\nend to end: {args.images} images x {args.new_tokens} new tokens, refill over {slots} slots, "
          f"compile_decode={compiled}: "
          f"{seconds:.1f}s, {args.images / seconds:.2f} images/s, {args.images * args.new_tokens / seconds:.0f} "
          f"generated tokens/s")


def feed(model, args):
    """Windows of image prompts with long-tailed budgets through one engine fed by 3 threads (a model actor's calls
    in flight), its pool fixed to half the free memory as the actor sizes it."""
    import dataclasses
    from concurrent.futures import ThreadPoolExecutor

    from glmv.engine import BLOCK_SIZE, Engine
    from glmv.generate import engine_config, prompt_batch
    from glmv.server import EngineServer

    slots, limit = min(64, args.images), 4 * args.new_tokens
    config = engine_config(model, slots)
    if DEVICE == "cuda":
        block = BLOCK_SIZE["cuda"]
        free = torch.cuda.mem_get_info()[0]
        config = dataclasses.replace(config, kv_blocks=int(free * 0.5 // model.cache_bytes(1, block)),
                                     block_size=block)
    g = torch.Generator().manual_seed(7)
    windows = [image_prompts(model, slots, grid=args.grid, seed=20 + w) for w in range(2 * args.images // slots)]
    u = torch.rand(len(windows), slots, generator=g)
    budgets = torch.where(u < 1 / 3, limit, (limit * (u - 1 / 3) ** 2).long() + 1).tolist()  # a long tail
    server = EngineServer(Engine(model, config, max_new=limit))

    def call(w):
        with torch.inference_mode():
            return server.submit(prompt_batch(model, **windows[w]), budgets[w], list(range(slots))).wait()

    with ThreadPoolExecutor(3) as pool:
        seconds, outputs = timed(lambda: list(pool.map(call, range(len(windows)))))
    s = server.stats()
    server.close()
    tokens = sum(len(o.tokens) for window in outputs for o in window)
    print(f"\nfeed: {len(windows) * slots} image prompts in {len(windows)} windows from 3 threads, {slots} slots, "
          f"budgets up to {limit} (a third at the limit): {seconds:.1f}s, {tokens / seconds:.0f} tokens/s, slot "
          f"occupancy {100 * s['live_steps'] / max(1, s['steps'] * slots):.1f}%, {s['steps'] / seconds:.1f} decode "
          f"steps/s, idle {100 * (1 - s['busy_s'] / s['wall_s']):.1f}% of engine time, KV pool {s['kv_blocks']} "
          f"blocks of {s['kv_block_bytes'] / 2**20:.1f} MiB (peak {s['kv_used_peak_blocks']} in use), "
          f"{s['preempted']} rows preempted")


def moe_block(text_cfg, dtype, fp8_block=None):
    """glmv.moe.MoeMLP with random unit-gain weights on the device; FP8 experts (block-quantized per expert) when
    fp8_block is given."""
    from glmv import fp8
    from glmv.moe import MoeMLP

    with torch.device("meta"):
        mlp = MoeMLP(text_cfg)
    if fp8_block:
        mlp.experts.to_fp8(fp8_block)
    g = torch.Generator(device=DEVICE).manual_seed(0)

    def unit(*shape):
        return (torch.randn(shape, generator=g, device=DEVICE) / math.sqrt(shape[-1])).to(dtype)

    m, D = text_cfg.moe, text_cfg.hidden_size
    mlp.gate.weight = torch.nn.Parameter(unit(m.n_routed_experts, D), requires_grad=False)
    mlp.gate.e_score_correction_bias = torch.zeros(m.n_routed_experts, device=DEVICE)
    shared = m.moe_intermediate_size * m.n_shared_experts
    for name, shape in (("gate_proj", (shared, D)), ("up_proj", (shared, D)), ("down_proj", (D, shared))):
        getattr(mlp.shared_experts, name).weight = torch.nn.Parameter(unit(*shape), requires_grad=False)
    shapes = {"gate_up_proj": (2 * m.moe_intermediate_size, D), "down_proj": (D, m.moe_intermediate_size)}
    for name, shape in shapes.items():
        weights, scales = [], []
        for _ in range(m.n_routed_experts):  # one expert at a time: the float32 drafts of all 128 would not fit
            w = unit(*shape)
            if fp8_block:
                parts = w.chunk(2) if name == "gate_up_proj" else (w,)
                pieces = [fp8.quantize(part, fp8_block) for part in parts]
                w = torch.cat([q for q, _ in pieces])
                scales.append(torch.cat([s for _, s in pieces]))
            weights.append(w)
        setattr(mlp.experts, name, torch.nn.Parameter(torch.stack(weights), requires_grad=False))
        if fp8_block:
            setattr(mlp.experts, name + fp8.SCALE, torch.stack(scales))
    return mlp.eval()


def moe_decode(text_cfg, bandwidth, batches, steps: int = 20, smoke: bool = False):
    """ms per decode step of one MoE block against the HBM roofline of the weights the step reads (smoke: the FP8
    variant on any device, to check the script)."""
    from glmv import moe

    m, D = text_cfg.moe, text_cfg.hidden_size
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    has_fp8 = DEVICE == "cuda" and torch.cuda.get_device_capability() >= (8, 9)
    variants = [("bf16" if DEVICE == "cuda" else "fp32", None, True), ("loop", None, False)]
    variants += [("fp8", (128, 128), False)] if has_fp8 or smoke else []
    print(f"\nMoE block: {m.n_routed_experts} experts x {m.moe_intermediate_size} wide, top {m.num_experts_per_tok}, "
          f"{m.n_shared_experts} shared, hidden {D}; memory {bandwidth / 1e12:.2f} TB/s"
          + ("" if has_fp8 else " (no FP8 here)"))
    print(f"{'variant':>8} {'batch':>6} {'experts hit':>12} {'ms/step':>8} {'roofline ms':>12} {'of roofline':>12}")
    per_expert = 3 * m.moe_intermediate_size * D
    for label, block, grouped in variants:
        mlp = moe_block(text_cfg, dtype, block)
        weight_bytes = 1 if block else dtype.itemsize
        for batch in batches:
            x = torch.randn(batch, D, generator=torch.Generator().manual_seed(batch)).to(DEVICE, dtype)
            hit = int(mlp.gate(x)[1].unique().numel())
            active = (hit * per_expert * weight_bytes + per_expert * m.n_shared_experts * dtype.itemsize
                      + m.n_routed_experts * D * dtype.itemsize)
            moe.GROUPED_MM = grouped
            try:
                mlp(x)  # warm-up
                elapsed, _ = timed(lambda: [mlp(x) for _ in range(steps)])
            finally:
                moe.GROUPED_MM = True
            ms, roof = 1e3 * elapsed / steps, 1e3 * active / bandwidth
            print(f"{label:>8} {batch:>6} {hit:>12} {ms:>8.3f} {roof:>12.3f} {roof / ms:>11.0%}", flush=True)


def main() -> None:
    from glmv.config import Glm4vConfig, MoeConfig, TextConfig
    from glmv.testing import PRESETS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", default="1,16,64,128")
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: decode,prefill,vision,e2e,feed,"
                        "moe,compile,e2e-compiled")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, small sizes: checks that the script runs")
    args = parser.parse_args()
    args.batches = [int(b) for b in args.batches.split(",")]
    args.grid, args.prefill_shapes, config = (1, 54, 74), [(1, 4096), (8, 1024), (16, 2048)], Glm4vConfig()
    moe_text, moe_batches = TextConfig(moe=MoeConfig()), [1, 16, 64]  # GLM-4.5V's MoE block
    if args.smoke:
        args.batches, args.context, args.new_tokens, args.images = [1, 4], 48, 6, 4
        args.grid, args.prefill_shapes, config = (1, 8, 8), [(2, 64)], PRESETS["gqa"]
        moe_text, moe_batches = PRESETS["moe"].text, [1, 4]
    elif DEVICE != "cuda":
        raise SystemExit("bench_gpu.py needs a CUDA device (torch.cuda.is_available() is False); --smoke runs tiny "
                         "shapes anywhere")
    args.compile = DEVICE == "cuda"  # on CPU torch.compile cannot trace glmv's default fast path: off there
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float32
    skip = set(args.skip.split(",")) - {""}
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu"
    print(f"device: {name}, torch {torch.__version__}{' (smoke: tiny shapes)' if args.smoke else ''}")
    t0 = time.perf_counter()
    with torch.no_grad():
        model = build_model(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"{'tiny' if args.smoke else 'GLM-4.1V-9B'} shapes, random {dtype} weights: {params:.2f} B parameters "
          f"built in {time.perf_counter() - t0:.1f}s")
    size = 0.0625 if args.smoke else 2.0
    bandwidth, flops = copy_bandwidth(size), matmul_flops(1024 if args.smoke else 8192, dtype)
    # the cheap, eager figures first: what a compile costs on the 9B shapes is unknown until measured here
    eager = {}
    parts = {"decode": lambda: eager.update(decode_sweep(model, args, bandwidth, compiled=False)),
             "prefill": lambda: prefill(model, args, flops), "vision": lambda: vision(model, args),
             "e2e": lambda: end_to_end(model, args, compiled=False), "feed": lambda: feed(model, args),
             "moe": lambda: moe_decode(moe_text, bandwidth, moe_batches, smoke=args.smoke),
             "compile": lambda: decode_sweep(model, args, bandwidth, compiled=True, eager=eager),
             "e2e-compiled": lambda: end_to_end(model, args, compiled=True)}
    for part, run in parts.items():
        if part in skip or (part in ("compile", "e2e-compiled") and not args.compile):
            continue
        started = time.perf_counter()
        run()
        print(f"[{part}: {time.perf_counter() - started:.0f}s]", flush=True)
    if DEVICE == "cuda":
        print(f"\npeak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
