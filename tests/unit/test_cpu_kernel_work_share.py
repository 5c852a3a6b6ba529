"""The CPU attention kernels' work split: any grid size covers every item exactly once.

IREE calls a kernel once per workgroup of a grid of a few workgroups per thread, and each call
picks its share of the items by cost. Here the kernel sources are compiled as a shared library,
for the best instruction set the host has and with the catalog's tile sizes for it (as the build
does), and called for every workgroup of grids from 1 to more workgroups than items, with the
outputs starting as NaN: a missed item leaves NaN, an item done twice is still right but a wrong
split shows up as NaN elsewhere. Causal items differ in cost, so the split differs from
non-causal ones. The backward runs both ways the training pass may call it: split (`_dq`, then
`_dkdv` with its Δ) and in one pass (`_fused`, items of whole K/V heads). Compared with float64.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from flashmlir.compiler import microkernels
from flashmlir.compiler.targets import get_target

MICROKERNELS = Path(__file__).parents[2] / "runtime" / "microkernels"
_P, _S = ctypes.c_void_p, ctypes.c_size_t
_MEMREF = [_P, _P, _S, _S, _S]
_CONSTANTS = [_S, _S, _S, _S, ctypes.c_float, _S, _S, _S]


def _compile(kernels, tmp_path_factory) -> tuple[ctypes.CDLL, int]:
    """(the library, rows per item) for the first of the catalog's `kernels` this host can run."""
    compiler = os.environ.get("CC", "cc")
    if shutil.which(compiler) is None:
        pytest.skip(f"no C compiler ({compiler})")
    flags = get_target("cpu").cpu_features
    kernel = next((k for k in kernels if k.requires <= flags), None)
    if kernel is None:
        pytest.skip("no CPU kernel in the catalog for this CPU")
    library = tmp_path_factory.mktemp(kernel.family) / "kernel.so"
    subprocess.run([compiler, "-std=c17", "-O2", f"-march={kernel.march}", "-shared", "-fPIC", *kernel.defines,
                    str(MICROKERNELS / kernel.source), "-o", str(library)], check=True)
    return ctypes.CDLL(str(library)), kernel.rows


@pytest.fixture(scope="module")
def forward(tmp_path_factory):
    library, rows = _compile(microkernels.library().cpu, tmp_path_factory)
    fn = library.flashmlir_attention_fwd_cpu_f32_d32
    fn.argtypes = _MEMREF * 4 + _CONSTANTS
    return fn, rows


@pytest.fixture(scope="module")
def backward(tmp_path_factory):
    library, rows = _compile(microkernels.library().cpu_backward, tmp_path_factory)
    fns = {}
    for part, bindings in (("dq", 8), ("dkdv", 8), ("fused", 10)):
        fns[part] = getattr(library, f"flashmlir_attention_bwd_cpu_f32_d32_{part}")
        fns[part].argtypes = _MEMREF * bindings + _CONSTANTS
    return fns, rows


def _memrefs(*tensors):
    return [x for t in tensors for x in (t.data_ptr(), t.data_ptr(), 0, t.numel(), 1)]


def _reference(q, k, v, causal, scale, grad=None):
    """Float64 attention (and with `grad`, its output, lse and q/k/v gradients)."""
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    kk, vv = (x.repeat_interleave(group, 1) for x in (k64, v64))
    s = (q64 @ kk.transpose(-1, -2)) * scale
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    o = torch.softmax(s, -1) @ vv
    if grad is None:
        return o.detach()
    return o.detach(), torch.logsumexp(s, -1).detach(), torch.autograd.grad(o, (q64, k64, v64), grad.double())


def _grids(items: int) -> list[int]:
    return sorted({1, 2, 3, 5, 8, items - 1, items, items + 3} - {0})


SHAPES = [(2, 3, 3, 150, 150), (1, 4, 2, 200, 90), (1, 1, 1, 500, 700)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, hq, hkv, sq, sk", SHAPES)
def test_every_grid_size_covers_every_item_once(forward, b, hq, hkv, sq, sk, causal):
    kernel, rows = forward
    torch.manual_seed(sq)
    q = torch.randn(b, hq, sq, 32)
    k, v = (torch.randn(b, hkv, sk, 32) for _ in range(2))
    ref = _reference(q, k, v, causal, 0.2)
    for workgroups in _grids(-(-sq // rows) * b * hq):
        o = torch.full_like(q, float("nan"))
        for workgroup in range(workgroups):
            kernel(*_memrefs(q, k, v, o), hq // hkv, b * hq, sq, sk, 0.2, int(causal), workgroup, workgroups)
        assert not torch.isnan(o).any(), f"{workgroups} workgroups left rows unwritten"
        err = ((o.double() - ref).norm() / ref.norm()).item()
        assert err < 1e-5, f"{workgroups} workgroups: relative error {err:.1e}"


@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b, hq, hkv, sq, sk", SHAPES)
def test_backward_every_grid_size_covers_every_item_once(backward, b, hq, hkv, sq, sk, causal, fused):
    fns, rows = backward
    torch.manual_seed(sq + 1)
    q, grad = torch.randn(b, hq, sq, 32), torch.randn(b, hq, sq, 32)
    k, v = (torch.randn(b, hkv, sk, 32) for _ in range(2))
    o, lse, want = _reference(q, k, v, causal, 0.2, grad)
    o, lse = o.float(), lse.float()
    constants = (hq // hkv, b * hq, sq, sk, 0.2, int(causal))
    items = b * hkv if fused else -(-max(sq, sk) // rows) * b * hq
    for workgroups in _grids(items):
        dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
        delta = torch.full_like(lse, float("nan"))
        if fused:
            for wg in range(workgroups):
                fns["fused"](*_memrefs(q, k, v, o, grad, lse, dq, delta, dk, dv), *constants, wg, workgroups)
        else:
            for wg in range(workgroups):
                fns["dq"](*_memrefs(q, k, v, o, grad, lse, dq, delta), *constants, wg, workgroups)
            for wg in range(workgroups):
                fns["dkdv"](*_memrefs(q, k, v, grad, lse, delta, dk, dv), *constants, wg, workgroups)
        for name, got, ref in zip(("dq", "dk", "dv"), (dq, dk, dv), want, strict=True):
            assert not torch.isnan(got).any(), f"{workgroups} workgroups left {name} rows unwritten"
            err = ((got.double() - ref).norm() / ref.norm()).item()
            assert err < 1e-5, f"{workgroups} workgroups: {name} relative error {err:.1e}"
