"""The CPU attention microkernel, end to end: torch.compile → our passes → IREE → the library object.

Each case compiles SDPA on the CPU, checks through `flashmlir.explain` that the site ran as the
microkernel (not the IREE-codegen fallback), and compares with float64 on random inputs. Outputs
start as NaN (FLASHMLIR_POISON_OUTPUTS), so rows the kernel never wrote fail. The shapes walk the
kernel's edges: one row, rows not a multiple of the 48-row block, keys not a multiple of the
64-key block or the 8-key register tile, seq_q ≠ seq_k both ways under causal masking, GQA
groups, every head dim it has.
"""

import pytest
import torch
import torch.nn.functional as F

import flashmlir
from flashmlir.compiler import microkernels
from flashmlir.compiler.targets import get_target
from flashmlir.dynamo.backend import recording


@pytest.fixture(autouse=True)
def _needs_the_cpu_kernel(monkeypatch):
    try:
        microkernels.select_cpu_attention_forward(get_target("cpu").cpu_features, "f32", 64)
    except microkernels.NoKernel as why:
        pytest.skip(str(why))
    monkeypatch.setenv("FLASHMLIR_POISON_OUTPUTS", "1")


def _reference(q, k, v, causal, scale):
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if causal:  # top-left, as SDPA
        s = s.masked_fill(~torch.ones(s.shape[-2:], dtype=torch.bool).tril(), float("-inf"))
    return torch.softmax(s, -1) @ v


CASES = [
    # b, hq, hkv, sq, sk, d, causal
    (1, 2, 2, 1, 1, 64, False),
    (2, 4, 2, 37, 37, 32, True),
    (1, 3, 3, 100, 300, 128, False),
    (1, 2, 1, 333, 129, 64, True),
    (1, 2, 2, 129, 333, 64, True),
    (2, 2, 2, 49, 49, 64, True),
    (1, 8, 2, 96, 71, 128, False),
    (1, 1, 1, 513, 513, 32, True),
]


@pytest.mark.parametrize("b, hq, hkv, sq, sk, d, causal", CASES, ids=lambda x: str(x))
def test_sdpa_runs_as_the_microkernel_and_matches_float64(b, hq, hkv, sq, sk, d, causal):
    q = torch.randn(b, hq, sq, d)
    k, v = (torch.randn(b, hkv, sk, d) for _ in range(2))
    scale = 0.7 / d ** 0.5

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale, enable_gqa=hq != hkv)

    report = flashmlir.explain(attention, q, k, v)
    assert report.microkernels == 1, str(report)
    with torch.no_grad():
        out = torch.compile(attention, backend="flashmlir")(q, k, v)
    ref = _reference(q, k, v, causal, scale)
    assert not torch.isnan(out).any()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
    assert (out.double() - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("causal", [False, True])
def test_row_maxima_that_keep_rising(causal):
    """Scores growing along the keys: each row's exp2 shift moves by more than its slack (8) in some
    key blocks and rises within it in others (P up to 2^8), and O, ℓ follow both ways."""
    q, k, v = (torch.randn(1, 2, 300, 64) for _ in range(3))
    k = k * torch.linspace(1.0, 6.0, 300)[:, None]

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    with torch.no_grad():
        out = torch.compile(attention, backend="flashmlir")(q, k, v)
    ref = _reference(q, k, v, causal, 64 ** -0.5)
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 4e-3), (torch.float16, 5e-4)])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_runs_the_f32_kernel(dtype, tolerance, causal):
    """bf16/f16 inputs are widened exactly, so the only rounding is the output's: at most about
    half an ulp of the element type (bf16 2^-9, f16 2^-12 relative), better than eager's own."""
    q, k, v = (torch.randn(1, 4, 150, 64, dtype=dtype) for _ in range(3))

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    report = flashmlir.explain(attention, q, k, v)
    assert report.microkernels == 1, str(report)
    with torch.no_grad():
        out = torch.compile(attention, backend="flashmlir")(q, k, v)
    assert out.dtype == dtype
    ref = _reference(q, k, v, causal, 64 ** -0.5)
    error = ((out.double() - ref).norm() / ref.norm()).item()
    eager = attention(q, k, v)
    assert error < tolerance
    assert error <= ((eager.double() - ref).norm() / ref.norm()).item() * 1.05


def test_off_switch_takes_the_codegen_path(monkeypatch):
    monkeypatch.setenv("FLASHMLIR_MICROKERNELS", "0")
    q, k, v = (torch.randn(1, 2, 50, 64) for _ in range(3))
    report = flashmlir.explain(F.scaled_dot_product_attention, q, k, v)
    assert report.tiled == 1 and report.microkernels == 0, str(report)


def test_masked_attention_stays_on_the_codegen_path_in_iree():
    """An explicit mask has no microkernel yet: in IREE (rest='iree') the tile pass's loop nest runs
    it, still correct."""
    q, k, v = (torch.randn(1, 2, 50, 64) for _ in range(3))
    mask = torch.randn(50, 50)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    class Seen:
        def graph_compiled(self, graph, tiled, declines, microkernels=0):
            self.tiled, self.microkernels = tiled, microkernels

        def graph_rejected(self, graph, reason):
            raise AssertionError(f"{graph} fell back: {reason}")

        def graph_ran(self, graph, sites, near_misses):
            pass

    seen = Seen()
    with torch.no_grad(), recording(seen):
        out = torch.compile(attention, backend="flashmlir", options={"rest": "iree"})(q, k, v)
    assert (seen.tiled, seen.microkernels) == (1, 0)
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8 + mask.double(), -1) @ v.double()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


@pytest.mark.parametrize("mask_kind", ["bool key padding", "float [S, S]"])
def test_masked_inference_goes_to_torch_sdpa_by_default(mask_kind, monkeypatch, caplog):
    """By default a CPU inference graph with a masked site leaves IREE for the torch path, where the
    op runs torch's fused SDPA (3.1-3.6x faster than IREE's loop nest): logged and correct."""
    from flashmlir.runtime import cpu_kernels

    calls = []
    sdpa = cpu_kernels.sdpa_attention
    monkeypatch.setattr(cpu_kernels, "sdpa_attention", lambda *args: calls.append(args[3]) or sdpa(*args))
    q, k, v = (torch.randn(2, 4, 50, 64) for _ in range(3))
    if mask_kind == "bool key padding":
        mask = torch.ones(2, 1, 1, 50, dtype=torch.bool)
        mask[1, ..., 40:] = False
        bias = torch.zeros(mask.shape, dtype=torch.float64).masked_fill(~mask, float("-inf"))
    else:
        mask = torch.randn(50, 50)
        bias = mask.double()

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    with torch.no_grad(), caplog.at_level("INFO", logger="flashmlir"):
        out = torch.compile(attention, backend="flashmlir")(q, k, v)
    assert "explicit mask" in caplog.text and "torch's SDPA" in caplog.text
    assert len(calls) == 1 and calls[0] is not None
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8 + bias, -1) @ v.double()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5
