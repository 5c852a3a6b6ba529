"""The training ops (forward with lse, backward from lse) and the graph rewrite that introduces them."""

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

from flashmlir.frontend.attention_op import attention_overload
from flashmlir.frontend.training_ops import (
    backward_overload,
    forward_dropout_overload,
    forward_overload,
    rewrite_for_training,
)
from tests.helpers import attention64, rel_err

CASES = {
    "mha": dict(q=(2, 4, 33, 16), kv=(2, 4, 40, 16)),
    "gqa": dict(q=(2, 8, 24, 16), kv=(2, 2, 24, 16)),
    "rank3": dict(q=(6, 20, 8), kv=(6, 20, 8)),
    "longer_queries": dict(q=(1, 2, 37, 16), kv=(1, 2, 5, 16)),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_forward_returns_output_and_lse(case, causal):
    c = CASES[case]
    q, k, v = torch.randn(c["q"]), torch.randn(c["kv"]), torch.randn(c["kv"])
    out, lse = torch.ops.flashmlir.attention_forward(q, k, v, causal, 0.3)
    assert rel_err(out, attention64(q, k, v, None, causal, 0.3)) < 1e-6
    g = q.shape[-3] // k.shape[-3]
    s = (q.double() @ k.double().repeat_interleave(g, -3).transpose(-2, -1)) * 0.3
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    assert lse.dtype == torch.float32 and lse.shape == q.shape[:-1]
    assert (lse.double() - torch.logsumexp(s, -1)).abs().max() < 1e-5


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_gradients_match_float64_autograd(case, causal):
    """attention_forward's autograd formula (attention_backward from the saved lse) is exact."""
    c = CASES[case]
    q, k, v = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in (c["q"], c["kv"], c["kv"]))
    grad = torch.randn(c["q"], dtype=torch.float64)
    out, _ = torch.ops.flashmlir.attention_forward(q, k, v, causal, None)
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(attention64(q, k, v, None, causal), (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-10


def test_backward_op_in_float32_matches_float64():
    q, k, v = torch.randn(1, 4, 50, 32), torch.randn(1, 2, 70, 32), torch.randn(1, 2, 70, 32)
    out, lse = torch.ops.flashmlir.attention_forward(q, k, v, True, None)
    d_o = torch.randn_like(out)
    got = torch.ops.flashmlir.attention_backward(d_o, q, k, v, out, lse, True, None)
    q64, k64, v64 = (x.double().requires_grad_() for x in (q, k, v))
    want = torch.autograd.grad(attention64(q64, k64, v64, None, True), (q64, k64, v64), d_o.double())
    for g, w in zip(got, want, strict=True):
        assert g.dtype == torch.float32 and rel_err(g, w) < 1e-5


def _graph(with_mask: bool):
    def f(q, k, v, m):
        a = torch.ops.flashmlir.attention(q, k, v, None, 0.0, True, None)
        b = torch.ops.flashmlir.attention(q, k, v, m if with_mask else None, 0.0, False, 0.5)
        return a + b

    q = torch.randn(1, 2, 8, 16)
    return make_fx(f, tracing_mode="fake")(q, q, q, torch.zeros(8, 8))


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


def test_rewrite_replaces_sites_the_check_accepts():
    gm = _graph(with_mask=True)
    seen = []
    rewritten, reasons = rewrite_for_training(gm, lambda q, k, v, causal, dropout: seen.append((causal, dropout)))
    assert rewritten == 1 and seen == [(True, False)]  # the masked site is not even asked about
    assert _targets(gm).count(forward_overload()) == 1 and _targets(gm).count(attention_overload()) == 1
    assert "a mask" in reasons[0]
    q = torch.randn(1, 2, 8, 16)
    assert rel_err(gm(q, q, q, torch.zeros(8, 8)), attention64(q, q, q, None, True)
                   + attention64(q, q, q, torch.zeros(8, 8), False, 0.5)) < 1e-6


def test_rewrite_keeps_sites_the_check_refuses():
    gm = _graph(with_mask=False)
    rewritten, reasons = rewrite_for_training(gm, lambda q, k, v, causal, dropout: "no kernel for this")
    assert rewritten == 0 and len(reasons) == 2 and all("no kernel for this" in r for r in reasons)
    assert forward_overload() not in _targets(gm)


def test_training_graph_calls_the_backward_op():
    """aot_autograd's backward graph for a rewritten site holds attention_backward, fed the saved lse."""
    from functorch.compile import aot_function, make_boxed_func

    graphs = {}

    def keep(name):
        def compiler(gm, _):
            graphs[name] = gm
            return make_boxed_func(gm.forward)
        return compiler

    def f(q, k, v):
        return torch.ops.flashmlir.attention_forward(q, k, v, True, None)[0]

    q, k, v = (torch.randn(1, 2, 8, 16, requires_grad=True) for _ in range(3))
    aot_function(f, keep("forward"), keep("backward"))(q, k, v).sum().backward()
    assert forward_overload() in _targets(graphs["forward"])
    assert backward_overload() in _targets(graphs["backward"])
    assert q.grad is not None and k.grad is not None and v.grad is not None


@pytest.mark.parametrize("gqa", [1, 2])
def test_ops_agree_with_their_fakes_on_transposed_views(gqa):
    """Inductor checks a custom op's outputs against its fake's strides: q/k/v here are the
    [B, S, H, D]-ordered views a fused QKV projection gives, and the outputs are still dense."""
    b, s, h, d = 2, 24, 4, 16
    q = torch.randn(b, s, h, d).transpose(1, 2)
    k, v = (torch.randn(b, s, h // gqa, d).transpose(1, 2) for _ in range(2))
    torch.library.opcheck(forward_overload(), (q, k, v, True, None))
    out, lse = forward_overload()(q, k, v, True, None)
    grad = torch.randn(b, s, h, d).transpose(1, 2)
    torch.library.opcheck(backward_overload(), (grad, q, k, v, out, lse, True, None))


def _dropout_graph():
    def f(q, k, v, seed):
        return torch.ops.flashmlir.attention(q, k, v, None, 0.25, True, None, seed)

    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    return make_fx(f, tracing_mode="fake")(q, k, v, torch.tensor(7))


@pytest.mark.parametrize("accept", [False, True])
def test_rewrite_takes_dropout_sites_only_where_the_check_says_dropout_is_served(accept):
    gm = _dropout_graph()
    asked = []

    def check(q, k, v, causal, dropout):
        asked.append(dropout)
        return None if accept else "dropout (no kernel takes it)"

    rewritten, reasons = rewrite_for_training(gm, check)
    assert asked == [True] and rewritten == int(accept)
    assert (forward_dropout_overload() in _targets(gm)) == accept and (attention_overload() in _targets(gm)) != accept
    # the rewritten graph computes the same dropped attention (same seed, same mask)
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    seed = torch.tensor(12345)
    want = torch.ops.flashmlir.attention(q, k, v, None, 0.25, True, None, seed)
    assert rel_err(gm(q, k, v, seed), want) < 1e-6


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_dropout_pair_gives_the_attention_ops_gradients(case, causal):
    """attention_forward_dropout and its backward (mask regenerated from the seed, lse of the
    undropped softmax) against flashmlir::attention's own autograd with the same seed, in float64."""
    c = CASES[case]
    q, k, v = (torch.randn(s, dtype=torch.float64, requires_grad=True) for s in (c["q"], c["kv"], c["kv"]))
    seed, p = torch.tensor(987654321), 0.3
    grad = torch.randn(c["q"], dtype=torch.float64)
    out, lse = forward_dropout_overload()(q, k, v, p, seed, causal, 0.4)
    want_out = torch.ops.flashmlir.attention(q, k, v, None, p, causal, 0.4, seed)
    assert rel_err(out, want_out) < 1e-12
    plain, plain_lse = torch.ops.flashmlir.attention_forward(q, k, v, causal, 0.4)
    assert rel_err(lse, plain_lse) < 1e-12 and rel_err(out, plain) > 0.05  # dropout did drop
    got = torch.autograd.grad(out, (q, k, v), grad)
    want = torch.autograd.grad(want_out, (q, k, v), grad)
    for g, w in zip(got, want, strict=True):
        assert rel_err(g, w) < 1e-10


def test_dropout_ops_agree_with_their_fakes():
    q, k, v = (torch.randn(1, 4, 24, 16) for _ in range(3))
    seed = torch.tensor(3)
    torch.library.opcheck(forward_dropout_overload(), (q, k, v, 0.1, seed, False, None))
    out, lse = forward_dropout_overload()(q, k, v, 0.1, seed, False, None)
    torch.library.opcheck(torch.ops.flashmlir.attention_backward_dropout.default,
                          (torch.randn_like(out), q, k, v, out, lse, 0.1, seed, False, None))
