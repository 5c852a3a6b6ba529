"""The matcher on the way real models write attention: nanoGPT and Hugging Face families.

Each model is built from a small config with random weights, compiled with FLASHMLIR_STRICT=1
(any fallback fails the test), and checked three ways: the number of attention sites
flashmlir.explain reports (and what it recovered), that our tile pass lowered every one, and the
output against eager PyTorch.
"""

import os

import pytest
import torch

import flashmlir
from flashmlir.frontend import matcher
from tests.helpers import rel_err
from tests.models import hf_model, nanogpt

pytest.importorskip("transformers")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

# model → (sites per forward, causal sites, GQA group size, mask kinds seen)
EXPECTED = {
    "gpt2": (2, 2, 1, {"none"}),  # causal mask built from constants: recovered as is_causal
    "llama": (2, 0, 2, {"additive", "boolean"}),  # repeat_kv peeled; causal + left padding stays a mask
    "mistral": (2, 0, 2, {"additive", "boolean"}),
    "qwen2": (2, 0, 2, {"additive", "boolean"}),
    "bert": (2, 0, 1, {"additive", "boolean"}),  # extended padding mask
    "t5": (6, None, 1, None),  # encoder, decoder self (causal), cross; position bias added
    "vit": (2, 0, 1, {"none"}),
    "whisper": (6, 2, 1, {"none"}),  # decoder self-attention causal; cross-attention Sq != Sk
    "bart": (6, 2, 1, {"none"}),
}


def _run(model, kwargs, forward_kwargs):
    return model(**kwargs, **forward_kwargs, return_dict=False)[0]


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("name", list(EXPECTED))
def test_hf_model(name, attn):
    torch.manual_seed(0)
    model, inputs, forward_kwargs = hf_model(name, attn)
    model.eval()
    sites, causal, groups, mask_kinds = EXPECTED[name]

    def forward(**x):
        return _run(model, x, forward_kwargs)

    with torch.no_grad():
        # IREE's compile of every site (the default takes masked CPU inference graphs to Inductor
        # and torch's SDPA, which the compile below checks)
        report = flashmlir.explain(forward, backend_options={"rest": "iree"}, **inputs)
        assert len(report.sites) == sites, str(report)
        assert report.compiled and report.tiled == sites, str(report)
        if causal is not None:
            assert sum(s.is_causal for s in report.sites) == causal, str(report)
        assert {s.gqa_groups for s in report.sites} == {groups}
        if mask_kinds is not None:
            assert {s.mask_kind for s in report.sites} <= mask_kinds, str(report)
        out = torch.compile(forward, backend="flashmlir")(**inputs)
        eager = forward(**inputs)
    assert not torch.isnan(out).any()
    assert rel_err(out, eager) < 1e-5


def test_t5_sites_carry_the_position_bias():
    model, inputs, forward_kwargs = hf_model("t5", "eager")
    with torch.no_grad():
        report = flashmlir.explain(lambda **x: _run(model.eval(), x, forward_kwargs), **inputs)
    assert all(s.scale == 1.0 for s in report.sites)  # T5 does not scale the scores
    assert sum("additive" in s.mask_kind for s in report.sites) >= 4  # encoder and decoder self-attention


def test_gqa_stays_gqa_without_repeated_kv(monkeypatch):
    """LLaMA's repeat_kv copies are gone from the graph once the sites are replaced."""
    rewritten = []
    original = matcher.replace_attention

    def capture(gm, sites):
        original(gm, sites)
        rewritten.append(gm)

    monkeypatch.setattr(matcher, "replace_attention", capture)
    model, inputs, forward_kwargs = hf_model("llama", "eager")
    with torch.no_grad():
        flashmlir.explain(lambda **x: _run(model.eval(), x, forward_kwargs), compile=False, **inputs)
    (gm,) = rewritten
    expands = [n for n in gm.graph.nodes if n.target == torch.ops.aten.expand.default
               and len(n.args[1]) == 5]  # [B, Hkv, n_rep, S, D]
    assert not expands
    calls = [n for n in gm.graph.nodes if n.target == torch.ops.flashmlir.attention.default]
    assert [tuple(c.args[1].meta["val"].shape) for c in calls] == [(2, 2, 16, 16)] * 2  # Hkv = 2


@pytest.mark.parametrize("flash", [False, True], ids=["slow-path", "sdpa-path"])
def test_nanogpt(flash):
    torch.manual_seed(0)
    model = nanogpt(flash).eval()
    x = torch.randn(2, 24, 64)
    with torch.no_grad():
        report = flashmlir.explain(model, x)
        assert len(report.sites) == 2 and report.tiled == 2
        # Slow path: the tril buffer is a graph input whose compile-time value is causal (checked per call).
        assert all(s.is_causal and s.mask_kind == "none" for s in report.sites)
        out = torch.compile(model, backend="flashmlir")(x)
        assert rel_err(out, model(x)) < 1e-5


def test_llama_training_gradients_match_eager():
    torch.manual_seed(0)
    model, inputs, forward_kwargs = hf_model("llama", "eager")
    model.train()

    def loss(**x):
        return _run(model, x, forward_kwargs).float().square().mean()

    torch.compile(loss, backend="flashmlir")(**inputs).backward()
    compiled = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    loss(**inputs).backward()
    for n, p in model.named_parameters():
        assert rel_err(compiled[n], p.grad) < 1e-4, n


def test_bert_training_with_dropout_is_matched_and_compiled():
    torch.manual_seed(0)
    model, inputs, _ = hf_model("bert", "eager")  # attention_probs_dropout_prob = 0.1
    model.train()
    # Random weights, not a plain mean of squares: after the final LayerNorm that is 1 whatever
    # dropout did, and two steps would differ only by rounding.
    weights = torch.randn(*inputs["input_ids"].shape, model.config.hidden_size)

    def loss(**x):
        return (model(**x, return_dict=False)[0] * weights).mean()

    report = flashmlir.explain(loss, **inputs)
    assert len(report.sites) == 2 and all(s.dropout_p == pytest.approx(0.1) for s in report.sites)
    assert report.compiled
    compiled = torch.compile(loss, backend="flashmlir")
    first = compiled(**inputs)
    first.backward()
    assert torch.isfinite(first) and all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert compiled(**inputs).item() != first.item()  # a fresh dropout mask per step


def test_dropout_is_unbiased_in_value_and_gradient():
    """E[out] and E[grad] of a dropout site equal those without dropout (linear loss)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 16, 8, requires_grad=True) for _ in range(3))
    w = torch.randn(1, 2, 16, 8)

    def site(q, k, v, p):
        scores = torch.softmax(q @ k.transpose(-2, -1) * 0.35, dim=-1)
        return torch.nn.functional.dropout(scores, p, training=True) @ v

    compiled = torch.compile(lambda q, k, v: (site(q, k, v, 0.3) * w).sum(), backend="flashmlir")
    steps, total, grads = 300, 0.0, torch.zeros_like(q)
    for _ in range(steps):
        q.grad = None
        value = compiled(q, k, v)
        value.backward()
        total += value.item()
        grads += q.grad
    q.grad = None
    exact = (site(q, k, v, 0.0) * w).sum()
    exact.backward()
    assert abs(total / steps - exact.item()) < 0.1 * exact.abs().item() + 0.1
    assert rel_err(grads / steps, q.grad) < 0.15


def test_returned_attention_weights_are_not_replaced():
    model, inputs, _ = hf_model("bert", "eager")
    with torch.no_grad():
        report = flashmlir.explain(lambda **x: model.eval()(**x, output_attentions=True, return_dict=False)[0], **inputs)
    assert not report.sites and report.compiled
    assert any("users" in r.reason for r in report.rejected if r.kind == "near-miss")


def test_gpt2_legacy_where_and_tensor_scale():
    from tests.models import GPT2LegacyAttention

    torch.manual_seed(0)
    model = GPT2LegacyAttention().eval()
    x = torch.randn(2, 20, 64)
    pad = torch.zeros(2, 1, 1, 20)
    pad[1, ..., -5:] = torch.finfo(torch.float32).min
    with torch.no_grad():
        report = flashmlir.explain(model, x, pad)
        (site,) = report.sites
        # The where() on the causal buffer becomes is_causal (the buffer's value is known when
        # compiling, checked per call); the additive padding mask stays.
        assert site.scale == pytest.approx(0.25) and site.is_causal and site.mask_kind == "additive"
        assert report.tiled == 1
        assert rel_err(torch.compile(model, backend="flashmlir")(x, pad), model(x, pad)) < 1e-5


def test_timm_q_scaled_attention():
    from tests.models import TimmAttention

    model = TimmAttention().eval()
    x = torch.randn(2, 17, 64)
    with torch.no_grad():
        report = flashmlir.explain(model, x)
        assert len(report.sites) == 1 and report.tiled == 1
        assert rel_err(torch.compile(model, backend="flashmlir")(x), model(x)) < 1e-5


@pytest.mark.parametrize("form", ["einsum-4d", "einsum-3d", "expand-bmm"])
def test_einsum_and_expand_bmm(form):
    def einsum4(q, k, v):
        return torch.einsum("bhqk,bhkd->bhqd", (torch.einsum("bhqd,bhkd->bhqk", q, k) * 0.25).softmax(-1), v)

    def einsum3(q, k, v):
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))
        return torch.einsum("b i j, b j d -> b i d", (torch.einsum("b i d, b j d -> b i j", q, k) * 0.25).softmax(-1), v)

    def expand_bmm(q, k, v):
        b, h, s, d = q.shape
        q3, k3, v3 = (t.expand(b, h, s, d).reshape(b * h, s, d) for t in (q, k, v))
        return torch.bmm(torch.bmm(q3, k3.transpose(1, 2)).mul(0.25).softmax(-1), v3).view(b, h, s, d)

    fn = {"einsum-4d": einsum4, "einsum-3d": einsum3, "expand-bmm": expand_bmm}[form]
    q, k, v = (torch.randn(2, 4, 21, 16) for _ in range(3))
    with torch.no_grad():
        report = flashmlir.explain(fn, q, k, v)
        assert len(report.sites) == 1 and report.tiled == 1
        assert rel_err(torch.compile(fn, backend="flashmlir")(q, k, v), fn(q, k, v)) < 1e-5


def test_bf16_llama_with_fp32_softmax():
    torch.manual_seed(0)
    model, inputs, forward_kwargs = hf_model("llama", "eager")
    model = model.to(torch.bfloat16).eval()
    with torch.no_grad():
        report = flashmlir.explain(lambda **x: _run(model, x, forward_kwargs), **inputs)
        assert len(report.sites) == 2 and all(s.dtype == "bfloat16" and s.gqa_groups == 2 for s in report.sites)
        out = torch.compile(lambda **x: _run(model, x, forward_kwargs), backend="flashmlir")(**inputs)
        eager = _run(model, inputs, forward_kwargs)
    assert not torch.isnan(out).any() and rel_err(out, eager) < 2e-2
