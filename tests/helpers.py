"""Reference implementations and error measures the tests compare against."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """‖out − ref‖ / ‖ref‖ in float64; NaN anywhere counts as infinitely wrong."""
    out, ref = out.detach().double(), ref.detach().double()
    if torch.isnan(out).any():
        return float("inf")
    return ((out - ref).norm() / ref.norm()).item()


def attention64(q, k, v, mask=None, causal=False, scale=None):
    """softmax(q·kᵀ·scale + mask)·v in float64, GQA and causal spelled out (top-left aligned)."""
    q, k, v = q.double(), k.double(), v.double()
    g = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(g, -3), v.repeat_interleave(g, -3)
    s = (q @ k.transpose(-2, -1)) * (q.shape[-1] ** -0.5 if scale is None else scale)
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


def sdpa_training_problem(b, hq, hkv, sq, sk, d, causal):
    """Random q [b, hq, sq, d] and k, v [b, hkv, sk, d] that need gradients, an upstream gradient, a
    scale other than the default, and SDPA over them (causal or not, GQA where hkv < hq)."""
    q = torch.randn(b, hq, sq, d, requires_grad=True)
    k, v = (torch.randn(b, hkv, sk, d, requires_grad=True) for _ in range(2))
    grad = torch.randn(b, hq, sq, d)
    scale = 0.7 / d ** 0.5

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=hq != hkv)

    return q, k, v, grad, scale, attention


def float64_gradients(q, k, v, grad, causal, scale):
    """attention64's output for q, k, v and its gradients (dq, dk, dv) for the upstream `grad`."""
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    ref = attention64(q64, k64, v64, None, causal, scale)
    return ref, torch.autograd.grad(ref, (q64, k64, v64), grad.double())


class CompiledGraphs:
    """Recorder: the microkernel count of each compiled graph, by its kind ("(forward)", …)."""

    def __init__(self):
        self.microkernels: dict[str, int] = {}

    def graph_compiled(self, graph, tiled, declines, microkernels=0):
        self.microkernels[graph.rsplit(" ", 1)[-1]] = microkernels

    def graph_rejected(self, graph, reason):
        raise AssertionError(f"{graph} fell back: {reason}")

    def graph_ran(self, graph, sites, near_misses):
        pass


def masked_training_against_float64(q, k, v, mask, grad, caplog, scale=None):
    """Compile SDPA with `mask` (GQA where k has fewer heads) through flashmlir, run it forward and
    backward, and return (output, gradients, the op's float64 output, its gradients) with the
    backend's INFO log in `caplog`: what the masked training tests compare. The reference is the
    op's plain-math meaning, differentiated by autograd (no call of the op itself)."""
    from flashmlir.frontend.attention_op import reference_attention

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                              enable_gqa=q.shape[-3] != k.shape[-3])

    torch._dynamo.reset()
    with caplog.at_level("INFO", logger="flashmlir"):
        out = torch.compile(attention, backend="flashmlir")(q, k, v)
    got = torch.autograd.grad(out, (q, k, v), grad)
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    want = reference_attention(q64, k64, v64, mask, 0.0, False, scale)
    return out, got, want, torch.autograd.grad(want, (q64, k64, v64), grad.double())
