"""glmv's static-batch generation vs transformers' generate, same inputs, same model, one run.

    .venv/bin/python bench/bench_generate.py [--images 16] [--batch 8] [--new-tokens 64] [--dtype float32]

A mid-size random model with the real architecture's proportions (the `bench` preset: text 1024 wide x 8 layers,
GQA 8/2, vision 512 x 8 blocks, real patch/merge sizes), 16 images of mixed sizes around 448x448, batches of 8,
64 new tokens with eos ignored. Prints images/s and generated tokens/s for both, their ratio, whether the greedy
tokens are identical, glmv's time split (vision / prefill / decode), decode ms/step beside the memory roofline
(text-decoder weight bytes / measured read bandwidth), and peak RSS.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def read_bandwidth() -> float:
    """Bytes/s for reading a buffer much larger than the caches (best of a few passes)."""
    x = torch.ones(256 * 2**20 // 4)  # 256 MiB of float32
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return x.numel() * 4 / best


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes read per decode step: parameters, plus glmv's oneDNN-packed linear weights (kept as buffers)."""
    from glmv.cpu_kernels import PackedLinear

    total = sum(p.numel() * p.element_size() for p in module.parameters())
    for m in module.modules():
        if isinstance(m, PackedLinear):
            total += m.in_features * m.out_features * 4 + (m.bias.numel() * 4 if m.bias is not None else 0)
    return total


def make_images(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    sizes = [(int(rng.integers(360, 540)), int(rng.integers(360, 540))) for _ in range(n)]
    images = []
    for h, w in sizes:
        # smooth random content (upscaled noise), closer to photos than white noise
        small = rng.integers(0, 255, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((w, h), Image.BICUBIC))
    return images


def build_batches(checkpoint: Path, images, batch: int):
    import transformers

    processor = transformers.AutoProcessor.from_pretrained(checkpoint)
    processor.tokenizer.padding_side = "left"
    prompts = ["Describe this image.", "What is shown in the picture? Read all the text in the image.",
               "Give a short caption.", "Describe the colours and shapes in detail, left to right."]
    batches = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        texts = [processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompts[(start + i) % 4]}]}],
            add_generation_prompt=True, tokenize=False) for i in range(len(chunk))]
        batches.append(processor(text=texts, images=chunk, return_tensors="pt", padding=True))
    return batches


def run_glmv(model, batches, new_tokens):
    outputs, split = [], {"vision": 0.0, "prefill": 0.0, "decode": 0.0}
    t0 = time.perf_counter()
    for inputs in batches:
        out = model.generate(**inputs, max_new_tokens=new_tokens, eos_token_id=[], return_dict_in_generate=True)
        outputs.append(out.sequences)
        split["vision"] += out.rows[0].vision_s
        split["prefill"] += out.rows[0].prefill_s
        split["decode"] += max(r.decode_s for r in out.rows)
    return outputs, time.perf_counter() - t0, split


@torch.inference_mode()
def run_transformers(model, batches, new_tokens):
    outputs = []
    t0 = time.perf_counter()
    for inputs in batches:
        outputs.append(model.generate(**inputs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=[]))
    return outputs, time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="default: write the 'bench' preset to a temp dir")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)

    import transformers

    import glmv
    from glmv.testing import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint or make_tiny_checkpoint(Path(tmp) / "bench", preset="bench")
        batches = build_batches(checkpoint, make_images(args.images), args.batch)
        ours = glmv.Glm4vForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype)
        ref = transformers.Glm4vForConditionalGeneration.from_pretrained(checkpoint, dtype=dtype).eval()

        run_glmv(ours, batches[:1], 4)  # warm-up both (thread pools, allocator)
        run_transformers(ref, batches[:1], 4)
        ref_out, ref_s = run_transformers(ref, batches, args.new_tokens)
        our_out, our_s, split = run_glmv(ours, batches, args.new_tokens)

    identical = all(torch.equal(a, b) for a, b in zip(our_out, ref_out))
    generated = sum(o.shape[0] * args.new_tokens for o in our_out)
    decoder_bytes = weight_bytes(ours.model.language_model.layers) + weight_bytes(ours.lm_head)
    bandwidth = read_bandwidth()
    steps = len(batches) * (args.new_tokens - 1)
    print(f"model: bench preset, {args.dtype}, {torch.get_num_threads()} threads; {args.images} images "
          f"(~360-540 px sides), batches of {args.batch}, {args.new_tokens} new tokens, eos ignored")
    print(f"{'':>13} {'images/s':>9} {'tokens/s':>9} {'wall s':>8}")
    print(f"{'transformers':>13} {args.images / ref_s:9.3f} {generated / ref_s:9.1f} {ref_s:8.2f}")
    print(f"{'glmv':>13} {args.images / our_s:9.3f} {generated / our_s:9.1f} {our_s:8.2f}")
    print(f"throughput ratio glmv / transformers: {ref_s / our_s:.2f}x   greedy tokens identical: {identical}")
    print(f"glmv split: vision {split['vision']:.2f}s, prefill {split['prefill']:.2f}s, decode {split['decode']:.2f}s "
          f"({1000 * split['decode'] / steps:.1f} ms/step at batch {args.batch})")
    print(f"memory roofline: text decoder {decoder_bytes / 2**20:.0f} MiB / read bandwidth {bandwidth / 1e9:.1f} GB/s "
          f"= {1000 * decoder_bytes / bandwidth:.1f} ms/step")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10:.0f} MiB (both models loaded)")


if __name__ == "__main__":
    main()
