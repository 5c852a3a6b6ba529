"""Attention sites with an explicit mask on CUDA: torch's SDPA runs them, and means what the op means.

Our CUDA kernels take no mask. A masked site runs torch's fused SDPA where that computes the op's
meaning (attention_op.sdpa_attention, with the mask as sdpa_mask puts it) and, in training graphs,
trains through SDPA's fused backward where that gets every row right (masked_training_ops). Rows
whose every key is masked are the hard case (cuDNN and bool masks; finfo.min of bf16 overflowing
in the kernels): every test has some, and compares with the op in float64.
"""

import pytest
import torch
import torch.nn.functional as F

from flashmlir.frontend import attention_op
from tests.helpers import masked_training_against_float64

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}


def _rel(got, want):
    assert torch.isfinite(got).all()
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _mask(kind, dtype, b=2, sq=200, sk=333):
    """30% of keys masked at random, query rows 5-8 of batch 0 masked entirely."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    keep = torch.rand(b, 1, sq, sk, generator=g, device=DEVICE) > 0.3
    keep[0, :, 5:9] = False
    if kind == "bool":
        return keep
    value = float("-inf") if kind == "inf" else torch.finfo(dtype).min
    return torch.zeros(keep.shape, dtype=dtype, device=DEVICE).masked_fill(~keep, value)


def _operands(dtype, hq=4, hkv=2, requires_grad=False):
    torch.manual_seed(0)
    q = torch.randn(2, hq, 200, 64, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
    k, v = (torch.randn(2, hkv, 333, 64, device=DEVICE, dtype=dtype, requires_grad=requires_grad)
            for _ in range(2))
    return q, k, v


def _no_reference(monkeypatch):
    """Fail if the op's materializing reference runs (the route under test is SDPA's)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the op's reference ran")
    monkeypatch.setattr(attention_op, "reference_attention", refuse)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("kind", ["bool", "inf", "min"])
def test_masked_inference_runs_sdpa_and_matches_float64(dtype, kind, monkeypatch):
    q, k, v = _operands(dtype)
    mask = _mask(kind, dtype)
    want = attention_op.attention(q.double(), k.double(), v.double(), mask)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)

    torch._dynamo.reset()
    compiled = torch.compile(attention, backend="flashmlir")
    _no_reference(monkeypatch)
    with torch.no_grad():
        got = compiled(q, k, v)
    assert _rel(got, want) < TOLERANCE[dtype]
    empty = got[0, :, 5:9]
    if kind == "min":  # plain arithmetic (equal weights where finfo.min absorbs the scores: bf16, float32)
        assert _rel(empty, want[0, :, 5:9]) < TOLERANCE[dtype]
    else:
        assert torch.equal(empty, torch.zeros_like(empty))


@pytest.mark.parametrize("dtype, kind", [(torch.float16, "bool"), (torch.bfloat16, "bool"), (torch.float16, "min"),
                                         (torch.float16, "inf")])
def test_masked_training_trains_through_sdpa_and_matches_float64(dtype, kind, caplog):
    """bool masks and float16 ones: SDPA's fused backward (cuDNN's here), gradients against float64
    with fully masked rows present."""
    q, k, v = _operands(dtype, requires_grad=True)
    mask = _mask(kind, dtype)
    grad = torch.randn(2, 4, 200, 64, device=DEVICE, dtype=dtype)
    out, got, want, want_grads = masked_training_against_float64(q, k, v, mask, grad, caplog, scale=0.2)
    assert "1 masked attention site(s) train through fused kernels" in caplog.text
    assert _rel(out, want) < TOLERANCE[dtype]
    for name, g, w in zip("qkv", got, want_grads, strict=True):
        assert _rel(g, w) < 2 * TOLERANCE[dtype], name


@pytest.mark.parametrize("empty_rows", [False, True])
def test_bf16_finfo_min_mask_checks_for_rows_sdpa_gets_wrong(empty_rows, caplog):
    """A bf16 float mask may hold rows at finfo.min everywhere, whose gradients SDPA's backward gets
    wrong: the site trains through SDPA unless a call's mask has such a row, then through the op's
    textbook backward (torch.cond). Exact both ways."""
    dtype = torch.bfloat16
    q, k, v = _operands(dtype, requires_grad=True)
    mask = _mask("min", dtype)
    if not empty_rows:
        mask[0, :, 5:9, :3] = 0.0
    grad = torch.randn(2, 4, 200, 64, device=DEVICE, dtype=dtype)
    out, got, want, want_grads = masked_training_against_float64(q, k, v, mask, grad, caplog)
    assert "1 masked attention site(s) train through fused kernels" in caplog.text
    assert "falling back" not in caplog.text
    assert _rel(out, want) < TOLERANCE[dtype]
    for name, g, w in zip("qkv", got, want_grads, strict=True):
        assert _rel(g, w) < 2 * TOLERANCE[dtype], name


def test_a_learned_float16_bias_keeps_its_gradient():
    """A float mask that needs a gradient (a learned bias) is not handed to the SDPA rewrite, whose
    replacement would drop it: the bias gets the op's gradient."""
    q, k, v = _operands(torch.float16, hq=2, hkv=2, requires_grad=True)
    bias = torch.nn.Parameter(0.1 * torch.randn(1, 1, 200, 333, device=DEVICE, dtype=torch.float16))

    def attention(q, k, v, bias):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias * 2)

    torch._dynamo.reset()
    out = torch.compile(attention, backend="flashmlir")(q, k, v, bias)
    (got,) = torch.autograd.grad(out.float().square().sum(), (bias,))
    b64 = bias.detach().double().requires_grad_()
    want = attention_op.attention(q.detach().double(), k.detach().double(), v.detach().double(), b64 * 2)
    (want_grad,) = torch.autograd.grad(want.square().sum(), (b64,))
    assert _rel(got, want_grad) < 1e-2
