"""The microkernel library's attention kernels, launched directly and through IREE.

Directly (flashmlir.runtime.cuda_launcher): the installed image, with the launch geometry and
constants the dispatch pass emits, against a float64 reference on random inputs. Outputs start as
NaN, so an element the kernel never wrote fails. Through IREE: the dispatch pass picks the kernel
for sm_70/sm_80/sm_90 modules, and what runs is that kernel.

The Volta kernel is compute_70 PTX (WMMA m16n16k16): on an H100 the driver JIT-compiles it, which
proves it right, not fast.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from flashmlir.compiler import microkernels
from flashmlir.runtime import cuda_launcher
from flashmlir.runtime.cuda_launcher import attention_forward

pytestmark = pytest.mark.gpu

DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _kernel(element: str, head_dim: int, arch: str = "sm_80") -> microkernels.CudaAttentionKernel:
    try:
        return microkernels.select_attention_forward(arch, element, head_dim)
    except microkernels.NoKernel as why:
        pytest.skip(str(why))


def _reference(q, k, v, causal, scale):
    """float64 attention with top-left causal masking, GQA by repetition; lse = ln Σ exp(s)."""
    group = q.shape[1] // k.shape[1]
    k, v = (x.double().repeat_interleave(group, 1) for x in (k, v))
    s = (q.double() @ k.transpose(-1, -2)) * scale
    if causal:
        keep = torch.ones(s.shape[-2:], dtype=torch.bool, device=s.device).tril()
        s = s.masked_fill(~keep, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


def _check(out, ref, dtype):
    assert not torch.isnan(out).any(), "unwritten or NaN elements"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], err
    worst = ((out.double() - ref).abs() / (ref.abs() + ref.abs().mean())).max().item()
    assert worst < 50 * TOLERANCE[dtype], worst


def _run(element, d, causal, b, hq, hkv, sq, sk, scale=None, arch="sm_80", key_growth=None, kernel=None):
    kernel = kernel or _kernel(element, d, arch)
    dtype = DTYPES[element]
    q = torch.randn(b, hq, sq, d, device="cuda", dtype=dtype)
    k = torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype)
    if key_growth is not None:  # scores that grow along the keys: the row maxima move at many tiles
        k = (k.float() * torch.linspace(1.0, key_growth, sk, device="cuda")[:, None]).to(dtype)
    v = torch.randn(b, hkv, sk, d, device="cuda", dtype=dtype)
    scale = d ** -0.5 if scale is None else scale
    out, lse = attention_forward(kernel, q, k, v, causal=causal, scale=scale, with_lse=True)
    plain = attention_forward(kernel, q, k, v, causal=causal, scale=scale)
    torch.cuda.synchronize()
    ref, ref_lse = _reference(q, k, v, causal, scale)
    _check(out, ref, dtype)
    assert torch.equal(out, plain), "the lse variant computes the same output"
    assert (lse.double() - ref_lse).abs().max().item() < 1e-3


# sm_80: the mma.sync kernel (FlashAttention-2's partitioning); sm_90: the Hopper one (WGMMA,
# warp-specialized). Both run on an H100; each target picks its own.
ARCHS = ["sm_80", "sm_90"]


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("element", ["f16", "bf16"])
@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("causal", [False, True])
def test_kernels(element, d, causal, arch):
    _run(element, d, causal, b=2, hq=3, hkv=3, sq=1000, sk=1000, arch=arch)


@pytest.mark.parametrize("sq, sk, causal", [
    (1, 1, False), (1, 77, False), (77, 1, True), (63, 65, True), (128, 64, True), (129, 4099, False),
    (4099, 129, True), (2048, 2048, True),
])
@pytest.mark.parametrize("arch", ARCHS)
def test_ragged_and_unequal_lengths(sq, sk, causal, arch):
    _run("f16", 128, causal, b=1, hq=2, hkv=2, sq=sq, sk=sk, arch=arch)


@pytest.mark.parametrize("d", [64, 256])
@pytest.mark.parametrize("sq, sk, causal", [(1, 1, False), (77, 1, True), (63, 65, True), (129, 4099, False),
                                            (4099, 129, True), (1000, 1000, True)])
def test_hopper_ragged_other_head_dims(d, sq, sk, causal):
    _run("bf16", d, causal, b=1, hq=2, hkv=1, sq=sq, sk=sk, arch="sm_90")


@pytest.mark.parametrize("multiprocessors", [1, 3, 5, 132])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("sq, sk, causal", [(1000, 1000, False), (1000, 1000, True), (129, 4099, False),
                                            (4099, 129, True), (641, 77, True)])
def test_hopper_workgroups_take_several_tiles(multiprocessors, d, sq, sk, causal, monkeypatch):
    """The persistent grid (one workgroup per SM) on devices of 1, 3, 5 and 132 SMs: workgroups take
    tiles of several heads one after another (the K/V ring and Q's barriers run on across them;
    causal ones in long-short pairs), uneven shares and an odd tile count included, and every row
    is written right. 4099 rows is past the persistent range: a workgroup per tile."""
    monkeypatch.setattr(cuda_launcher, "multiprocessors", lambda device: multiprocessors)
    _run("f16", d, causal, b=3, hq=2, hkv=1, sq=sq, sk=sk, arch="sm_90")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("causal", [False, True])
def test_moving_row_maxima(arch, causal):
    """Scores that grow along the keys move the rows' shift again and again (online_softmax.cuh):
    O and the lse stay exact while P is bounded by the slack."""
    _run("f16", 128, causal, b=1, hq=2, hkv=2, sq=700, sk=1500, arch=arch, key_growth=6.0)
    _run("bf16", 64, causal, b=1, hq=2, hkv=2, sq=700, sk=1500, arch=arch, key_growth=6.0)


def test_hopper_kernel_is_sm90a_wgmma():
    """What the library holds for sm_90 is sm_90a code: warpgroup MMAs (HGMMA), the register hand-over
    between producer and consumers (USETMAXREG)."""
    import shutil
    import subprocess

    if shutil.which("cuobjdump") is None:
        pytest.skip("no cuobjdump")
    kernel = _kernel("f16", 128, "sm_90")
    assert kernel.family == "attention_fwd_sm90"
    sass = subprocess.run(["cuobjdump", "-sass", str(kernel.object_path)], capture_output=True, text=True,
                          check=True).stdout
    assert "arch = sm_90a" in sass
    assert "HGMMA.64x128x16.F32" in sass
    assert "USETMAXREG.DEALLOC" in sass and "USETMAXREG.TRY_ALLOC" in sass


@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_volta_kernels(d, causal):
    assert _kernel("f16", d, "sm_70").family == "attention_fwd_sm70"
    _run("f16", d, causal, b=2, hq=3, hkv=3, sq=1000, sk=1000, arch="sm_70")


@pytest.mark.parametrize("sq, sk, causal", [(1, 1, False), (77, 1, True), (63, 65, True), (129, 4099, False),
                                            (4099, 129, True)])
def test_volta_ragged_gqa_and_large_scores(sq, sk, causal):
    _run("f16", 128, causal, b=1, hq=4, hkv=2, sq=sq, sk=sk, arch="sm_70")
    _run("f16", 64, causal, b=1, hq=2, hkv=1, sq=sq, sk=sk, scale=3.0, arch="sm_70")


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("hq, hkv", [(8, 2), (8, 1)])
def test_gqa_reads_shared_kv_heads(hq, hkv, arch):
    _run("bf16", 64, True, b=2, hq=hq, hkv=hkv, sq=300, sk=300, arch=arch)


@pytest.mark.parametrize("arch", ARCHS)
def test_large_scores_do_not_overflow(arch):
    """Scores of ±hundreds: the running max keeps exp2 in range (a naive softmax gives inf/NaN)."""
    _run("f16", 64, False, b=1, hq=2, hkv=2, sq=256, sk=256, scale=3.0, arch=arch)


@pytest.mark.parametrize("arch", ["sm_90", "sm_80", "sm_70"])
def test_through_iree_the_dispatch_is_the_microkernel(arch):
    """An SDPA module for sm_90 (sm_80, sm_70) compiles to our Hopper (sm_80, Volta) kernel, one
    extern dispatch, and is right."""
    from flashmlir.compiler import iree_driver
    from flashmlir.compiler.mlir_io import parse_module
    from flashmlir.compiler.pipeline import compile_module
    from flashmlir.compiler.targets import get_target
    from flashmlir.runtime.iree_module import IreeModule

    kernel = _kernel("f16", 128, arch)
    assert kernel.min_arch.rstrip("a") == arch
    shape, kv = "[2,8,777,128]", "[2,2,777,128]"
    text = f"""
func.func @main(%q: !torch.vtensor<{shape},f16>, %k: !torch.vtensor<{kv},f16>, %v: !torch.vtensor<{kv},f16>) -> !torch.vtensor<{shape},f16> {{
  %none = torch.constant.none
  %float0 = torch.constant.float 0.000000e+00
  %true = torch.constant.bool true
  %0 = torch.aten.scaled_dot_product_attention %q, %k, %v, %none, %float0, %true, %none, %true : !torch.vtensor<{shape},f16>, !torch.vtensor<{kv},f16>, !torch.vtensor<{kv},f16>, !torch.none, !torch.float, !torch.bool, !torch.none, !torch.bool -> !torch.vtensor<{shape},f16>
  return %0 : !torch.vtensor<{shape},f16>
}}"""
    target = get_target(arch)
    session = iree_driver.new_session(target.iree_flags)
    module = parse_module(text, session.context)
    vmfb, report = compile_module(session, module, target, bind_result_storage=True)
    assert report.attention_microkernels == 1
    assert kernel.object_path.read_bytes() in vmfb
    q = torch.randn(2, 8, 777, 128, device="cuda", dtype=torch.float16)
    k, v = (torch.randn(2, 2, 777, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    out = torch.full_like(q, math.nan)
    IreeModule(vmfb, "cuda")(q, k, v, out)
    _check(out, _reference(q, k, v, True, 128 ** -0.5)[0], torch.float16)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    assert (out.float() - sdpa.float()).abs().max().item() < 1e-2


@pytest.mark.parametrize("multiprocessors", [3, 132])
@pytest.mark.parametrize("element", ["f16", "bf16"])
@pytest.mark.parametrize("sq, sk, causal, hq, hkv", [
    (1000, 1000, False, 2, 2), (1000, 1000, True, 4, 2), (40, 77, True, 2, 1), (641, 77, True, 2, 2),
    (129, 4099, False, 2, 1), (4099, 129, True, 2, 2), (1, 1, False, 1, 1)])
def test_hopper_long_sequence_tiling(multiprocessors, element, sq, sk, causal, hq, hkv, monkeypatch):
    """The catalog's sm_90 tiling for long sequences (head dim 64: three consumer warpgroups,
    192-row query blocks, 96-key stages), run on short and ragged problems as well: the choice by
    length is for speed only, the kernel must be right everywhere. A query block's consumers whose
    rows all lie past the end (40 rows: two of three; 1000 = 5 · 192 + 40 likewise) only keep the
    barriers' count; with 3 SMs a workgroup goes on to further tiles after that."""
    default = _kernel(element, 64, "sm_90")
    kernel = microkernels.select_attention_forward("sm_90", element, 64, 1 << 20, 1 << 20)
    if kernel == default:
        pytest.skip("the catalog has one sm_90 tiling at head dim 64")
    monkeypatch.setattr(cuda_launcher, "multiprocessors", lambda device: multiprocessors)
    _run(element, 64, causal, b=2, hq=hq, hkv=hkv, sq=sq, sk=sk, arch="sm_90", kernel=kernel)
