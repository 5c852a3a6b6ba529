"""Attention backward on the GPU: the library's backward kernels (launched directly) vs torch SDPA's.

    python benchmarks/attention_backward.py                              # sm_90 and sm_80 kernels, default grid
    python benchmarks/attention_backward.py --variants 64x64x4 32x64x4 --head-dims 128

A variant is `sm90` (bwd_sm90_wgmma.cuh, the catalog's tiles, sm_90a: Hopper only; `sm90t`: dkdv loads
through TMA; `sm90:NAME=V,...` builds it with -DFLASHMLIR_NAME=V, e.g. `sm90:KV_REGISTERS=0` for an A/B of
a BwdSm90Config switch) or an sm_80
block_m x block_n x warps (bwd_sm80_mma_sync.cuh: 16·warps resident rows a block; dkdv streams
block_m queries a tile, dq block_n keys), compiled here with nvcc from the library's source for this
GPU (the -D switches CMake uses), checked against float64 autograd on odd-sized problems, then
timed over the grid (B·S = 16k tokens, H·D = 2048, as benchmarks/attention.py). Our time is every
kernel of the backward (sm_90: prep + dkdv + dq; sm_80: dq + dkdv; the forward's O and lse are
inputs, as in training); SDPA's is
`torch.autograd.grad` through a forward done once. TFLOP/s counts 2.5 × the forward's
4·B·H·Sq·Sk·D (half for causal), the FlashAttention papers' convention.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from attention import (  # noqa: E402
    SDPA_BACKENDS,
    Config,
    _sdpa_backend,
    build_in_parallel,
    failure_text,
    interleaved_best_ms,
    variant_switches,
)

from flashmlir.compiler import microkernels  # noqa: E402
from flashmlir.compiler.microkernels import CudaAttentionBackwardKernel  # noqa: E402
from flashmlir.runtime.cuda_launcher import attention_backward, attention_forward  # noqa: E402

SOURCES = Path(__file__).parents[1] / "runtime" / "microkernels" / "attention"
ELEMENTS = {"fp16": ("f16", "half", torch.float16), "bf16": ("bf16", "__nv_bfloat16", torch.bfloat16)}


SM90_TILES = (64, 128, 12)  # block_m, block_n, warps: BwdSm90Config's (the catalog's sm_90 entries)


def build(variant: str, head_dim: int, dtype: str, out_dir: Path) -> tuple[CudaAttentionBackwardKernel, str]:
    element, ctype, _ = ELEMENTS[dtype]
    major, minor = torch.cuda.get_device_capability()
    variant, defines, tag = variant_switches(variant)
    path = out_dir / f"bwd_{variant}{tag}_{element}_d{head_dim}.cubin"
    if variant in ("sm90", "sm90t"):  # t: dkdv loads through TMA
        block_m, block_n, warps = SM90_TILES
        kernel = CudaAttentionBackwardKernel("attention_bwd_sm90", element, head_dim, block_m, block_n, warps,
                                             "sm_90a", path, tma=variant == "sm90t")
        defines = [*defines, f"-DFLASHMLIR_TMA={int(kernel.tma)}"]
        source, gencode = "bwd_sm90_kernels.cu", "-gencode=arch=compute_90a,code=sm_90a"
    else:
        block_m, block_n, warps = (int(x) for x in variant.split("x"))
        kernel = CudaAttentionBackwardKernel("attention_bwd_sm80", element, head_dim, block_m, block_n, warps,
                                             "sm_80", path)
        source, gencode = "bwd_sm80_kernels.cu", f"-gencode=arch=compute_80,code=sm_{major}{minor}"
    command = ["nvcc", "--cubin", "-O3", "-std=c++17", gencode,
               "-Xptxas", "-v", f"-DFLASHMLIR_ELEMENT={ctype}", f"-DFLASHMLIR_ELEMENT_NAME={element}",
               f"-DFLASHMLIR_HEAD_DIM={head_dim}", f"-DFLASHMLIR_BLOCK_M={block_m}", f"-DFLASHMLIR_BLOCK_N={block_n}",
               f"-DFLASHMLIR_WARPS={warps}", *defines, str(SOURCES / source), "-o", str(path)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    # Per entry: "Compiling entry function 'name'", then its spill and register lines.
    entries = re.findall(r"entry function '\w+_(\w+?)' for.*?(\d+) bytes spill stores.*?Used (\d+) registers",
                         done.stderr, re.S)
    return kernel, ", ".join(f"{part} {regs} regs / {spill} B spilled" for part, spill, regs in entries)


def _reference_grads(q, k, v, d_o, causal):
    q, k, v = (x.detach().double().requires_grad_() for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    out = F.scaled_dot_product_attention(q, k.repeat_interleave(g, 1), v.repeat_interleave(g, 1), is_causal=causal)
    out.backward(d_o.double())
    return q.grad, k.grad, v.grad


def reference_error(forward, kernel, dtype: torch.dtype) -> float:
    """Worst relative error of dq/dk/dv over odd-sized causal / full / GQA problems, vs float64."""
    worst = 0.0
    for causal, hq, hkv, sq, sk in ((False, 2, 2, 333, 517), (True, 4, 2, 517, 517), (True, 2, 1, 129, 65)):
        q = torch.randn(1, hq, sq, kernel.head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, hkv, sk, kernel.head_dim, device="cuda", dtype=dtype) for _ in range(2))
        d_o = torch.randn_like(q)
        o, lse = attention_forward(forward, q, k, v, causal=causal, with_lse=True)
        got = attention_backward(kernel, q, k, v, o, d_o, lse, causal=causal)
        for g, r in zip(got, _reference_grads(q, k, v, d_o, causal), strict=True):
            worst = max(worst, ((g.double() - r).norm() / r.norm()).item())
    return worst


def measure(config: Config, kernels: dict, forwards: dict, args) -> dict:
    from torch.nn.attention import sdpa_kernel

    q, k, v = config.inputs()
    d_o = torch.randn_like(q)
    flops = 2.5 * config.flops()
    row = {"head_dim": config.head_dim, "seq": config.seq, "causal": config.causal, "dtype": config.dtype,
           "tflops": {}}
    forward = forwards.get((config.head_dim, config.dtype))
    calls = {}
    if forward is not None:
        o, lse = attention_forward(forward, q, k, v, causal=config.causal, with_lse=True)
        for variant in args.variants:
            kernel = kernels.get((variant, config.head_dim, config.dtype))
            if kernel is not None:
                calls[variant] = lambda kernel=kernel: attention_backward(kernel, q, k, v, o, d_o, lse,
                                                                          causal=config.causal)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    for name in SDPA_BACKENDS:
        try:
            with sdpa_kernel(_sdpa_backend(name)):
                out = F.scaled_dot_product_attention(qg, kg, vg, is_causal=config.causal)
        except RuntimeError:
            continue
        calls[f"sdpa-{name}"] = lambda out=out: torch.autograd.grad(out, (qg, kg, vg), d_o, retain_graph=True)
    best = interleaved_best_ms(calls, args.warmup, args.iters, args.rounds)
    row["tflops"] = {label: flops / ms / 1e9 for label, ms in best.items()}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["sm90", "64x64x4"])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(ELEMENTS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="back-to-back calls per timing")
    p.add_argument("--rounds", type=int, default=3, help="interleaved timings per column; the best counts")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()

    out_dir = Path(tempfile.mkdtemp(prefix="flashmlir-bwd-"))
    kernels, forwards, notes = {}, {}, []
    for d in args.head_dims:
        for dtype in args.dtypes:
            try:
                forwards[(d, dtype)] = microkernels.select_attention_forward("sm_80", ELEMENTS[dtype][0], d)
            except microkernels.NoKernel as why:
                notes.append(f"- d{d} {dtype}: no forward kernel for the lse: {why}")
    jobs = [(variant, d, dtype, out_dir) for (d, dtype) in forwards for variant in args.variants]
    built = build_in_parallel(build, jobs)  # nvcc side by side; the checks below, one at a time
    for (variant, d, dtype, _), result in zip(jobs, built, strict=True):
        try:
            if isinstance(result, Exception):
                raise result
            kernel, ptxas = result
            err = reference_error(forwards[(d, dtype)], kernel, ELEMENTS[dtype][2])
        except (subprocess.CalledProcessError, RuntimeError) as e:
            notes.append(f"- {variant} d{d} {dtype}: failed: {failure_text(e)}")
            continue
        kernels[(variant, d, dtype)] = kernel
        shared = " / ".join(f"{part} {kernel.shared_bytes(part) // 1024} KB" for part in kernel.parts)
        notes.append(f"- {variant} d{d} {dtype}: {ptxas}, shared {shared}, worst rel. error of dq/dk/dv vs "
                     f"float64 {err:.1e}")
        print(notes[-1], flush=True)

    rows = [measure(Config(d, seq, causal, dtype), kernels, forwards, args)
            for d in args.head_dims for seq in args.seqs for causal in (False, True) for dtype in args.dtypes]

    columns = list(args.variants) + [f"sdpa-{b}" for b in SDPA_BACKENDS]
    lines = ["| hdim | seq | causal | dtype | " + " | ".join(columns) + " | best / sdpa-flash | best / sdpa-cudnn |",
             "|" + "---:|" * (len(columns) + 6)]
    for r in rows:
        t = r["tflops"]
        best = max((t[v] for v in args.variants if v in t), default=0.0)
        ratios = [f"{best / t[c]:.2f}x" if best and c in t else "-" for c in ("sdpa-flash", "sdpa-cudnn")]
        lines.append(f"| {r['head_dim']} | {r['seq']} | {'yes' if r['causal'] else 'no'} | {r['dtype']} | "
                     + " | ".join(f"{t[c]:.0f}" if c in t else "-" for c in columns) + f" | {' | '.join(ratios)} |")
    text = (f"# Attention backward, {torch.cuda.get_device_name()}, {time.strftime('%Y-%m-%d')}\n\n"
            "Backward TFLOP/s (2.5 × forward FLOPs), B·S = 16k tokens, H·D = 2048; flashmlir variants are the "
            "library's backward kernels launched directly: sm90 (prep + dkdv + dq, WGMMA, dQ added by the copy engine) and "
            f"the sm_80 ones (dq + dkdv) as block_m x block_n x warps, compiled from compute_80 for this GPU. GPU time per call over {args.iters} back-to-back calls, best of "
            f"{args.rounds} bursts taken in turn over the columns (host launch cost hidden, for both). torch {torch.__version__}. `python benchmarks/attention_backward.py`\n\n"
            + "\n".join(lines) + "\n\nBuild and correctness:\n" + "\n".join(notes))
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows, "notes": notes},
                                              indent=1))


if __name__ == "__main__":
    main()
