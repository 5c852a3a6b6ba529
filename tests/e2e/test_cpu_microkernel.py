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
def test_masked_inference_goes_to_the_torch_path_by_default(mask_kind, monkeypatch, caplog):
    """By default a CPU inference graph with a masked site leaves IREE for the torch path (IREE's
    loop nest was 3.1-3.6x slower than torch's SDPA): a key-padding mask runs the CPU kernel's
    `_key_bias` entry, any other mask torch's fused SDPA. Logged and correct."""
    from flashmlir.runtime import cpu_kernels

    sdpa_calls, kernel_calls = [], []
    sdpa, kernel = cpu_kernels.sdpa_attention, cpu_kernels._forward_key_bias
    monkeypatch.setattr(cpu_kernels, "sdpa_attention", lambda *args: sdpa_calls.append(args[3]) or sdpa(*args))
    monkeypatch.setattr(cpu_kernels, "_forward_key_bias", lambda *args: kernel_calls.append(1) or kernel(*args))
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
    assert (len(kernel_calls), len(sdpa_calls)) == ((1, 0) if mask_kind == "bool key padding" else (0, 1))
    ref = torch.softmax(q.double() @ k.double().transpose(-1, -2) / 8 + bias, -1) @ v.double()
    assert ((out.double() - ref).norm() / ref.norm()).item() < 1e-5


KEY_MASKS = ["bool", "bool, a batch with no key", "finfo.min, a batch with no key", "float expanded to [B,1,S,S]",
             "per-head bias [1,H,1,S]"]


@pytest.mark.parametrize("kind", KEY_MASKS)
@pytest.mark.parametrize("causal, hkv, sq, sk, d", [(False, 4, 77, 133, 64), (True, 2, 133, 133, 128),
                                                    (False, 1, 1, 65, 32)])
def test_key_padding_masks_run_the_kernel_and_match_float64(kind, causal, hkv, sq, sk, d, monkeypatch):
    """A mask with one value per key (BERT's padding masks) is added to the scores inside the
    kernel: bool as -inf (a batch with no key gets zeros), float ones as the op's arithmetic
    (finfo.min everywhere: equal weights), together with causal masking and GQA. Never SDPA's
    route."""
    from flashmlir.frontend.attention_op import reference_attention
    from flashmlir.runtime import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "sdpa_attention", None)  # must not be called
    torch.manual_seed(0)
    q = torch.randn(2, 4, sq, d)
    k, v = (torch.randn(2, hkv, sk, d) for _ in range(2))
    keep = torch.ones(2, 1, 1, sk, dtype=torch.bool)
    keep[1, ..., sk * 3 // 4:] = False
    if "no key" in kind:
        keep[0] = False
    mask = {"bool": keep, "bool, a batch with no key": keep,
            "finfo.min, a batch with no key": torch.zeros(keep.shape).masked_fill(~keep, torch.finfo(torch.float32).min),
            "float expanded to [B,1,S,S]": torch.zeros(keep.shape).masked_fill(~keep, -1e4).expand(2, 1, sq, sk),
            "per-head bias [1,H,1,S]": torch.randn(1, 4, 1, sk)}[kind]
    got = cpu_kernels._attention_cpu(q, k, v, mask, 0.0, causal, 0.3)
    want = reference_attention(q.double(), k.double(), v.double(), mask, 0.0, causal, 0.3)
    assert torch.isfinite(got).all()
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
    if kind == "bool, a batch with no key":
        assert torch.equal(got[0], torch.zeros_like(got[0]))


def test_key_bias_is_what_the_kernel_adds():
    """bool → 0 / -inf; float → finite values below -1e30 raised to it, then times log2 e; a mask
    with a value per query row is no key-padding mask (None)."""
    from flashmlir.runtime.cpu_kernels import key_bias

    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 7, 8)
    keep = torch.tensor([True, False, True, True, True, True, False]).view(1, 1, 1, 7)
    assert torch.equal(key_bias(keep, q, k), torch.zeros(6, 7).masked_fill(~keep.view(1, 7), float("-inf")))
    f = torch.tensor([0.0, -2.0, torch.finfo(torch.float32).min, float("-inf"), 1.0, 0.0, 0.0]).view(7)
    got = key_bias(f, q, k)
    assert got.shape == (6, 7)
    torch.testing.assert_close(got[0], torch.tensor([0.0, -2.0, -1e30, float("-inf"), 1.0, 0.0, 0.0]) * 1.4426950408889634)
    assert key_bias(torch.randn(5, 7), q, k) is None


_S = 70
_CAUSAL = torch.ones(_S, _S, dtype=torch.bool).tril()
_RIGHT = torch.ones(2, 1, 1, _S, dtype=torch.bool)
_RIGHT[1, ..., 60:] = False
_LEFT = torch.ones(2, 1, 1, _S, dtype=torch.bool)
_LEFT[1, ..., :5] = False
_MIN = torch.finfo(torch.float32).min
DECODER_MASKS = {  # name: (mask, the route that serves it)
    "bool, right padding": (_RIGHT & _CAUSAL, "kernel"),
    "bool, left padding (rows with no key)": (_LEFT & _CAUSAL, "kernel"),
    "finfo.min, right padding": (torch.zeros(2, 1, _S, _S).masked_fill(~(_RIGHT & _CAUSAL), _MIN), "kernel"),
    "finfo.min, left padding (rows with no key)": (torch.zeros(2, 1, _S, _S).masked_fill(~(_LEFT & _CAUSAL), _MIN),
                                                   "sdpa"),
    "causal only, 2-d": (_CAUSAL, "kernel"),
    "causal plus a per-key bias": (torch.zeros(2, 1, _S, _S).masked_fill(~_CAUSAL, _MIN) + torch.randn(1, 1, 1, _S),
                                   "sdpa"),
    "random bool": (torch.rand(2, 1, _S, _S) > 0.3, "sdpa"),
}


@pytest.mark.parametrize("name", list(DECODER_MASKS))
def test_causal_and_padding_masks_run_the_kernel_causally(name, monkeypatch):
    """A square mask that is exactly causal masking and key padding (what decoders build) runs the
    kernel causally with the padding as its key bias; a float one only where every row attends some
    key (a row with none is, in the op, equal weights over every key, which causal masking cannot
    give); other masks torch's SDPA. Each against float64."""
    from flashmlir.frontend.attention_op import reference_attention
    from flashmlir.runtime import cpu_kernels

    mask, route = DECODER_MASKS[name]
    routes = []
    sdpa, kernel = cpu_kernels.sdpa_attention, cpu_kernels._forward_key_bias
    monkeypatch.setattr(cpu_kernels, "sdpa_attention", lambda *args: routes.append("sdpa") or sdpa(*args))
    monkeypatch.setattr(cpu_kernels, "_forward_key_bias", lambda *args: routes.append("kernel") or kernel(*args))
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, _S, 64) for _ in range(3))
    got = cpu_kernels._attention_cpu(q, k, v, mask, 0.0, False, 0.3)
    want = reference_attention(q.double(), k.double(), v.double(), mask, 0.0, False, 0.3)
    assert routes == [route]
    assert ((got.double() - want).norm() / want.norm()).item() < 1e-5
