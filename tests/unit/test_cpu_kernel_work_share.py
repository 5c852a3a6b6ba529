"""The CPU attention kernel's work split: any grid size covers every item exactly once.

IREE calls the kernel once per workgroup of a grid of a few workgroups per thread, and each call
picks its share of the (48-row block, head) items by cost. Here the kernel source is compiled as a
shared library and called for every workgroup of grids from 1 to more workgroups than items, with
the output starting as NaN: a missed item leaves NaN, an item done twice is still right but a
wrong split shows up as NaN elsewhere. Causal items differ in cost, so the split differs from
non-causal ones. Compared with float64.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flashmlir.compiler.targets import get_target

SOURCE = Path(__file__).parents[2] / "runtime" / "microkernels" / "attention" / "fwd_cpu_avx512.c"
_P, _S = ctypes.c_void_p, ctypes.c_size_t
ROWS = 48  # the catalog's row block (kernels.json: 3 row vectors of 16)


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler})")
    if "avx512f" not in get_target("cpu").cpu_features:
        pytest.skip("the CPU kernel needs AVX-512")
    library = tmp_path_factory.mktemp("cpu-kernel") / "kernel.so"
    subprocess.run([compiler, "-std=c17", "-O2", "-march=x86-64-v4", "-shared", "-fPIC", str(SOURCE), "-o",
                    str(library)], check=True)
    fn = ctypes.CDLL(str(library)).flashmlir_attention_fwd_cpu_f32_d32
    fn.argtypes = [_P, _P, _S, _S, _S] * 4 + [_S, _S, _S, _S, ctypes.c_float, _S, _S, _S]
    return fn


def _reference(q, k, v, causal, scale):
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, hq, hkv, sq, sk", [(2, 3, 3, 150, 150), (1, 4, 2, 200, 90), (1, 1, 1, 500, 700)])
def test_every_grid_size_covers_every_item_once(kernel, b, hq, hkv, sq, sk, causal):
    torch.manual_seed(sq)
    q = torch.randn(b, hq, sq, 32)
    k, v = (torch.randn(b, hkv, sk, 32) for _ in range(2))
    ref = _reference(q, k, v, causal, 0.2)
    items = -(-sq // ROWS) * b * hq
    for workgroups in sorted({1, 2, 3, 5, 8, items - 1, items, items + 3} - {0}):
        o = torch.full_like(q, float("nan"))
        memrefs = [x for t in (q, k, v, o) for x in (t.data_ptr(), t.data_ptr(), 0, t.numel(), 1)]
        for workgroup in range(workgroups):
            kernel(*memrefs, hq // hkv, b * hq, sq, sk, 0.2, int(causal), workgroup, workgroups)
        assert not torch.isnan(o).any(), f"{workgroups} workgroups left rows unwritten"
        err = ((o.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"{workgroups} workgroups: relative error {err:.1e}"
