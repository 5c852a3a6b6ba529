"""How our ops' CUDA implementations pick, remember and call launches (runtime/torch_kernels.py).

No GPU needed: the launch classes are replaced by recorders and the architecture is pinned, so
what is checked is the bookkeeping (one launch built per problem, the reference where the kernels
do not serve, dense operands handed to the kernels, clear errors), not the kernels.
"""

from __future__ import annotations

import pytest
import torch

from flashmlir.compiler.microkernels import NoKernel
from flashmlir.frontend.training_ops import reference_backward, reference_forward
from flashmlir.runtime import cuda_launcher, torch_kernels


class Recorder:
    """Stands in for a launch class: remembers how it was built and what it was called with."""

    built: list[tuple] = []
    called: list[tuple] = []

    def __init__(self, kernel, q_shape, k_shape, causal, scale, *rest):
        Recorder.built.append((kernel, tuple(q_shape), tuple(k_shape), causal, scale, *rest))

    def __call__(self, *tensors):
        assert all(t.is_contiguous() for t in tensors), "operands reach the kernels dense"
        Recorder.called.append(tensors)
        q = tensors[0]
        if len(tensors) in (3, 4):  # forward (with dropout: and its seed): O, lse
            return torch.full_like(q, 7.0), torch.zeros(q.shape[:-1])
        return tuple(torch.full_like(t, 7.0) for t in tensors[:3])  # backward: dq, dk, dv


@pytest.fixture
def launches(monkeypatch):
    selections = []

    def selected(arch, element, head_dim, backward, deterministic):
        selections.append((element, head_dim, backward, deterministic))
        if head_dim == 96:
            raise NoKernel(f"no kernel for head dim {head_dim}")
        return ("forward", element, head_dim), (("backward", deterministic) if backward else None)

    monkeypatch.setattr(torch_kernels, "_arch", lambda device: "sm_90")
    monkeypatch.setattr(torch_kernels, "_selected", selected)
    monkeypatch.setattr(cuda_launcher, "AttentionForwardLaunch", Recorder)
    monkeypatch.setattr(cuda_launcher, "AttentionBackwardLaunch", Recorder)
    monkeypatch.setattr(torch_kernels, "_launches", {})
    Recorder.built, Recorder.called = [], []
    return selections


def _qkv(d=64, dtype=torch.bfloat16, sq=33, hq=4, hkv=2):
    torch.manual_seed(0)
    return (torch.randn(2, hq, sq, d, dtype=dtype), torch.randn(2, hkv, 40, d, dtype=dtype),
            torch.randn(2, hkv, 40, d, dtype=dtype))


def test_a_problem_builds_its_launch_once(launches):
    q, k, v = _qkv()
    for _ in range(3):
        out, _ = torch_kernels._attention_forward_cuda(q, k, v, True, None)
        assert torch.equal(out, torch.full_like(q, 7.0))
    torch_kernels._attention_forward_cuda(q, k, v, False, None)  # another problem: causal differs
    torch_kernels._attention_cuda(q, k, v, is_causal=True)  # another op: no lse
    assert len(Recorder.called) == 5
    assert [b[3] for b in Recorder.built] == [True, False, True]
    assert [b[5] for b in Recorder.built] == [True, True, False]  # with_lse


def test_problems_the_kernels_do_not_serve_run_the_reference(launches):
    q, k, v = _qkv(d=96)
    out, lse = torch_kernels._attention_forward_cuda(q, k, v, True, None)
    want_out, want_lse = reference_forward(q, k, v, True, None)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)
    q, k, v = _qkv(dtype=torch.float32)
    out, _ = torch_kernels._attention_forward_cuda(q, k, v, False, 0.3)
    assert torch.equal(out, reference_forward(q, k, v, False, 0.3)[0])
    assert not Recorder.built


def test_a_mask_runs_the_reference_without_building_a_launch(launches):
    q, k, v = _qkv()
    mask = torch.rand(33, 40) > 0.3
    out = torch_kernels._attention_cuda(q, k, v, attn_mask=mask)
    assert not Recorder.built and out.shape == q.shape and not torch.equal(out, torch.full_like(q, 7.0))


def test_transposed_views_are_handed_over_dense(launches):
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv())
    assert not q.is_contiguous()
    out, _ = torch_kernels._attention_forward_cuda(q, k, v, True, None)
    assert out.shape == q.shape and len(Recorder.called) == 1


def test_backward_launch_follows_the_deterministic_mode(launches):
    q, k, v = _qkv()
    out, lse = reference_forward(q, k, v, True, None)
    grad = torch.randn_like(out)
    torch_kernels._attention_backward_cuda(grad, q, k, v, out, lse, True, None)
    torch.use_deterministic_algorithms(True)
    try:
        torch_kernels._attention_backward_cuda(grad, q, k, v, out, lse, True, None)
        torch_kernels._attention_backward_cuda(grad, q, k, v, out, lse, True, None)
    finally:
        torch.use_deterministic_algorithms(False)
    assert [b[0] for b in Recorder.built] == [("backward", False), ("backward", True)]
    assert len(Recorder.called) == 3


def test_gradients_in_another_dtype_run_the_reference_backward(launches):
    q, k, v = _qkv()
    out, lse = reference_forward(q, k, v, False, None)
    grad = torch.randn(out.shape)  # float32 against bfloat16 operands: the kernels would misread it
    got = torch_kernels._attention_backward_cuda(grad, q, k, v, out, lse, False, None)
    want = reference_backward(grad, q, k, v, out, lse, False, None)
    assert not Recorder.built
    assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_mismatched_shapes_raise_naming_them(launches):
    q, k, v = _qkv()
    with pytest.raises(ValueError, match=r"head dims must agree.*\(2, 4, 33, 64\)"):
        torch_kernels._attention_forward_cuda(q, k[..., :32], v, False, None)
    assert not torch_kernels._launches  # nothing remembered for a call that raised


def test_dropout_builds_its_own_launch_and_passes_the_seed(launches, monkeypatch):
    """The dropout pair's forward is another problem (its p in the launch), called with the seed;
    the backward likewise. Whether the kernels take dropout at all is the kernels' `dropout`."""
    from types import SimpleNamespace

    from flashmlir.compiler import microkernels

    forward, backward = SimpleNamespace(dropout=True), SimpleNamespace(dropout=True)
    monkeypatch.setattr(torch_kernels, "_selected", lambda *args: (forward, backward))
    monkeypatch.setattr(microkernels, "select_attention_forward", lambda *args, **kwargs: forward)
    q, k, v = _qkv()
    seed = torch.tensor(5)
    torch_kernels._attention_forward_dropout_cuda(q, k, v, 0.1, seed, True, None)
    torch_kernels._attention_forward_cuda(q, k, v, True, None)
    assert [b[-1] for b in Recorder.built] == [0.1, 0.0]  # two launches: p is part of the problem
    assert Recorder.called[0][-1] is seed and len(Recorder.called[1]) == 3
    lse = torch.zeros(q.shape[:-1])
    torch_kernels._attention_backward_dropout_cuda(q, q, k, v, q, lse, 0.1, seed, True, None)
    assert Recorder.called[-1][-1] is seed and Recorder.built[-1][-1] == 0.1


def test_dropout_without_kernels_that_take_it_runs_the_reference(launches, monkeypatch):
    from types import SimpleNamespace

    from flashmlir.compiler import microkernels

    plain = SimpleNamespace(dropout=False)  # kernels without dropout twins
    monkeypatch.setattr(torch_kernels, "_selected", lambda *args: (plain, plain))
    monkeypatch.setattr(microkernels, "select_attention_forward", lambda *args, **kwargs: plain)
    q, k, v = _qkv()
    seed = torch.tensor(5)
    out, lse = torch_kernels._attention_forward_dropout_cuda(q, k, v, 0.1, seed, True, None)
    want, want_lse = reference_forward(q, k, v, True, None, 0.1, seed)
    assert torch.equal(out, want) and torch.equal(lse, want_lse) and not Recorder.built
