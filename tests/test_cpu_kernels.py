"""The CPU fast path: oneDNN-packed linears give the same results and free the original weights."""

import os
import subprocess
import sys
import weakref
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from glmv import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(torch.device("cpu"), torch.float32),
                                reason="torch built without oneDNN")


def test_packed_linears_match_and_release_the_originals():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.SiLU(), nn.Sequential(nn.Linear(256, 32, bias=False)))
    x = torch.randn(5, 7, 64)
    expected = model(x)
    originals = [weakref.ref(m) for m in model.modules() if type(m) is nn.Linear]
    assert cpu_kernels.pack_linears(model) == 2
    assert all(ref() is None for ref in originals), "packing must not keep the unpacked weights alive"
    assert not any(type(m) is nn.Linear for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def _huge_pages_after_import(env_value: str | None) -> tuple[str, int]:
    """In a fresh interpreter: import glmv, allocate 64 MiB; the switch's value and the process's huge-page KiB."""
    env = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    if env_value is not None:
        env["THP_MEM_ALLOC_ENABLE"] = env_value
    code = ("import os, glmv, torch; x = torch.ones(64 * 2**20 // 4); "
            "huge = [l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')]; "
            "print(os.environ['THP_MEM_ALLOC_ENABLE'], huge[0] if huge else -1)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    value, kib = out.split()
    return value, int(kib)


@pytest.mark.skipif(not Path("/proc/self/smaps_rollup").exists(), reason="needs Linux /proc")
def test_large_cpu_tensors_get_huge_pages_unless_the_user_says_no():
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    mode = thp.read_text() if thp.exists() else "[never]"
    value, kib = _huge_pages_after_import(None)
    assert value == "1"
    if "[never]" not in mode:  # the kernel may refuse huge pages altogether; then only the switch can be checked
        assert kib >= 32 * 1024, f"64 MiB tensor got {kib} KiB of huge pages (kernel THP mode: {mode.strip()})"
    value, kib = _huge_pages_after_import("0")
    assert value == "0"
    if "[madvise]" in mode:  # only torch's madvise asks for them in this mode
        assert kib == 0
