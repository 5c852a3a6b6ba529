"""Host cost of one attention call on the GPU: flashmlir's ops and compiled functions vs torch SDPA.

    python benchmarks/host_overhead.py [--markdown F] [--json F] [--profile]

A kernel whose launch costs more host time than it runs leaves the GPU idle between calls: that is
what small attention problems (512–1k tokens) and training steps of small models (GPT-2 small: 24
attention calls a step, forward and backward) see. Per case this prints
- host µs: the wall time of N calls issued back to back, divided by N, without waiting for the GPU
  (N is small enough that the launch queue never fills, so this is Python + dispatcher + launches);
- GPU µs: the same N calls run back to back by the GPU (queued behind a sleeping kernel), per call;
  "waits" if issuing them took longer than the sleep (a call that waits for the GPU does);
- wall µs: the same N calls then a synchronize, divided by N: max(host, GPU) in steady state.
Cases: the ops as torch.ops calls (what Inductor's graph calls), a function compiled with
backend="flashmlir" (adds Dynamo's guards and aot_autograd's wrappers), and SDPA's flash and cuDNN
backends called directly and compiled by Inductor. `--profile` adds cProfile's top entries for
the op calls (where the host time goes).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from attention import _sdpa_backend  # noqa: E402

import flashmlir  # noqa: E402,F401  (registers the backend and the ops)
from flashmlir.runtime import torch_kernels  # noqa: E402

SHAPES = ((8, 12, 1024, 64, True), (2, 16, 512, 128, False))  # GPT-2 small's attention; a small forward


SLEEP_CYCLES = 200_000_000  # ~0.1 s of a GPU clock: longer than 100 calls' host time


def per_call_us(fn, calls: int = 100, rounds: int = 5) -> dict:
    """Per call, the best of `rounds` rounds of `calls` calls: host µs (issued without waiting),
    wall µs (issued and waited for), GPU µs (the calls queued behind a sleeping kernel, so the GPU
    runs them back to back: their own time; None if issuing them outlasted the sleep, which a
    call that waits for the GPU would do)."""
    for _ in range(10):
        fn()
    torch.cuda.synchronize()
    host, wall, gpu = [], [], []
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        issued = time.perf_counter()
        torch.cuda.synchronize()
        host.append((issued - start) / calls * 1e6)
        wall.append((time.perf_counter() - start) / calls * 1e6)
        first, last = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        sleep_start = torch.cuda.Event(enable_timing=True)
        sleep_start.record()
        torch.cuda._sleep(SLEEP_CYCLES)
        first.record()
        queued = time.perf_counter()
        for _ in range(calls):
            fn()
        queued = time.perf_counter() - queued
        last.record()
        torch.cuda.synchronize()
        if sleep_start.elapsed_time(first) / 1e3 > queued:  # the sleep outlasted the issuing
            gpu.append(first.elapsed_time(last) * 1e3 / calls)
    return {"host_us": min(host), "wall_us": min(wall), "gpu_us": min(gpu) if gpu else None}


def cases(b: int, h: int, s: int, d: int, causal: bool):
    torch.manual_seed(0)
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out, lse = torch.ops.flashmlir.attention_forward(q, k, v, causal, None)
    grad = torch.randn_like(out)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    ours = torch.compile(sdpa, backend="flashmlir", dynamic=False)
    inductor = torch.compile(sdpa, dynamic=False)
    yield "flashmlir::attention (op)", lambda: torch.ops.flashmlir.attention(q, k, v, None, 0.0, causal, None)
    yield "flashmlir::attention_forward (op)", lambda: torch.ops.flashmlir.attention_forward(q, k, v, causal, None)
    yield "flashmlir::attention_backward (op)", lambda: torch.ops.flashmlir.attention_backward(
        grad, q, k, v, out, lse, causal, None)
    yield "sdpa compiled, backend=flashmlir", lambda: ours(q, k, v)
    for name in ("flash", "cudnn"):
        backend = _sdpa_backend(name)

        def call(backend=backend):
            with sdpa_kernel(backend):
                return sdpa(q, k, v)
        yield f"sdpa {name} (eager call)", call
    yield "sdpa compiled, inductor", lambda: inductor(q, k, v)


def profile(fn, calls: int = 200) -> str:
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        fn()
    profiler.disable()
    torch.cuda.synchronize()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(12)
    return text.getvalue()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--markdown")
    parser.add_argument("--json")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    torch_kernels.register()
    rows = []
    with torch.no_grad():
        for b, h, s, d, causal in SHAPES:
            shape = f"{b}×{h}×{s}×{d}{' causal' if causal else ''}"
            for label, fn in cases(b, h, s, d, causal):
                rows.append({"shape": shape, "case": label, **per_call_us(fn)})
                print(json.dumps(rows[-1]), flush=True)
                if args.profile and "(op)" in label:
                    print(f"===== {shape} {label}\n{profile(fn)}", flush=True)
    title = (f"# Host cost per attention call, {torch.cuda.get_device_name()}, "
             f"{time.strftime('%Y-%m-%d')}\n\nbf16, torch {torch.__version__}. host µs: N calls issued "
             "without waiting, per call; GPU µs: the same calls run back to back on the GPU (queued behind "
             "a sleeping kernel; 'waits' where issuing them waited for the GPU); wall µs: issued and waited "
             "for, per call (max of host and GPU in steady state). `python benchmarks/host_overhead.py`\n")
    table = ["| shape | case | host µs | GPU µs | wall µs |", "|---|---|---:|---:|---:|"]
    table += [f"| {r['shape']} | {r['case']} | {r['host_us']:.1f} | "
              f"{'waits' if r['gpu_us'] is None else format(r['gpu_us'], '.1f')} | {r['wall_us']:.1f} |" for r in rows]
    print(title + "\n" + "\n".join(table))
    if args.markdown:
        Path(args.markdown).write_text(title + "\n" + "\n".join(table) + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
