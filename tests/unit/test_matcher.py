"""The FX matcher on pre-dispatch ATen graphs: what it finds, what it recovers, what it declines."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from flashmlir.frontend.attention_op import attention_overload
from flashmlir.frontend.matcher import find_attention, replace_attention
from tests.helpers import rel_err


def _graph(fn, *inputs):
    return make_fx(fn, pre_dispatch=True)(*inputs)


def _qkv(*shape):
    return tuple(torch.randn(shape) for _ in range(3))


def test_manual_mul_scale_and_additive_mask():
    def fn(q, k, v, m):
        return F.softmax((q @ k.transpose(-2, -1)) * 0.125 + m, dim=-1) @ v

    q, k, v = _qkv(2, 4, 16, 64)
    m = torch.randn(2, 1, 16, 16)
    (site,) = find_attention(_graph(fn, q, k, v, m)).sites
    assert (site.family, site.mask_kind, site.mask_shape, site.is_causal) == (
        "matmul-softmax-matmul", "additive", (2, 1, 16, 16), False)
    assert site.scale == pytest.approx(0.125)
    assert (site.q_shape, site.dtype, site.gqa_groups) == ((2, 4, 16, 64), "float32", 1)


def test_div_scale_masked_fill_and_rank3_bmm():
    def fn(q, k, v, keep):
        s = torch.bmm(q, k.permute(0, 2, 1)) / math.sqrt(q.shape[-1])
        return torch.bmm(s.masked_fill(~keep, float("-inf")).softmax(-1), v)

    q, k, v = _qkv(8, 16, 16)
    keep = torch.ones(16, 16, dtype=torch.bool).tril()
    (site,) = find_attention(_graph(fn, q, k, v, keep)).sites
    assert site.scale == pytest.approx(0.25) and site.mask_kind == "boolean"


def test_known_input_mask_becomes_causal_and_is_listed():
    """A mask computed from a graph input is evaluated only when its value is given (`known`)."""
    def fn(q, k, v, tril):
        s = (q @ k.transpose(-2, -1)) * 0.25
        return F.softmax(s.masked_fill(tril[:, :, :16, :16] == 0, float("-inf")), dim=-1) @ v

    q, k, v = _qkv(1, 2, 16, 16)
    tril = torch.ones(32, 32).tril().view(1, 1, 32, 32)
    gm = _graph(fn, q, k, v, tril)
    buffer = list(gm.graph.find_nodes(op="placeholder"))[3]
    (site,) = find_attention(gm).sites
    assert (site.is_causal, site.mask_kind, site.assumes) == (False, "boolean", ())
    result = find_attention(gm, {buffer: tril})
    (site,) = result.sites
    assert (site.is_causal, site.mask_kind, site.assumes) == (True, "none", (buffer,))
    assert result.assumed_inputs() == [buffer]
    not_causal = tril.clone()
    not_causal[..., 0, 1] = 1
    (site,) = find_attention(gm, {buffer: not_causal}).sites
    assert (site.is_causal, site.mask_kind, site.assumes) == (False, "boolean", ())


def test_sdpa_causal_gqa_and_default_scale():
    def fn(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q = torch.randn(1, 8, 32, 16)
    k, v = torch.randn(1, 2, 32, 16), torch.randn(1, 2, 32, 16)
    (site,) = find_attention(_graph(fn, q, k, v)).sites
    assert (site.family, site.is_causal, site.gqa_groups) == ("sdpa", True, 4)
    assert site.scale == pytest.approx(0.25)


def test_fp32_softmax_upcast_is_part_of_the_site():
    def fn(q, k, v):
        p = F.softmax((q @ k.transpose(-2, -1)) * 0.25, dim=-1, dtype=torch.float32).to(q.dtype)
        return p @ v

    q, k, v = (t.to(torch.bfloat16) for t in _qkv(1, 2, 16, 16))
    (site,) = find_attention(_graph(fn, q, k, v)).sites
    assert site.dtype == "bfloat16"


def _returns_weights(q, k, v):
    p = F.softmax(q @ k.transpose(-2, -1), -1)
    return p @ v, p


@pytest.mark.parametrize(
    "fn, reason",
    [
        (lambda q, k, v: F.softmax(q @ k.transpose(-2, -1), dim=-2) @ v,
         "softmax on dim 2, expected the last (key) axis 3"),
        (lambda q, k, v: F.softmax(q @ k, dim=-1) @ v,
         "not K with its last two dims swapped"),
        (lambda q, k, v: _returns_weights(q, k, v), "has 2 users"),
        (lambda q, k, v: F.softmax((q @ k.transpose(-2, -1)).tanh(), -1) @ v,
         "tanh.default between Q·Kᵀ and softmax is not understood"),
    ],
    ids=["softmax-dim", "no-transpose", "weights-escape", "softcap-like"],
)
def test_near_misses_say_why(fn, reason):
    result = find_attention(_graph(fn, *_qkv(2, 2, 16, 16)))
    assert not result.sites
    assert any(reason in m.reason for m in result.near_misses), [m.reason for m in result.near_misses]


def test_replacement_computes_the_same_function():
    def fn(q, k, v, m):
        return F.softmax((q @ k.transpose(-2, -1)) * 0.3 + m, dim=-1) @ v + F.scaled_dot_product_attention(q, k, v)

    inputs = (*_qkv(2, 3, 24, 8), torch.randn(24, 24))
    gm = _graph(fn, *inputs)
    result = find_attention(gm)
    replace_attention(gm, result.sites)
    targets = [n.target for n in gm.graph.nodes if n.op == "call_function"]
    assert targets.count(attention_overload()) == 2
    assert torch.ops.aten.softmax.int not in targets
    assert rel_err(gm(*inputs), fn(*inputs)) < 1e-6


@pytest.mark.parametrize("manual", [True, False], ids=["manual", "sdpa"])
def test_dropout_sites_get_a_fresh_seed_per_call(manual):
    def fn(q, k, v):
        if manual:
            return F.dropout(F.softmax(q @ k.transpose(-2, -1) * 0.25, -1), 0.2, training=True) @ v
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.2)

    gm = _graph(fn, *_qkv(1, 2, 16, 16))
    result = find_attention(gm)
    (site,) = result.sites
    assert site.dropout_p == pytest.approx(0.2)
    replace_attention(gm, result.sites)
    (call,) = [n for n in gm.graph.nodes if n.target == attention_overload()]
    seed = call.args[7]
    assert seed.target == torch.ops.aten.randint.low
