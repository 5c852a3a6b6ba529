"""Training on the CPU with Inductor compiling the rest of the graph (rest="inductor", the default
for CPU training graphs): our ops stay in Inductor's graph and run the library's CPU kernels from
their shared library (runtime/cpu_kernels.py).

Each case counts the kernel functions the step called (the forward with lse, then the backward in
one pass or split in two, whichever CpuAttentionKernel.fuses_backward picks for the thread count)
and compares q/k/v gradients with float64 autograd on random inputs. Also: which rest `auto`
picks (Inductor for training graphs, IREE for inference ones), and that a float64 site runs the
op's reference instead of a kernel.
"""

import pytest
import torch
import torch.nn.functional as F

from flashmlir.compiler import microkernels
from flashmlir.compiler.targets import get_target
from flashmlir.runtime import cpu_kernels
from tests.helpers import float64_gradients, rel_err, sdpa_training_problem


@pytest.fixture(autouse=True)
def _needs_the_cpu_library():
    try:
        kernel = microkernels.select_cpu_attention_backward(get_target("cpu").cpu_features, "f32", 64)
    except microkernels.NoKernel as why:
        pytest.skip(str(why))
    if not kernel.shared_library.is_file():
        pytest.skip(f"{kernel.shared_library} was not built")


@pytest.fixture
def calls(monkeypatch):
    """The kernel functions run, by symbol name."""
    seen: list[str] = []
    run = cpu_kernels._run

    def spy(function, tensors, constants, workgroups):
        seen.append(function.__name__)
        return run(function, tensors, constants, workgroups)

    monkeypatch.setattr(cpu_kernels, "_run", spy)
    return seen


CASES = [
    # b, hq, hkv, sq, sk, d, causal
    (2, 4, 2, 37, 37, 32, True),
    (1, 3, 3, 100, 300, 128, False),
    (1, 2, 1, 333, 129, 64, True),
    (1, 8, 8, 96, 71, 64, True),
]


@pytest.mark.parametrize("rest, b, hq, hkv, sq, sk, d, causal",
                         [("inductor", *case) for case in CASES] + [("auto", *CASES[-1])], ids=lambda x: str(x))
def test_gradients_come_from_the_kernels_and_match_float64(calls, rest, b, hq, hkv, sq, sk, d, causal):
    q, k, v, grad, scale, attention = sdpa_training_problem(b, hq, hkv, sq, sk, d, causal)
    torch._dynamo.reset()
    out = torch.compile(attention, backend="flashmlir", options={"rest": rest})(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), grad)
    name = f"flashmlir_attention_bwd_cpu_f32_d{d}"
    fused = microkernels.select_cpu_attention_backward(get_target("cpu").cpu_features, "f32", d).fuses_backward(
        b * hkv, torch.get_num_threads())
    assert calls == [f"flashmlir_attention_fwd_cpu_f32_d{d}_lse",
                     *([f"{name}_fused"] if fused else [f"{name}_dq", f"{name}_dkdv"])], calls
    ref, want = float64_gradients(q, k, v, grad, causal, scale)
    assert rel_err(out, ref) < 1e-5
    for n, g, w in zip("qkv", got, want, strict=True):
        assert rel_err(g, w) < 2e-5, n


def test_auto_leaves_inference_graphs_to_iree(calls):
    q, k, v = (torch.randn(1, 2, 64, 32) for _ in range(3))
    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(F.scaled_dot_product_attention, backend="flashmlir")(q, k, v)
    assert calls == []  # IREE ran the kernel (linked into its executable), not the torch path
    assert rel_err(out, F.scaled_dot_product_attention(q.double(), k.double(), v.double())) < 1e-5


def test_a_site_the_kernels_do_not_take_runs_the_reference(calls):
    q = torch.randn(1, 2, 40, 32, dtype=torch.float64, requires_grad=True)
    k, v = (torch.randn(1, 2, 40, 32, dtype=torch.float64, requires_grad=True) for _ in range(2))
    torch._dynamo.reset()
    out = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                        backend="flashmlir", options={"rest": "inductor"})(q, k, v)
    out.sum().backward()
    assert calls == []
    assert rel_err(out, F.scaled_dot_product_attention(q, k, v, is_causal=True)) < 1e-10


@pytest.fixture
def runs(monkeypatch):
    """The kernel functions run and their tensors, in order."""
    seen: list[tuple[str, tuple]] = []
    run = cpu_kernels._run

    def spy(function, tensors, constants, workgroups):
        seen.append((function.__name__, tensors))
        return run(function, tensors, constants, workgroups)

    monkeypatch.setattr(cpu_kernels, "_run", spy)
    return seen


@pytest.mark.parametrize("fused", [False, True], ids=["split", "fused"])
@pytest.mark.parametrize("b, hq, hkv, sq, sk, d, causal", CASES, ids=lambda x: str(x))
def test_dropout_pair_runs_the_dropout_twins_and_matches_float64(runs, monkeypatch, fused, b, hq, hkv, sq, sk, d,
                                                                 causal):
    """The CPU kernels' dropout twins (cpu_dropout.h) drop what attention_op.dropout_keep drops: the
    pair's output and gradients against float64 autograd of flashmlir::attention with the same seed
    (a wrong index would be an error of order 1)."""
    from flashmlir.compiler.microkernels import CpuAttentionKernel
    from flashmlir.runtime import torch_kernels

    torch_kernels.register()
    monkeypatch.setattr(CpuAttentionKernel, "fuses_backward", lambda self, heads, threads: fused)
    q, k, v, grad, scale, _ = sdpa_training_problem(b, hq, hkv, sq, sk, d, causal)
    seed, p = torch.tensor(424242), 0.2
    out, lse = torch.ops.flashmlir.attention_forward_dropout(q, k, v, p, seed, causal, scale)
    got = torch.autograd.grad(out, (q, k, v), grad)
    name = f"flashmlir_attention_bwd_cpu_f32_d{d}"
    parts = [f"{name}_fused_dropout"] if fused else [f"{name}_dq_dropout", f"{name}_dkdv_dropout"]
    assert [n for n, _ in runs] == [f"flashmlir_attention_fwd_cpu_f32_d{d}_lse_dropout", *parts]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want_out = torch.ops.flashmlir.attention(q64, k64, v64, None, p, causal, scale, seed)
    want = torch.autograd.grad(want_out, (q64, k64, v64), grad.double())
    plain = torch.ops.flashmlir.attention(q64, k64, v64, None, 0.0, causal, scale)
    assert rel_err(out, want_out) < 1e-5 and rel_err(out, plain) > 0.1
    for n, g, w in zip("qkv", got, want, strict=True):
        assert rel_err(g, w) < 2e-5, n


def test_training_with_dropout_takes_the_dropout_twins(runs):
    """SDPA with dropout in a CPU training graph (the default: Inductor around our ops) becomes the
    dropout pair; the kernels get the graph's seed, and the gradients match float64 with it."""
    q, k, v, grad, scale, _ = sdpa_training_problem(1, 4, 2, 70, 70, 64, True)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.1, is_causal=True, scale=scale, enable_gqa=True)

    torch._dynamo.reset()
    out = torch.compile(attention, backend="flashmlir")(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), grad)
    names = [n for n, _ in runs]
    assert names[0] == "flashmlir_attention_fwd_cpu_f32_d64_lse_dropout" and all(n.endswith("_dropout") for n in names)
    seed = runs[0][1][3].reshape(())  # (q, k, v, seed, out, lse)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want_out = torch.ops.flashmlir.attention(q64, k64, v64, None, 0.1, True, scale, seed)
    want = torch.autograd.grad(want_out, (q64, k64, v64), grad.double())
    assert rel_err(out, want_out) < 1e-5
    for n, g, w in zip("qkv", got, want, strict=True):
        assert rel_err(g, w) < 2e-5, n
