"""Attention compiled for sm_70 / sm_80 / sm_90 and run on the GPU through IREE's CUDA HAL.

On an H100, sm_80 and sm_90 code runs natively; sm_70 PTX runs through the driver's JIT (that
proves it correct; Volta speed cannot be measured there). Outputs are poisoned with NaN before each
call (FLASHMLIR_POISON_OUTPUTS) so an element nothing wrote fails the check; every element is
compared with a float64 reference on fresh random inputs.
"""

import pytest
import torch
import torch.nn.functional as F

from flashmlir.runtime.iree_module import IreeModule

pytestmark = pytest.mark.gpu

DEVICE = "cuda"
TOLERANCE = {torch.float16: 1e-3, torch.bfloat16: 8e-3, torch.float32: 1e-5}


@pytest.fixture(autouse=True)
def _poison(monkeypatch):
    monkeypatch.setenv("FLASHMLIR_POISON_OUTPUTS", "1")


def _reference(q, k, v, causal):
    groups = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(groups, 1), v.double().repeat_interleave(groups, 1)
    return F.scaled_dot_product_attention(q.double(), k, v, is_causal=causal)


def _check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert not torch.isnan(out).any(), "unwritten (poisoned) or NaN elements"
    err = ((out.double() - ref).norm() / ref.norm()).item()
    assert err < TOLERANCE[dtype], err
    worst = ((out.double() - ref).abs() / (ref.abs() + ref.abs().mean())).max().item()
    assert worst < 50 * TOLERANCE[dtype], worst  # no element far off, not just a good norm


def _run(target, dtype, causal, b, hq, hkv, sq, sk, d):
    q = torch.randn(b, hq, sq, d, device=DEVICE, dtype=dtype)
    k = torch.randn(b, hkv, sk, d, device=DEVICE, dtype=dtype)
    v = torch.randn(b, hkv, sk, d, device=DEVICE, dtype=dtype)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=hq != hkv)

    fn = torch.compile(attention, backend="flashmlir", options={} if target is None else {"target": target})
    with torch.no_grad():
        out = fn(q, k, v)
        torch.cuda.synchronize()
        _check(out, _reference(q, k, v, causal), dtype)
        q2 = torch.randn_like(q)  # a second call with new data: nothing stale may survive
        _check(fn(q2, k, v), _reference(q2, k, v, causal), dtype)


GRID = [
    (target, dtype, causal, d)
    for target in ("sm_70", "sm_80", "sm_90")
    for dtype in (torch.float16, torch.bfloat16)
    for causal in (False, True)
    for d in (64, 128, 256)
    if not (target == "sm_70" and dtype == torch.bfloat16)
]


@pytest.mark.parametrize("target, dtype, causal, d", GRID, ids=lambda x: str(x).replace("torch.", ""))
def test_targets_dtypes_head_dims(target, dtype, causal, d):
    _run(target, dtype, causal, b=2, hq=4, hkv=4, sq=1000, sk=1000, d=d)


@pytest.mark.parametrize("sq, sk, causal", [(128, 128, True), (4097, 4097, True), (16384, 16384, True),
                                            (1000, 4097, False), (4097, 1000, True)])
def test_sequence_lengths(sq, sk, causal):
    _run("sm_90", torch.float16, causal, b=1, hq=2, hkv=2, sq=sq, sk=sk, d=128)


@pytest.mark.parametrize("target", [None, "sm_90"])
@pytest.mark.parametrize("sq, sk, causal, hkv", [(2048, 2048, False, 2), (3072, 3072, True, 2), (4100, 5000, False, 1), (5000, 3100, True, 2)])
def test_long_sequences_at_head_dim_64(target, sq, sk, causal, hkv):
    """Head dim 64 from 2048 tokens on (causal: 3072) takes the catalog's long-sequence tiling (three consumer
    warpgroups); through the default path (None: our op inside Inductor's graph) that is checked."""
    from flashmlir.runtime import torch_kernels

    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the long-sequence tiling is an sm_90 kernel")
    torch_kernels._launches.clear()
    _run(target, torch.float16, causal, b=1, hq=2, hkv=hkv, sq=sq, sk=sk, d=64)
    if target is None:
        tilings = {launch.kernel.block_m for launch in torch_kernels._launches.values() if launch is not torch_kernels._REFERENCE}
        assert tilings == {192}, tilings


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_gqa(target):
    _run(target, torch.bfloat16, True, b=2, hq=16, hkv=4, sq=777, sk=777, d=128)


def _delayed_inputs_call():
    """Call a compiled graph right after torch queued a slow kernel and then the copy of its input."""
    q, k, v = (torch.randn(1, 8, 2048, 128, device=DEVICE, dtype=torch.float16) for _ in range(3))
    # IREE's own stream is what needs the synchronization (the default on CUDA runs our kernels on torch's).
    fn = torch.compile(F.scaled_dot_product_attention, backend="flashmlir", options={"rest": "iree"})
    with torch.no_grad():
        fn(q, k, v)  # compile and warm up
        torch.cuda.synchronize()
        pending = torch.zeros_like(q)
        torch.cuda._sleep(500_000_000)  # keep torch's stream busy for a while
        pending.copy_(q)  # queued behind the sleep on torch's stream
        out = fn(pending, k, v)
        torch.cuda.synchronize()
    return out, _reference(q, k, v, False)


def test_iree_waits_for_torch_stream():
    out, ref = _delayed_inputs_call()
    _check(out, ref, torch.float16)


def test_the_sync_test_catches_a_missing_sync(monkeypatch):
    monkeypatch.setattr(IreeModule, "synchronize_torch_stream", False)
    out, ref = _delayed_inputs_call()
    err = ((out.double() - ref).norm() / ref.norm()).item()
    # NaN counts as wrong too: the NaN poison torch queued behind the sleep lands after IREE wrote.
    assert not err < 0.1, "without the sync IREE should have raced torch's stream"


@pytest.mark.parametrize("rest", ["auto", "iree"])
def test_training_step_on_gpu(rest):
    model = torch.nn.MultiheadAttention(256, 8, batch_first=True, device=DEVICE)
    x = torch.randn(2, 300, 256, device=DEVICE, requires_grad=True)

    def step(m, x):
        return m(x, x, x, need_weights=False, is_causal=False)[0].square().mean()

    compiled = torch.compile(step, backend="flashmlir", options={"rest": rest})
    compiled(model, x).backward()
    grads = [p.grad.clone() for p in model.parameters()] + [x.grad.clone()]
    model.zero_grad()
    x.grad = None
    step(model, x).backward()
    for got, want in zip(grads, [p.grad for p in model.parameters()] + [x.grad], strict=True):
        assert ((got - want).norm() / want.norm()).item() < 1e-4


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_left_padded_llama_on_gpu(attn):
    """Rows whose every key is masked (left padding) stay finite and match eager on the GPU."""
    pytest.importorskip("transformers")
    from tests.models import hf_model

    torch.manual_seed(0)
    model, inputs, forward_kwargs = hf_model("llama", attn)
    model = model.to(DEVICE).eval()
    inputs = {k: v.to(DEVICE) for k, v in inputs.items()}

    def forward(**x):
        return model(**x, **forward_kwargs, return_dict=False)[0]

    with torch.no_grad():
        out = torch.compile(forward, backend="flashmlir")(**inputs)
        eager = forward(**inputs)
    assert not torch.isnan(out).any()
    assert ((out - eager).norm() / eager.norm()).item() < 1e-4


def _reference_grads(q, k, v, d_o, causal):
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    _reference(q64, k64, v64, causal).backward(d_o.double())
    return q64.grad, k64.grad, v64.grad


TRAINING = [(target, dtype, causal, d) for target in ("sm_80", "sm_90") for dtype in (torch.float16, torch.bfloat16)
            for causal in (False, True) for d in (64, 128)]


@pytest.mark.parametrize("target, dtype, causal, d", TRAINING, ids=lambda x: str(x).replace("torch.", ""))
def test_flash_backward_through_torch_compile(target, dtype, causal, d, monkeypatch):
    """A training graph gets the forward-with-lse kernel and the backward kernels, through IREE, and
    its gradients match float64 (GQA, a length no tile divides)."""
    from flashmlir.dynamo.backend import recording
    from flashmlir.report import ExplainReport

    monkeypatch.setenv("FLASHMLIR_STRICT", "1")  # a fallback to eager would fail the test
    q = torch.randn(2, 8, 333, d, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 333, d, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    report = ExplainReport()
    torch._dynamo.reset()
    with recording(report):
        out = torch.compile(attention, backend="flashmlir", options={"target": target, "rest": "iree"})(q, k, v)
        d_o = torch.randn_like(out)
        out.backward(d_o)
    torch.cuda.synchronize()
    _check(out.detach(), _reference(q, k, v, causal), dtype)
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), _reference_grads(q, k, v, d_o, causal), strict=True):
        assert not torch.isnan(got).any(), f"d{name}: NaN"
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < {torch.float16: 2e-3, torch.bfloat16: 1.2e-2}[dtype], f"d{name}: {err:.2e}"
    kernels = {g: o.microkernels for g, o in report.graphs.items()}
    assert sum(kernels.values()) >= 2, f"forward and backward should both call library kernels: {kernels}"


def test_deterministic_mode_repeats_iree_training_gradients_bit_for_bit(monkeypatch):
    """Under torch.use_deterministic_algorithms the compiled training graph gets backward kernels
    that sum dQ in a fixed order (on sm_90: the sm_80 pair instead of the atomic sm_90 ones), so two
    backward passes give the same bits."""
    from flashmlir.compiler import fx_compile

    monkeypatch.setenv("FLASHMLIR_STRICT", "1")
    asked = []
    compile_cached = fx_compile.compile_cached

    def spy(*args, **kwargs):
        asked.append(kwargs.get("deterministic"))
        return compile_cached(*args, **kwargs)

    monkeypatch.setattr(fx_compile, "compile_cached", spy)
    q, k, v = (torch.randn(2, 4, 1024, 128, device=DEVICE, dtype=torch.float16, requires_grad=True)
               for _ in range(3))
    d_o = torch.randn_like(q)

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v)

    torch._dynamo.reset()
    torch.use_deterministic_algorithms(True)
    try:
        compiled = torch.compile(attention, backend="flashmlir", options={"rest": "iree"})
        grads = []
        for _ in range(2):
            compiled(q, k, v).backward(d_o)
            grads.append([x.grad.clone() for x in (q, k, v)])
            for x in (q, k, v):
                x.grad = None
    finally:
        torch.use_deterministic_algorithms(False)
        torch._dynamo.reset()
    assert asked and all(asked), asked
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
def test_volta_training_takes_the_textbook_backward_through_iree(causal, monkeypatch):
    """sm_70 has no backward kernels: the op's textbook backward (S×S, in torch ops) is compiled by
    IREE's codegen for sm_70 and run through the driver's PTX JIT; gradients still match float64."""
    from flashmlir.dynamo.backend import recording
    from flashmlir.report import ExplainReport

    monkeypatch.setenv("FLASHMLIR_STRICT", "1")
    q = torch.randn(2, 8, 197, 64, device=DEVICE, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(2, 2, 197, 64, device=DEVICE, dtype=torch.float16, requires_grad=True) for _ in range(2))

    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    report = ExplainReport()
    torch._dynamo.reset()
    with recording(report):
        out = torch.compile(attention, backend="flashmlir", options={"target": "sm_70"})(q, k, v)
        d_o = torch.randn_like(out)
        out.backward(d_o)
    torch.cuda.synchronize()
    _check(out.detach(), _reference(q, k, v, causal), torch.float16)
    for name, got, ref in zip("qkv", (q.grad, k.grad, v.grad), _reference_grads(q, k, v, d_o, causal), strict=True):
        assert not torch.isnan(got).any(), f"d{name}: NaN"
        err = ((got.double() - ref).norm() / ref.norm()).item()
        assert err < 2e-3, f"d{name}: {err:.2e}"
    assert report.graphs and all(o.compiled and not o.rejected for o in report.graphs.values()), report


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_kernels_inside_inductor_graphs(dtype, causal, monkeypatch):
    """The CUDA default: Inductor compiles the graph, attention runs the library's kernels (forward
    with lse and backward, on torch's stream). Outputs and gradients are as close to float64 as
    eager PyTorch's in the same dtype (the projection in half precision alone costs ~1e-2 in the
    gradients, so eager's error is the yardstick)."""
    from flashmlir.runtime import cuda_launcher

    calls = {"forward": 0, "backward": 0}

    def count(name, fn):
        def spy(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return spy

    for name, launch in (("forward", cuda_launcher.AttentionForwardLaunch),
                         ("backward", cuda_launcher.AttentionBackwardLaunch)):
        monkeypatch.setattr(launch, "__call__", count(name, launch.__call__))
    monkeypatch.setenv("FLASHMLIR_STRICT", "1")
    proj = torch.nn.Linear(128, 128, device=DEVICE, dtype=dtype)
    x = torch.randn(2, 8, 333, 128, device=DEVICE, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(2, 2, 333, 128, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(2))

    def block(x, k, v):
        return F.scaled_dot_product_attention(proj(x), k, v, is_causal=causal, enable_gqa=True)

    x64, k64, v64 = (t.detach().double().requires_grad_() for t in (x, k, v))
    ref = _reference(F.linear(x64, proj.weight.double(), proj.bias.double()), k64, v64, causal)
    d_o = torch.randn(ref.shape, device=DEVICE, dtype=dtype)
    ref.backward(d_o.double())

    def errors(fn):
        for t in (x, k, v):
            t.grad = None
        out = fn(x, k, v)
        out.backward(d_o)
        torch.cuda.synchronize()
        pairs = ((out, ref), (x.grad, x64.grad), (k.grad, k64.grad), (v.grad, v64.grad))
        assert not any(torch.isnan(got).any() for got, _ in pairs)
        return [((got.double() - want).norm() / want.norm()).item() for got, want in pairs]

    eager = errors(block)
    torch._dynamo.reset()
    compiled = errors(torch.compile(block, backend="flashmlir"))
    assert calls["forward"] >= 1 and calls["backward"] >= 1, calls
    floor = {torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    for name, got, yardstick in zip(("out", "dx", "dk", "dv"), compiled, eager, strict=True):
        assert got < max(1.5 * yardstick, floor), f"{name}: {got:.1e} (eager {yardstick:.1e})"
