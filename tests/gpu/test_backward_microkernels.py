"""The library's backward attention kernels, launched directly, against float64: the sm_80 ones
(dq, then dkdv; on any GPU from sm_80 on) and the sm_90 ones (prep, dkdv with atomic dQ, dq; on
sm_90 only).

The forward's log-sum-exp comes from the library's forward kernel (its `_lse` variant), as in
training; dQ, dK, dV are compared with autograd through float64 attention on random inputs (an
unwritten row is a wrong row).
"""

import pytest
import torch

from flashmlir.compiler import microkernels
from flashmlir.runtime.cuda_launcher import attention_backward, attention_forward

pytestmark = pytest.mark.gpu

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
# Relative (Frobenius) error of each gradient vs float64; bf16 carries 8 bits of mantissa.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}


# The backward family each arch's tests must exercise (sm_90's kernels run on sm_90 alone).
FAMILIES = {"sm_80": "attention_bwd_sm80", "sm_90": "attention_bwd_sm90"}


@pytest.fixture(params=sorted(FAMILIES))
def arch(request):
    if request.param == "sm_90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a kernels run on sm_90 GPUs only")
    return request.param


def _kernels(element: str, head_dim: int, arch: str):
    try:
        forward = microkernels.select_attention_forward(arch, element, head_dim)
        backward = microkernels.select_attention_backward(arch, element, head_dim)
    except microkernels.NoKernel as why:
        pytest.skip(str(why))
    assert backward.family == FAMILIES[arch], f"{arch} selected {backward.family}"
    return forward, backward


def _reference_grads(q, k, v, d_o, causal, scale):
    """dq, dk, dv of float64 attention (top-left causal, GQA by repetition) by autograd."""
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(group, 1).transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    out = torch.softmax(s, -1) @ v.repeat_interleave(group, 1)
    out.backward(d_o.double())
    return q.grad, k.grad, v.grad


def _run(arch, element, d, causal, b, hq, hkv, sq, sk, scale=None):
    forward, backward = _kernels(element, d, arch)
    dtype = DTYPES[element]
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype)
    d_o = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype)
    scale = d ** -0.5 if scale is None else scale
    o, lse = attention_forward(forward, q, k, v, causal=causal, scale=scale, with_lse=True)
    grads = attention_backward(backward, q, k, v, o, d_o, lse, causal=causal, scale=scale)
    torch.cuda.synchronize()
    for name, got, ref in zip(("dq", "dk", "dv"), grads, _reference_grads(q, k, v, d_o, causal, scale), strict=True):
        assert got.shape == ref.shape
        assert not torch.isnan(got).any(), f"{name}: NaN"
        # Relative to the reference's norm, or to a small absolute scale where the gradient is ~0
        # (one key: every probability is 1, so dS and dQ vanish).
        err = ((got.double() - ref).norm() / max(ref.norm().item(), 1e-2 * ref.numel() ** 0.5)).item()
        assert err < TOLERANCE[dtype], f"{name}: relative error {err:.2e}"


@pytest.mark.parametrize("element", ["f16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_backward(arch, element, d, causal):
    _run(arch, element, d, causal, b=2, hq=3, hkv=3, sq=300, sk=300)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq,sk", [(1, 1), (77, 1), (129, 517), (517, 129), (1000, 1000)])
def test_backward_ragged(arch, sq, sk, d, causal):
    _run(arch, "f16", d, causal, b=1, hq=2, hkv=2, sq=sq, sk=sk)


@pytest.mark.parametrize("hq,hkv", [(8, 2), (8, 1)])
def test_backward_gqa(arch, hq, hkv):
    _run(arch, "bf16", 128, True, b=2, hq=hq, hkv=hkv, sq=333, sk=333)


def test_backward_scale(arch):
    _run(arch, "f16", 128, False, b=1, hq=2, hkv=2, sq=200, sk=256, scale=3.0)


def test_backward_sm90_repeats_within_rounding():
    """dQ's fp32 shares are added in an order that varies: two runs agree to rounding, not to the bit."""
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the sm_90a kernels run on sm_90 GPUs only")
    forward, backward = _kernels("f16", 128, "sm_90")
    q, k, v, d_o = (torch.randn(2, 4, 1024, 128, device="cuda", dtype=torch.float16) for _ in range(4))
    o, lse = attention_forward(forward, q, k, v, causal=False, with_lse=True)
    first = attention_backward(backward, q, k, v, o, d_o, lse, causal=False)
    second = attention_backward(backward, q, k, v, o, d_o, lse, causal=False)
    for a, b in zip(first, second, strict=True):
        assert ((a.double() - b.double()).norm() / a.double().norm()).item() < 1e-3


def test_deterministic_mode_selects_sm80_kernels():
    try:
        kernel = microkernels.select_attention_backward("sm_90", "f16", 128, deterministic=True)
    except microkernels.NoKernel as why:
        pytest.skip(str(why))
    assert not kernel.accumulates_dq and kernel.family == "attention_bwd_sm80"
