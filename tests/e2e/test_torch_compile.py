"""torch.compile(backend="flashmlir") on the CPU, end to end, against float64 eager references.

Every test runs with FLASHMLIR_STRICT=1 (tests/conftest.py): a graph that fell back to eager
would fail the test, so a passing test means our passes and IREE computed the result.
"""

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import flashmlir
from tests.helpers import rel_err

B, H, S, D = 2, 4, 37, 32  # S odd: not a multiple of any tile size


def manual_mul(q, k, v):
    return F.softmax((q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.shape[-1])), dim=-1) @ v


def manual_div_mask(q, k, v, m):
    return torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1]) + m, dim=-1) @ v


def nanogpt_masked_fill(q, k, v, tril):
    att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
    att = att.masked_fill(tril[:, :, : q.shape[-2], : q.shape[-2]] == 0, float("-inf"))
    return F.softmax(att, dim=-1) @ v


def bmm_3d(q, k, v):
    q3, k3, v3 = (t.reshape(-1, *t.shape[-2:]) for t in (q, k, v))
    return torch.bmm(F.softmax(torch.bmm(q3, k3.transpose(1, 2)) * 0.2, -1), v3)


def sdpa_causal(q, k, v):
    return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def sdpa_mask(q, k, v, m):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=m)


def sdpa_gqa(q, k, v):
    return F.scaled_dot_product_attention(q, k[:, :2], v[:, :2], enable_gqa=True, scale=0.3)


def sdpa_merge_heads(q, k, v):
    # CPU SDPA returns [B, S, H, D] memory order, so `.contiguous()` below is a no-op in the traced
    # graph; our op's output must keep that layout or the view is invalid.
    y = F.scaled_dot_product_attention(q, k, v)
    return y.transpose(1, 2).contiguous().view(q.shape[0], q.shape[2], -1)


def _inputs(form):
    q, k, v = (torch.randn(B, H, S, D) for _ in range(3))
    if form in ("manual_div_mask", "sdpa_float_mask"):
        return q, k, v, torch.randn(B, 1, S, S)
    if form == "sdpa_bool_mask":
        keep = torch.rand(B, 1, 1, S) > 0.3
        keep[..., 0] = True
        return q, k, v, keep
    if form == "nanogpt_masked_fill":
        return q, k, v, torch.tril(torch.ones(64, 64)).view(1, 1, 64, 64)
    if form == "sdpa_cross":
        return q, torch.randn(B, H, 53, D), torch.randn(B, H, 53, D)
    return q, k, v


FORMS = {
    "manual_mul": manual_mul,
    "manual_div_mask": manual_div_mask,
    "nanogpt_masked_fill": nanogpt_masked_fill,
    "bmm_3d": bmm_3d,
    "sdpa_causal": sdpa_causal,
    "sdpa_float_mask": sdpa_mask,
    "sdpa_bool_mask": sdpa_mask,
    "sdpa_gqa": sdpa_gqa,
    "sdpa_cross": F.scaled_dot_product_attention,
    "sdpa_merge_heads": sdpa_merge_heads,
}


@pytest.mark.parametrize("form", FORMS)
def test_attention_forms_match_float64(form):
    fn, inputs = FORMS[form], _inputs(form)
    report = flashmlir.explain(fn, *inputs, backend_options={"rest": "iree"})  # the default: masks go to Inductor
    assert len(report.sites) == 1 and report.compiled and report.tiled == 1, str(report)
    with torch.no_grad():
        out = torch.compile(fn, backend="flashmlir")(*inputs)
        ref = fn(*(x.double() if x.is_floating_point() else x for x in inputs))
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 1e-5


class Block(nn.Module):
    """A GPT-2-style block: causal self-attention written by hand (the nanoGPT slow path)."""

    def __init__(self, d: int = 64, heads: int = 4, graph_break: bool = False):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))
        self.heads, self.graph_break = heads, graph_break
        self.register_buffer("bias", torch.tril(torch.ones(128, 128)).view(1, 1, 128, 128))

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
        att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
        y = (F.softmax(att, dim=-1) @ v).transpose(1, 2).contiguous().view(b, t, c)
        if self.graph_break:
            torch._dynamo.graph_break()
        x = x + self.proj(y)
        return x + self.mlp(self.ln2(x))


@pytest.mark.parametrize("graph_break", [False, True], ids=["one-graph", "graph-breaks"])
def test_two_layer_model_has_two_sites(graph_break):
    model = nn.Sequential(Block(graph_break=graph_break), Block(graph_break=graph_break)).eval()
    x = torch.randn(2, 50, 64)
    with torch.no_grad():
        report = flashmlir.explain(model, x)
        assert len(report.sites) == 2, str(report)
        # The tril buffer is read at compile time: causal, no S×S mask (checked per call).
        assert all(s.is_causal and s.mask_kind == "none" and s.scale == pytest.approx(0.25) for s in report.sites)
        assert report.compiled
        out = torch.compile(model, backend="flashmlir")(x)
        ref = model.double()(x.double())
    assert rel_err(out, ref) < 1e-5


def test_causal_buffer_is_checked_on_every_call(lenient, caplog):
    """The compiled graph relies on the tril buffer's value: an equal new buffer keeps it, a changed
    one runs eagerly (with the changed mask), never the stale causal kernel."""
    model = Block().eval()
    x = torch.randn(2, 50, 64)
    compiled = torch.compile(model, backend="flashmlir")
    with torch.no_grad():
        assert rel_err(compiled(x), model.double()(x.double())) < 1e-5
        model.float()  # new buffer objects, same values
        caplog.clear()
        assert rel_err(compiled(x), model.double()(x.double())) < 1e-5
        assert "running eager" not in caplog.text
        model.float()
        model.bias[..., 3, 10:] = 1.0  # row 3 now sees future keys
        assert rel_err(compiled(x), model.double()(x.double())) < 1e-5
        assert "no longer holds the value" in caplog.text


def test_training_step_gradients_match_float64():
    model = Block().train()
    reference = Block().double()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 40, 64)
    compiled = torch.compile(model, backend="flashmlir")
    compiled(x).square().mean().backward()
    reference(x.double()).square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < 1e-5, name


@pytest.mark.parametrize("dtype, tol", [(torch.float16, 2e-3), (torch.bfloat16, 1e-2)])
def test_half_precision_inputs(dtype, tol):
    q, k, v = (torch.randn(1, 4, 96, 64, dtype=dtype) for _ in range(3))
    with torch.no_grad():
        out = torch.compile(sdpa_causal, backend="flashmlir")(q, k, v)
    assert out.dtype == dtype
    assert rel_err(out, sdpa_causal(q.double(), k.double(), v.double())) < tol


@pytest.mark.parametrize("head_dim", [16, 128, 256])
def test_head_dims(head_dim):
    q, k, v = (torch.randn(1, 2, 70, head_dim) for _ in range(3))
    with torch.no_grad():
        out = torch.compile(sdpa_causal, backend="flashmlir")(q, k, v)
    assert rel_err(out, sdpa_causal(q.double(), k.double(), v.double())) < 1e-5


def test_multihead_attention_training():
    """nn.MultiheadAttention's in-projection produces aten.squeeze.dims (decomposed for IREE)."""
    model = nn.MultiheadAttention(64, 4, batch_first=True)
    x = torch.randn(2, 30, 64, requires_grad=True)

    def step(m, x):
        return m(x, x, x, need_weights=False)[0].square().mean()

    torch.compile(step, backend="flashmlir")(model, x).backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    step(model, x).backward()
    for got, want in zip(grads, [p.grad for p in model.parameters()] + [x.grad], strict=True):
        assert rel_err(got, want) < 1e-5
