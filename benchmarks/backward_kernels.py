"""The attention backward kernel by kernel: where each variant's time goes, beside SDPA's kernels.

    python benchmarks/backward_kernels.py --variants sm90 sm90:DQ_STAGED=1 --seqs 2048 4096 16384

attention_backward.py times a whole backward; a change to one of its kernels (the sm_90 dq
conversion, say) moves the total by less than the run-to-run spread at long sequences. Here each
variant (built as attention_backward.py builds it, and checked against float64 the same way) and
SDPA's cuDNN and flash backwards run `--calls` times under torch.profiler, and every kernel's GPU
time per call is listed by name, at the GPU's own clocks (ncu locks them lower). Head dim 128 by
default, B·S = 16k tokens, H·D = 2048, as the other tables.
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).parent))
from attention import Config, _sdpa_backend, build_in_parallel  # noqa: E402
from attention_backward import ELEMENTS, build, reference_error  # noqa: E402

from flashmlir.compiler import microkernels  # noqa: E402
from flashmlir.runtime.cuda_launcher import attention_backward, attention_forward  # noqa: E402


def kernel_times(fn, calls: int) -> dict[str, float]:
    """GPU µs per call of each kernel `fn` launches (by name), over `calls` calls after a warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    total = collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA and event.device_time > 0:
            total[event.name] += event.device_time
    return {name: us / calls for name, us in total.items()}


def problem_calls(config: Config, forward, kernels: dict, sdpa: list[str]) -> dict:
    """One backward call per variant and SDPA backend on `config`'s inputs (label → fn)."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = config.inputs()
    d_o = torch.randn_like(q)
    o, lse = attention_forward(forward, q, k, v, causal=config.causal, with_lse=True)
    calls = {variant: (lambda kernel=kernel: attention_backward(kernel, q, k, v, o, d_o, lse, causal=config.causal))
             for variant, kernel in kernels.items()}
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    for name in sdpa:
        with sdpa_kernel(_sdpa_backend(name)):
            out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=config.causal)
        calls[f"sdpa-{name}"] = lambda out=out: torch.autograd.grad(out, (qg, kg, vg), d_o, retain_graph=True)
    return calls


def short(name: str) -> str:
    """A kernel's name, short enough for a table cell (cuDNN's run to 200 characters)."""
    name = name.replace("flashmlir_attention_bwd_", "")
    return name if len(name) <= 48 else name[:45] + "..."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["sm90"])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 16384])
    p.add_argument("--dtype", default="fp16", choices=list(ELEMENTS))
    p.add_argument("--calls", type=int, default=20)
    p.add_argument("--sdpa", nargs="*", default=["cudnn", "flash"])
    p.add_argument("--markdown")
    args = p.parse_args()

    element, _, torch_dtype = ELEMENTS[args.dtype]
    forward = microkernels.select_attention_forward("sm_80", element, args.head_dim)
    out_dir = Path(tempfile.mkdtemp(prefix="flashmlir-bwd-parts-"))
    kernels, notes = {}, []
    built = build_in_parallel(build, [(variant, args.head_dim, args.dtype, out_dir) for variant in args.variants])
    for variant, result in zip(args.variants, built, strict=True):
        if isinstance(result, Exception):
            raise result
        kernel, ptxas = result
        err = reference_error(forward, kernel, torch_dtype)
        notes.append(f"- {variant}: {ptxas}; worst rel. error of dq/dk/dv vs float64 {err:.1e}")
        print(notes[-1], flush=True)
        kernels[variant] = kernel

    lines = ["| seq | causal | what | kernel | µs / call | share |", "|---:|---:|---|---|---:|---:|"]
    for seq in args.seqs:
        for causal in (False, True):
            config = Config(args.head_dim, seq, causal, args.dtype)
            for what, fn in problem_calls(config, forward, kernels, args.sdpa).items():
                times = kernel_times(fn, args.calls)
                whole = sum(times.values())
                cells = f"| {seq} | {'yes' if causal else 'no'} | {what} |"
                for name, us in sorted(times.items(), key=lambda x: -x[1]):
                    if us >= 0.01 * whole:
                        lines.append(f"{cells} {short(name)} | {us:.1f} | {us / whole:.0%} |")
                tflops = 2.5 * config.flops() / whole / 1e6
                lines.append(f"{cells} **all** | **{whole:.1f}** | {tflops:.0f} TFLOP/s |")
                print(lines[-1], flush=True)
    text = (f"# Attention backward kernel by kernel, {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}\n\n"
            f"Head dim {args.head_dim}, {args.dtype}, B·S = 16k tokens, H·D = 2048; GPU time per call of each kernel "
            f"(torch.profiler, {args.calls} calls, the GPU's own clocks), kernels under 1% of a call left out; "
            f"TFLOP/s from the sum (2.5 × forward FLOPs). torch {torch.__version__}. "
            f"`python benchmarks/backward_kernels.py --variants {' '.join(args.variants)}`\n\n"
            + "\n".join(lines) + "\n\nBuild and correctness:\n" + "\n".join(notes))
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
