"""Training on the CPU through our kernels in IREE (rest="iree"): torch.compile → training ops → our passes → IREE → the
library's forward-with-lse and backward objects (runtime/microkernels/attention/bwd_cpu.c).

Each case checks, through the backend's recorder, that the forward and the backward graph each ran
the site as microkernels (not the op's textbook backward), and compares q/k/v gradients with
float64 autograd on random inputs. Outputs start as NaN (FLASHMLIR_POISON_OUTPUTS), so a gradient
row the kernels never wrote fails. The shapes walk the kernels' edges: one key, rows and keys not
multiples of the row/key blocks or the register tiles, seq_q ≠ seq_k both ways under
causal masking, GQA groups (dK/dV summed over the group), every head dim the library has.
"""

import pytest
import torch

from flashmlir.compiler import microkernels
from flashmlir.compiler.targets import get_target
from flashmlir.dynamo.backend import recording
from tests.helpers import (
    CompiledGraphs,
    float64_gradients,
    masked_training_against_float64,
    rel_err,
    sdpa_training_problem,
)


@pytest.fixture(autouse=True)
def _needs_the_cpu_kernels(monkeypatch):
    try:
        microkernels.select_cpu_attention_backward(get_target("cpu").cpu_features, "f32", 64)
    except microkernels.NoKernel as why:
        pytest.skip(str(why))
    monkeypatch.setenv("FLASHMLIR_POISON_OUTPUTS", "1")


CASES = [
    # b, hq, hkv, sq, sk, d, causal
    (1, 2, 2, 1, 1, 64, False),
    (2, 4, 2, 37, 37, 32, True),
    (1, 3, 3, 100, 300, 128, False),
    (1, 2, 1, 333, 129, 64, True),
    (1, 2, 2, 129, 333, 64, True),
    (1, 8, 2, 96, 71, 128, True),
    (1, 1, 1, 513, 513, 32, True),
]


@pytest.mark.parametrize("b, hq, hkv, sq, sk, d, causal", CASES, ids=lambda x: str(x))
def test_gradients_come_from_the_kernels_and_match_float64(b, hq, hkv, sq, sk, d, causal):
    q, k, v, grad, scale, attention = sdpa_training_problem(b, hq, hkv, sq, sk, d, causal)
    seen = CompiledGraphs()
    with recording(seen):
        out = torch.compile(attention, backend="flashmlir", options={"rest": "iree"})(q, k, v)
        got = torch.autograd.grad(out, (q, k, v), grad)
    assert seen.microkernels == {"(forward)": 1, "(backward)": 1}, seen.microkernels
    ref, want = float64_gradients(q, k, v, grad, causal, scale)
    assert rel_err(out, ref) < 1e-5
    for name, g, w in zip("qkv", got, want, strict=True):
        if w.abs().max() < 1e-9:  # one key: dq = dk = 0 exactly (softmax of one score is 1)
            assert g.abs().max() < 1e-5, name
        else:
            assert rel_err(g, w) < 2e-5, name


@pytest.mark.parametrize("b, hq, hkv, sq, sk, d, causal", CASES[1:5], ids=lambda x: str(x))
def test_dropout_pair_through_iree_matches_float64_with_its_seed(b, hq, hkv, sq, sk, d, causal):
    """The dropout pair lowered by our pass to the CPU functions' dropout twins inside IREE: given
    the seed as an input, output and gradients match float64 autograd of flashmlir::attention with
    that seed (a wrong binding, constant or index would be an error of order 1)."""
    q, k, v, grad, scale, _ = sdpa_training_problem(b, hq, hkv, sq, sk, d, causal)
    seed, p = torch.tensor(2024), 0.25

    def attention(q, k, v, seed):
        return torch.ops.flashmlir.attention_forward_dropout(q, k, v, p, seed, causal, scale)[0]

    seen = CompiledGraphs()
    torch._dynamo.reset()
    with recording(seen):
        out = torch.compile(attention, backend="flashmlir", options={"rest": "iree"})(q, k, v, seed)
        got = torch.autograd.grad(out, (q, k, v), grad)
    assert seen.microkernels == {"(forward)": 1, "(backward)": 1}, seen.microkernels
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = torch.ops.flashmlir.attention(q64, k64, v64, None, p, causal, scale, seed)
    want = torch.autograd.grad(ref, (q64, k64, v64), grad.double())
    assert rel_err(out, ref) < 1e-5
    for name, g, w in zip("qkv", got, want, strict=True):
        assert rel_err(g, w) < 2e-5, name


def test_sdpa_with_dropout_trains_through_the_dropout_twins_in_iree():
    """SDPA with dropout in a training graph compiled by IREE: the site becomes the dropout pair
    (both graphs run it as microkernels), a fresh mask per call."""
    q, k, v, grad, scale, _ = sdpa_training_problem(1, 4, 2, 64, 64, 64, True)

    def attention(q, k, v):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, scale=scale,
                                                                enable_gqa=True)

    seen = CompiledGraphs()
    torch._dynamo.reset()
    with recording(seen):
        compiled = torch.compile(attention, backend="flashmlir", options={"rest": "iree"})
        first = compiled(q, k, v)
        got = torch.autograd.grad(first, (q, k, v), grad)
        second = compiled(q, k, v)
    assert seen.microkernels == {"(forward)": 1, "(backward)": 1}, seen.microkernels
    assert all(torch.isfinite(g).all() for g in got) and not torch.equal(first, second)


@pytest.mark.parametrize("hkv, kind, route", [(4, "key padding", "kernels"), (2, "decoder", "kernels"),
                                              (1, "decoder, left padding", "kernels"),
                                              (2, "causal, a query with no key", "aten")])
def test_masked_training_runs_the_masked_pair_and_matches_float64(hkv, kind, route, caplog, monkeypatch):
    """A site with a bool mask in a CPU training graph trains through the masked pair instead of the
    op's textbook backward: a key-padding mask or a decoder's causal-and-padding one through our
    kernels' key-bias entries (forward with lse, backward), any other through ATen's CPU flash
    attention both ways. Output and gradients against float64, rows with no key included."""
    from flashmlir.frontend import masked_training_ops

    calls = []
    aten_forward = masked_training_ops.aten_forward
    monkeypatch.setattr(masked_training_ops, "aten_forward", lambda *a: calls.append("aten") or aten_forward(*a))
    torch.manual_seed(0)
    q = torch.randn(2, 4, 45, 32, requires_grad=True)
    k, v = (torch.randn(2, hkv, 45, 32, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, 1, 1 if kind == "key padding" else 45, 45, dtype=torch.bool)
    mask[1, ..., 37:] = False
    if kind != "key padding":
        mask = mask & torch.ones(45, 45, dtype=torch.bool).tril()
    if kind == "decoder, left padding":
        mask[0, ..., :6] = False  # queries 0-5 attend nothing
    if kind == "causal, a query with no key":
        mask[0, :, 3] = False
    grad = torch.randn(2, 4, 45, 32)
    out, got, want, want_grads = masked_training_against_float64(q, k, v, mask, grad, caplog, scale=0.3)
    assert "1 masked attention site(s) train through fused kernels" in caplog.text
    assert calls == ([] if route == "kernels" else ["aten"])
    assert rel_err(out, want) < 1e-5
    for name, g, w in zip("qkv", got, want_grads, strict=True):
        assert rel_err(g, w) < 2e-5, name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("empty_row", [False, True])
def test_float_masked_training_checks_for_rows_sdpa_gets_wrong(dtype, empty_row, caplog, monkeypatch):
    """A float mask (finfo.min as Hugging Face writes it) trains through fused kernels unless a
    call's mask has a query row whose every key is at finfo.min, which their backwards get wrong;
    then through the op's textbook formula. float32 (what the CPU kernels take): the masked pair
    decides per call (ATen's flash attention here, the mask being neither key padding nor a
    decoder's; the op's reference with the empty row). bf16: torch.cond between SDPA and the op.
    Gradients against float64 either way."""
    from flashmlir.runtime import cpu_kernels

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 20, 16, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(1, 1, 20, 20, dtype=dtype)
    mask[..., :4] = torch.finfo(dtype).min  # the first 4 keys padded out
    if empty_row:
        mask[..., 2, :] = torch.finfo(dtype).min  # and every key of query 2

    textbook_calls = []  # the op (bf16's cond branch) or the pair's reference (float32)
    sdpa, reference = cpu_kernels.sdpa_attention, cpu_kernels.reference_attention
    monkeypatch.setattr(cpu_kernels, "sdpa_attention", lambda *args: textbook_calls.append(1) or sdpa(*args))
    monkeypatch.setattr(cpu_kernels, "reference_attention", lambda *a: textbook_calls.append(1) or reference(*a))
    grad = torch.randn(1, 2, 20, 16, dtype=dtype)
    out, got, want, want_grads = masked_training_against_float64(q, k, v, mask, grad, caplog)
    assert "1 masked attention site(s) train through fused kernels" in caplog.text
    assert "falling back" not in caplog.text
    assert bool(textbook_calls) == empty_row
    tolerance = 2e-5 if dtype == torch.float32 else 2e-2
    assert rel_err(out, want) < tolerance
    for name, g, w in zip("qkv", got, want_grads, strict=True):
        assert rel_err(g, w) < tolerance, name


def test_float_decoder_mask_trains_through_the_kernels(caplog, monkeypatch):
    """A decoder's float mask (causal and padding at finfo.min, as Hugging Face writes it) whose
    every row attends a key: the checked route's fused branch is the masked pair, and the pair runs
    our kernels' key-bias entries causally (not ATen's flash attention). Against float64."""
    from flashmlir.frontend import masked_training_ops

    calls = []
    aten_forward = masked_training_ops.aten_forward
    monkeypatch.setattr(masked_training_ops, "aten_forward", lambda *a: calls.append("aten") or aten_forward(*a))
    torch.manual_seed(0)
    q = torch.randn(2, 4, 40, 32, requires_grad=True)
    k, v = (torch.randn(2, 2, 40, 32, requires_grad=True) for _ in range(2))
    keep = torch.ones(2, 1, 1, 40, dtype=torch.bool)
    keep[1, ..., 33:] = False
    mask = torch.zeros(2, 1, 40, 40).masked_fill(~(keep & torch.ones(40, 40, dtype=torch.bool).tril()),
                                                 torch.finfo(torch.float32).min)
    grad = torch.randn(2, 4, 40, 32)
    out, got, want, want_grads = masked_training_against_float64(q, k, v, mask, grad, caplog, scale=0.3)
    assert "1 masked attention site(s) train through fused kernels" in caplog.text
    assert "falling back" not in caplog.text and calls == []
    assert rel_err(out, want) < 1e-5
    for name, g, w in zip("qkv", got, want_grads, strict=True):
        assert rel_err(g, w) < 2e-5, name
