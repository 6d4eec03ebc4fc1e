"""Peak RSS growth while loading a checkpoint: glmv's loader vs transformers' on the same files.

    .venv/bin/python bench/bench_load.py [--checkpoint DIR] [--dtype float32]

Each loader runs in a fresh process. Growth is measured from the RSS after imports to the peak RSS (VmHWM) once
every weight has been read once (a sum over every parameter, so mapped pages are really touched), and printed as a
multiple of the checkpoint's bytes. Goal: glmv <= 1.2x.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, sys, time, torch
def status(field):
    for line in open('/proc/self/status'):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
if which == 'glmv':
    import glmv
    load = lambda: glmv.Glm4vForConditionalGeneration.from_pretrained(path, dtype=dtype)
else:
    import transformers
    load = lambda: transformers.Glm4vForConditionalGeneration.from_pretrained(path, dtype=dtype)
base = status('VmRSS:')
t0 = time.perf_counter()
model = load()
load_s = time.perf_counter() - t0
total = 0.0
with torch.no_grad():
    for p in model.parameters():
        total += float(p.float().sum())  # read every weight once
print(json.dumps({'growth': status('VmHWM:') - base, 'load_s': load_s,
                  'param_bytes': sum(p.numel() * p.element_size() for p in model.parameters())}))
"""


def measure(which: str, checkpoint: Path, dtype: str) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(checkpoint), dtype],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="checkpoint folder (default: write the 'bench' preset)")
    parser.add_argument("--dtype", default="float32", help="load dtype (the bench preset is stored in float32)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = args.checkpoint
        if checkpoint is None:
            from glmv.testing import make_tiny_checkpoint

            t0 = time.perf_counter()
            checkpoint = make_tiny_checkpoint(Path(tmp) / "bench", preset="bench")
            print(f"wrote bench checkpoint in {time.perf_counter() - t0:.1f}s")
        index = checkpoint / "model.safetensors.index.json"
        files = (set(json.loads(index.read_text())["weight_map"].values()) if index.exists()
                 else {"model.safetensors"})
        ckpt_bytes = sum((checkpoint / f).stat().st_size for f in files)
        print(f"checkpoint: {checkpoint} ({len(files)} files, {ckpt_bytes / 2**20:.1f} MiB), load dtype {args.dtype}")
        results = {which: measure(which, checkpoint, args.dtype) for which in ("glmv", "transformers")}

    for which, r in results.items():
        print(f"{which:>12}: peak RSS growth {r['growth'] / 2**20:8.1f} MiB = {r['growth'] / ckpt_bytes:.2f}x "
              f"checkpoint bytes, load {r['load_s']:.2f}s")
    ratio = results["glmv"]["growth"] / results["transformers"]["growth"]
    print(f"glmv / transformers peak growth: {ratio:.2f}  "
          f"(goal: glmv <= 1.2x checkpoint bytes: {'met' if results['glmv']['growth'] <= 1.2 * ckpt_bytes else 'MISSED'})")


if __name__ == "__main__":
    main()
