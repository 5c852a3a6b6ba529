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
from tests.helpers import float64_gradients, rel_err, sdpa_training_problem


@pytest.fixture(autouse=True)
def _needs_the_cpu_kernels(monkeypatch):
    try:
        microkernels.select_cpu_attention_backward(get_target("cpu").cpu_features, "f32", 64)
    except microkernels.NoKernel as why:
        pytest.skip(str(why))
    monkeypatch.setenv("FLASHMLIR_POISON_OUTPUTS", "1")


class _Compiled:
    """Recorder: the microkernel count of each compiled graph, by its kind ("(forward)", …)."""

    def __init__(self):
        self.microkernels: dict[str, int] = {}

    def graph_compiled(self, graph, tiled, declines, microkernels=0):
        self.microkernels[graph.rsplit(" ", 1)[-1]] = microkernels

    def graph_rejected(self, graph, reason):
        raise AssertionError(f"{graph} fell back: {reason}")

    def graph_ran(self, graph, sites, near_misses):
        pass


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
    seen = _Compiled()
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
