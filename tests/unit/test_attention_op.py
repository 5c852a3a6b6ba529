"""flashmlir::attention's eager implementation and backward against float64 references."""

import pytest
import torch
import torch.nn.functional as F

from flashmlir.frontend.attention_op import attention, check_arguments
from tests.helpers import attention64, rel_err

CASES = {
    "mha": dict(q=(2, 4, 33, 16), kv=(2, 4, 40, 16)),
    "gqa": dict(q=(2, 8, 24, 16), kv=(2, 2, 24, 16)),
    "rank3": dict(q=(6, 20, 8), kv=(6, 20, 8)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("variant", ["plain", "causal", "float_mask", "bool_mask", "causal_and_mask"])
def test_forward_matches_float64(case, variant):
    c = CASES[case]
    q, k, v = torch.randn(c["q"]), torch.randn(c["kv"]), torch.randn(c["kv"])
    scores = (*c["q"][:-1], c["kv"][-2])
    mask = None
    if variant in ("float_mask", "causal_and_mask"):
        mask = torch.randn(scores)
    elif variant == "bool_mask":
        mask = torch.rand(scores[-2:]) > 0.3
        mask[:, 0] = True  # no fully masked row
    causal = variant in ("causal", "causal_and_mask")
    out = attention(q, k, v, mask, 0.0, causal, 0.3)
    assert rel_err(out, attention64(q, k, v, mask, causal, 0.3)) < 1e-6


@pytest.mark.parametrize("case", ["mha", "gqa"])
@pytest.mark.parametrize("causal", [False, True])
def test_backward_matches_float64_autograd(case, causal):
    c = CASES[case]
    q, k, v = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in (c["q"], c["kv"], c["kv"]))
    mask = torch.randn((*c["q"][:-1], c["kv"][-2]), dtype=torch.float64, requires_grad=True)
    grad = torch.randn((*c["q"][:-1], c["kv"][-1]), dtype=torch.float64)
    ours = torch.autograd.grad(attention(q, k, v, mask, 0.0, causal, None), (q, k, v, mask), grad)
    refs = torch.autograd.grad(attention64(q, k, v, mask, causal), (q, k, v, mask), grad)
    for name, a, b in zip("q k v mask".split(), ours, refs, strict=True):
        assert rel_err(a, b) < 1e-10, name


def test_mask_gradient_is_reduced_to_the_mask_shape():
    q, k, v = (torch.randn(2, 4, 8, 8, dtype=torch.float64) for _ in range(3))
    bias = torch.randn(1, 4, 8, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda b: attention(q, k, v, b, 0.0, False, None), (bias,))


def test_rejects_shapes_that_do_not_fit():
    q, k = torch.randn(2, 3, 8, 16), torch.randn(2, 2, 8, 16)
    with pytest.raises(ValueError, match="multiple of kv heads"):
        check_arguments(q, k, k, None)
    with pytest.raises(ValueError, match="does not broadcast"):
        check_arguments(q, q, q, torch.randn(3, 8, 9))


def test_matches_torch_sdpa_for_the_common_case():
    q, k, v = (torch.randn(2, 4, 64, 32) for _ in range(3))
    assert rel_err(attention(q, k, v, None, 0.0, True, None),
                   F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-5


def test_dropout_mask_is_a_function_of_the_seed_with_the_right_rate():
    from flashmlir.frontend.attention_op import dropout_keep

    seed = torch.tensor(1234)
    a, b = dropout_keep(seed, (4, 64, 64), 0.1), dropout_keep(seed, (4, 64, 64), 0.1)
    assert torch.equal(a, b) and not torch.equal(a, dropout_keep(torch.tensor(1235), (4, 64, 64), 0.1))
    assert abs(a.float().mean().item() - 0.9) < 0.01


def test_dropout_backward_replays_the_forward_mask():
    q, k, v = (torch.randn(1, 2, 12, 8, dtype=torch.float64, requires_grad=True) for _ in range(3))
    seed = torch.tensor(7)
    assert torch.autograd.gradcheck(lambda q, k, v: attention(q, k, v, None, 0.3, True, None, seed), (q, k, v))


def test_dropout_keeps_the_expectation():
    # The mean of n dropped outputs is off by ~1/sqrt(n) of the output (p = 0.5): 1600 seeds give
    # ~0.025, against 0.045-0.058 with 400 (too close to a 0.05 bound to tell a biased mask).
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 1, 32, 16, dtype=torch.float64) for _ in range(3))
    mean = sum(attention(q, k, v, None, 0.5, False, None, torch.tensor(s)) for s in range(1600)) / 1600
    assert rel_err(mean, attention64(q, k, v)) < 0.04


@pytest.mark.parametrize("p", [0.1, 0.25, 1 / 3, 0.5, 0.999])
def test_dropout_threshold_is_the_references_comparison(p):
    """The kernels compare 16 bits of the mixed hash with ⌈p · 2¹⁶⌉; dropout_keep compares them / 2¹⁶ with p."""
    from flashmlir.compiler.microkernels import dropout_threshold

    t = dropout_threshold(p)
    for x in (t - 1, t, t + 1, 0, 2**16 - 1):
        assert (x >= t) == (x / 2**16 >= p)
    with pytest.raises(ValueError, match="dropout probability"):
        dropout_threshold(1.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_means_the_reference(dtype, monkeypatch):
    """torch's SDPA stands in for the reference only where it computes the same thing: masks bool or
    of q's dtype (a row with every key masked gets zeros in both), GQA; causal with a mask, dropout,
    or a float32 mask on bf16 inputs take the reference itself."""
    from flashmlir.frontend import attention_op

    torch.manual_seed(0)
    q = torch.randn(2, 4, 37, 32, dtype=dtype)
    k, v = (torch.randn(2, 2, 37, 32, dtype=dtype) for _ in range(2))
    keep = torch.rand(2, 1, 37, 37) > 0.3
    keep[0, 0, 5] = False  # a query with every key masked out
    additive = torch.zeros(keep.shape, dtype=dtype).masked_fill(~keep, float("-inf"))
    tolerance = 1e-6 if dtype == torch.float32 else 1e-2
    for mask in (keep, additive):
        got = attention_op.sdpa_attention(q, k, v, mask)
        want = attention_op.reference_attention(q, k, v, mask)
        assert got.is_contiguous() and rel_err(got, want) < tolerance
        assert torch.equal(got[0, :, 5], torch.zeros_like(got[0, :, 5]))
    used = []
    monkeypatch.setattr(attention_op, "reference_attention", lambda *args: used.append(args) or q)
    seed = torch.tensor(3)
    attention_op.sdpa_attention(q, k, v, keep, 0.0, True)  # causal together with a mask
    attention_op.sdpa_attention(q, k, v, None, 0.1, False, None, seed)  # dropout
    if dtype != torch.float32:
        attention_op.sdpa_attention(q, k, v, additive.float())  # a float32 mask on bf16 inputs
    assert len(used) == (2 if dtype == torch.float32 else 3)


def test_sdpa_mask_keeps_what_the_op_means():
    """bool masks stay bool off CUDA; bf16 / float32 masks have finite values below NEVER raised to
    it (finfo.min times log2(e) overflows inside SDPA's kernels), -inf kept; float16 untouched."""
    from flashmlir.frontend.attention_op import NEVER, sdpa_mask

    q = torch.randn(1, 1, 4, 8)
    keep = torch.tensor([True, False, True, True])
    assert sdpa_mask(keep, q) is keep and sdpa_mask(None, q) is None
    for dtype in (torch.float32, torch.bfloat16):
        mask = torch.tensor([0.0, -3.0, torch.finfo(dtype).min, float("-inf")], dtype=dtype)
        got = sdpa_mask(mask, q.to(dtype))
        assert got.dtype == dtype
        assert got[:2].tolist() == [0.0, -3.0] and got[2].item() == torch.tensor(NEVER, dtype=dtype).item()
        assert got[3].item() == float("-inf")
    half = torch.tensor([0.0, torch.finfo(torch.float16).min], dtype=torch.float16)
    assert sdpa_mask(half, q.half()) is half


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sdpa_attention_gives_a_row_masked_by_finfo_min_equal_weights(dtype):
    """A query whose every key a finfo.min mask removes (Hugging Face's padding) is plain arithmetic
    in the op: equal weights over the keys. SDPA's fused kernels give 0 there unless the mask is
    clamped (`sdpa_mask`); the CPU kernel, and the GPU ones, then agree with the reference."""
    from flashmlir.frontend import attention_op

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, 19, 16, dtype=dtype) for _ in range(3))
    mask = torch.zeros(2, 1, 19, 19, dtype=dtype)
    mask[..., 15:] = torch.finfo(dtype).min
    mask[1, :, 4] = torch.finfo(dtype).min
    got = attention_op.sdpa_attention(q, k, v, mask)
    want = attention_op.reference_attention(q, k, v, mask)
    assert rel_err(got, want) < (1e-6 if dtype == torch.float32 else 1e-2)
    torch.testing.assert_close(got[1, :, 4].float(), v[1].float().mean(dim=-2), atol=2e-2, rtol=0)
