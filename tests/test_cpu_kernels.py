"""The CPU fast path: oneDNN-packed linears give the same results and free the original weights."""

import weakref

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
