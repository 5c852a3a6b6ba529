"""Attention dropout inside the sm_90 and sm_80 kernels (dropout.cuh), against float64 with the
same seed.

The kernels regenerate `attention_op.dropout_keep`'s mask element by element; a wrong index or hash
drops other probabilities and shows as an error of order 1, not of rounding. Launched directly
(every sm_90 forward tiling the catalog has: head dims 64/128/256, the head dim 64 long-sequence
entry, the head dim 128 short one with O through TMA; the sm_80 kernels, run here from their
compute_80 code) and through torch.compile's training path.
"""

import pytest
import torch
import torch.nn.functional as F

from flashmlir.compiler import microkernels
from flashmlir.dynamo.backend import recording
from flashmlir.frontend.training_ops import reference_forward
from flashmlir.runtime.cuda_launcher import attention_backward, attention_forward
from tests.helpers import CompiledGraphs

pytestmark = pytest.mark.gpu

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}  # relative (Frobenius), as the backward's tests


@pytest.fixture(autouse=True)
def _sm80_or_newer():
    if torch.cuda.get_device_capability() < (8, 0):
        pytest.skip("the dropout kernels are the sm_90a and sm_80 ones")


def _runs(arch: str) -> None:
    if arch == "sm_90" and torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("sm_90a kernels")


def _seed() -> torch.Tensor:
    return torch.randint(0, 2**31 - 1, (), dtype=torch.int64, device="cuda")


def _error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).norm() / want.norm()).item()


def _inputs(dtype, b, hq, hkv, sq, sk, d):
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("element", ["f16", "bf16"])
@pytest.mark.parametrize("d, sq, sk", [(64, 333, 517), (64, 2048, 2100), (128, 333, 517), (128, 2048, 2048),
                                       (256, 200, 333)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_forward_drops_what_the_reference_drops(arch, element, d, sq, sk, causal):
    _runs(arch)
    dtype = DTYPES[element]
    kernel = microkernels.select_attention_forward(arch, element, d, sq, sk, causal)
    assert kernel.dropout
    q, k, v = _inputs(dtype, 2, 4, 2, sq, sk, d)
    seed, p = _seed(), 0.2
    out, lse = attention_forward(kernel, q, k, v, causal=causal, with_lse=True, dropout_p=p, dropout_seed=seed)
    want, want_lse = reference_forward(q.double(), k.double(), v.double(), causal, None, p, seed)
    plain = reference_forward(q.double(), k.double(), v.double(), causal, None)[0]
    assert _error(out, want) < TOLERANCE[dtype], f"{kernel.name}: {_error(out, want):.2e}"
    assert _error(out, plain) > 0.1  # it did drop
    finite = torch.isfinite(want_lse)
    assert torch.equal(finite, torch.isfinite(lse))
    assert (lse.double()[finite] - want_lse[finite]).abs().max() < 1e-3  # the undropped softmax's


@pytest.mark.parametrize("element", ["f16", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hq, hkv, sq, sk", [(4, 2, 333, 517), (2, 2, 129, 77)])
@pytest.mark.parametrize("arch", ["sm_90", "sm_80"])
def test_backward_regenerates_the_forward_mask(arch, element, d, causal, hq, hkv, sq, sk):
    _runs(arch)
    dtype = DTYPES[element]
    forward = microkernels.select_attention_forward(arch, element, d, sq, sk, causal)
    backward = microkernels.select_attention_backward(arch, element, d)
    assert backward.dropout
    q, k, v = _inputs(dtype, 2, hq, hkv, sq, sk, d)
    d_o = torch.randn_like(q)
    seed, p = _seed(), 0.15
    out, lse = attention_forward(forward, q, k, v, causal=causal, with_lse=True, dropout_p=p, dropout_seed=seed)
    grads = attention_backward(backward, q, k, v, out, d_o, lse, causal=causal, dropout_p=p, dropout_seed=seed)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(torch.ops.flashmlir.attention(q64, k64, v64, None, p, causal, None, seed),
                               (q64, k64, v64), d_o.double())
    for name, got, ref in zip(("dq", "dk", "dv"), grads, want, strict=True):
        assert not torch.isnan(got).any(), f"{name}: NaN"
        assert _error(got, ref) < TOLERANCE[dtype], f"{name}: {_error(got, ref):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_training_with_dropout_runs_the_dropout_kernels_through_torch_compile(dtype, monkeypatch):
    """SDPA with dropout in a training graph: the CUDA default (Inductor around our ops) takes the
    dropout pair, the launches get the graph's seed, and output and gradients match float64
    attention with that seed's mask."""
    from flashmlir.runtime import cuda_launcher

    seeds = {"forward": [], "backward": []}

    def spy(name, fn):
        def call(self, *args):
            seed = args[-1]
            seeds[name].append(None if seed is None else seed.clone())
            return fn(self, *args)
        return call

    for name, launch in (("forward", cuda_launcher.AttentionForwardLaunch),
                         ("backward", cuda_launcher.AttentionBackwardLaunch)):
        monkeypatch.setattr(launch, "__call__", spy(name, launch.__call__))
    monkeypatch.setenv("FLASHMLIR_STRICT", "1")
    q = torch.randn(2, 8, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 300, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, enable_gqa=True)

    torch._dynamo.reset()
    out = torch.compile(attention, backend="flashmlir")(q, k, v)
    d_o = torch.randn_like(out)
    out.backward(d_o)
    torch.cuda.synchronize()
    (seed,), (backward_seed,) = seeds["forward"], seeds["backward"]
    assert seed is not None and torch.equal(seed, backward_seed)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = torch.ops.flashmlir.attention(q64, k64, v64, None, 0.1, True, None, seed)
    want.backward(d_o.double())
    assert _error(out.detach(), want.detach()) < TOLERANCE[dtype]
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), (q64.grad, k64.grad, v64.grad), strict=True):
        assert _error(got, ref) < TOLERANCE[dtype], f"d{name}: {_error(got, ref):.2e}"


def test_deterministic_training_with_dropout_regenerates_the_mask_in_the_sm80_backward(monkeypatch):
    """Under torch.use_deterministic_algorithms the backward is the sm_80 pair (no order-varying dQ
    sum) while the forward stays sm_90's: its twins must regenerate the sm_90 forward's mask bit for
    bit. Gradients against float64 with the graph's seed, and equal over two backward calls."""
    _runs("sm_90")
    from flashmlir.runtime import cuda_launcher

    families, seeds = [], []
    build = cuda_launcher.AttentionBackwardLaunch.__init__
    call = cuda_launcher.AttentionBackwardLaunch.__call__

    def spy_init(self, kernel, *args, **kwargs):
        families.append(kernel.family)
        build(self, kernel, *args, **kwargs)

    def spy_call(self, *args):
        seeds.append(args[-1].clone())
        return call(self, *args)

    monkeypatch.setattr(cuda_launcher.AttentionBackwardLaunch, "__init__", spy_init)
    monkeypatch.setattr(cuda_launcher.AttentionBackwardLaunch, "__call__", spy_call)
    q = torch.randn(2, 4, 333, 128, device="cuda", dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(2, 2, 333, 128, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(2))

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, enable_gqa=True)

    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        out = torch.compile(attention, backend="flashmlir")(q, k, v)
        d_o = torch.randn_like(out)
        first = torch.autograd.grad(out, (q, k, v), d_o, retain_graph=True)
        second = torch.autograd.grad(out, (q, k, v), d_o)
    finally:
        torch.use_deterministic_algorithms(False)
    assert families and set(families) == {"attention_bwd_sm80"}, families
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = torch.ops.flashmlir.attention(q64, k64, v64, None, 0.1, True, None, seeds[0])
    want_grads = torch.autograd.grad(want, (q64, k64, v64), d_o.double())
    assert _error(out.detach(), want.detach()) < TOLERANCE[torch.float16]
    for name, g, w in zip("qkv", first, want_grads, strict=True):
        assert _error(g, w) < TOLERANCE[torch.float16], f"d{name}: {_error(g, w):.2e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_dropout_pair_through_iree_matches_float64_with_its_seed(target, dtype):
    """The dropout pair lowered by flashmlir-dispatch-attention-training to the sm_90 (sm_80) twins
    inside IREE (rest='iree'), the seed an input: output and gradients against float64 with that
    seed. (Passed on an H200 before the frontend put dropout sites on this path.)"""
    _runs(target)
    q = torch.randn(1, 4, 300, 64, device="cuda", dtype=dtype, requires_grad=True)
    k, v = (torch.randn(1, 2, 300, 64, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    grad, seed = torch.randn_like(q), _seed()

    def attention(q, k, v, seed):
        return torch.ops.flashmlir.attention_forward_dropout(q, k, v, 0.1, seed, True, None)[0]

    torch._dynamo.reset()
    out = torch.compile(attention, backend="flashmlir", options={"rest": "iree", "target": target})(q, k, v, seed)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = torch.ops.flashmlir.attention(q64, k64, v64, None, 0.1, True, None, seed)
    want_grads = torch.autograd.grad(want, (q64, k64, v64), grad.double())
    assert _error(out.detach(), want.detach()) < TOLERANCE[dtype]
    for name, g, w in zip("qkv", got, want_grads, strict=True):
        assert _error(g, w) < TOLERANCE[dtype], f"d{name}: {_error(g, w):.2e}"


@pytest.mark.parametrize("target", ["sm_90", "sm_80"])
def test_sdpa_with_dropout_trains_through_the_dropout_twins_in_iree(target):
    """SDPA with dropout in a training graph compiled by IREE for CUDA: the site becomes the dropout
    pair, run by the target's twins in both graphs, with a fresh mask per call."""
    _runs(target)
    q = torch.randn(2, 4, 256, 64, device="cuda", dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(2, 2, 256, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(2))

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, enable_gqa=True)

    seen = CompiledGraphs()
    with recording(seen):
        compiled = torch.compile(attention, backend="flashmlir", options={"rest": "iree", "target": target})
        first = compiled(q, k, v)
        got = torch.autograd.grad(first, (q, k, v), torch.randn_like(first))
        second = compiled(q, k, v)
    assert seen.microkernels == {"(forward)": 1, "(backward)": 1}, seen.microkernels
    assert all(torch.isfinite(g).all() for g in got) and not torch.equal(first, second)
