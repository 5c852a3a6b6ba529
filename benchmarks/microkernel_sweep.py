"""Tile-size sweep of the sm_80 or sm_90 attention microkernel, launched directly, beside torch SDPA.

    python benchmarks/microkernel_sweep.py                     # sm_80, default variants and grid
    python benchmarks/microkernel_sweep.py --variants 128x64x8 128x128x8 --head-dims 128
    python benchmarks/microkernel_sweep.py --family sm90 --variants n128s2 n128s2p n64s2p m192n96s2

An sm_80 variant is block_m x block_n x warps; an sm_90 one is [m<block_m>]n<block_n>s<stages>,
with a `p` for ping-pong between the consumer warpgroups (block_m 128: two consumers of 64 rows, the
default; 192: three), a `t` for loads through TMA (tensor maps made on the device) or a `T` for
O's stores through it as well. Either may end in `:NAME=V,...`, built with -DFLASHMLIR_NAME=V (an
A/B of a compile-time switch); `--sources DIR` builds from a patched copy of the kernels' folder
(timing what a change would gain before making it). Each is compiled here with nvcc from the library's
source (the same -D switches CMake uses) for this GPU, checked against float64 on a small odd-sized
problem, then timed over the grid (B·S = 16k tokens, H·D = 2048, as benchmarks/attention.py).
ptxas' register and spill counts are printed with it. The winners go into
runtime/microkernels/kernels.json; this script is how they were chosen.
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
from flashmlir.compiler.microkernels import CudaAttentionKernel  # noqa: E402
from flashmlir.runtime.cuda_launcher import attention_forward  # noqa: E402

SOURCES = Path(__file__).parents[1] / "runtime" / "microkernels" / "attention"
ELEMENTS = {"fp16": ("f16", "half"), "bf16": ("bf16", "__nv_bfloat16")}


def _kernel(family: str, variant: str, element: str, head_dim: int, out_dir: Path) -> CudaAttentionKernel:
    variant, switches, tag = variant_switches(variant)
    # `:PERSISTENT=0|1` changes the grid the launch needs as well as the code.
    persistent = next((s.endswith("=1") for s in switches if s.startswith("-DFLASHMLIR_PERSISTENT=")), None)
    path = out_dir / f"{family}_{variant}{tag}_{element}_d{head_dim}.cubin"
    if family == "sm90":
        found = re.fullmatch(r"(?:m(\d+))?n(\d+)s(\d+)(p?)([tT]?)", variant)
        if not found:
            raise ValueError(f"sm90 variants are [m<block_m>]n<block_n>s<stages>[p][t|T], not {variant!r}")
        block_m = int(found[1] or 128)
        warps = 4 * (block_m // 64 + 1)  # a producer warpgroup and a consumer per 64 rows
        return CudaAttentionKernel("attention_fwd_sm90", element, head_dim, block_m, int(found[2]), warps,
                                   "sm_90a", path, int(found[3]), found[4] == "p",
                                   tma=found[5] != "", tma_store=found[5] == "T", persistent_override=persistent)
    block_m, block_n, warps = (int(x) for x in variant.split("x"))
    return CudaAttentionKernel("attention_fwd_sm80", element, head_dim, block_m, block_n, warps, "sm_80", path)


def build(family: str, variant: str, head_dim: int, dtype: str, out_dir: Path,
          sources: Path = SOURCES) -> tuple[CudaAttentionKernel, str]:
    element, ctype = ELEMENTS[dtype]
    major, minor = torch.cuda.get_device_capability()
    kernel = _kernel(family, variant, element, head_dim, out_dir)
    defines = variant_switches(variant)[1]
    gencode = ("-gencode=arch=compute_90a,code=sm_90a" if family == "sm90"
               else f"-gencode=arch=compute_80,code=sm_{major}{minor}")
    command = ["nvcc", "--cubin", "-O3", "-std=c++17", gencode,
               "-Xptxas", "-v", f"-DFLASHMLIR_ELEMENT={ctype}", f"-DFLASHMLIR_ELEMENT_NAME={element}",
               f"-DFLASHMLIR_HEAD_DIM={head_dim}", f"-DFLASHMLIR_BLOCK_M={kernel.block_m}",
               f"-DFLASHMLIR_BLOCK_N={kernel.block_n}", f"-DFLASHMLIR_WARPS={kernel.warps}",
               f"-DFLASHMLIR_STAGES={kernel.stages}", f"-DFLASHMLIR_PINGPONG={int(kernel.pingpong)}",
               f"-DFLASHMLIR_TMA={int(kernel.tma)}", f"-DFLASHMLIR_TMA_STORE={int(kernel.tma_store)}",
               *defines, str(sources / f"fwd_{family}_kernels.cu"), "-o", str(kernel.object_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=True)
    # ptxas reports the lse entry first, then the plain one: keep the plain one's line.
    regs = re.findall(r"Used (\d+) registers", done.stderr)
    spills = re.findall(r"(\d+) bytes spill stores", done.stderr)
    return kernel, f"{regs[-1]} regs, {spills[-1]} B spilled"


def reference_error(kernel: CudaAttentionKernel, dtype: torch.dtype) -> float:
    """Worst relative error over odd-sized causal / full / GQA problems, vs float64. The last two have
    more tiles than the GPU has SMs, so a persistent sm_90 workgroup takes several in turn (300 rows:
    the last query block's second consumer has no rows)."""
    worst = 0.0
    for causal, hq, hkv, sq, sk in ((False, 2, 2, 333, 517), (True, 4, 2, 517, 517), (True, 2, 1, 129, 65),
                                    (False, 96, 32, 300, 517), (True, 64, 16, 300, 300)):
        q = torch.randn(1, hq, sq, kernel.head_dim, device="cuda", dtype=dtype)
        k, v = (torch.randn(1, hkv, sk, kernel.head_dim, device="cuda", dtype=dtype) for _ in range(2))
        out = attention_forward(kernel, q, k, v, causal=causal)
        g = hq // hkv
        ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(g, 1),
                                             v.double().repeat_interleave(g, 1), is_causal=causal)
        worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
    return worst


def measure(config: Config, kernels: dict, args) -> dict:
    """Every variant and SDPA backend, timed in interleaved rounds (the best round counts)."""
    from torch.nn.attention import sdpa_kernel

    q, k, v = config.inputs()
    row = {"head_dim": config.head_dim, "seq": config.seq, "causal": config.causal, "dtype": config.dtype,
           "tflops": {}}
    calls = {}
    for variant in args.variants:
        kernel = kernels.get((variant, config.head_dim, config.dtype))
        if kernel is not None:
            calls[variant] = lambda kernel=kernel: attention_forward(kernel, q, k, v, causal=config.causal)
    for name in SDPA_BACKENDS:
        def sdpa(name=name):
            with sdpa_kernel(_sdpa_backend(name)):
                F.scaled_dot_product_attention(q, k, v, is_causal=config.causal)
        try:
            sdpa()
            calls[f"sdpa-{name}"] = sdpa
        except RuntimeError:
            pass
    with torch.no_grad():
        best = interleaved_best_ms(calls, args.warmup, args.iters, args.rounds)
    row["tflops"] = {label: config.flops() / ms / 1e9 for label, ms in best.items()}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--family", choices=["sm80", "sm90"], default="sm80")
    p.add_argument("--variants", nargs="+")
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dtypes", nargs="+", default=["fp16"], choices=list(ELEMENTS))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10, help="back-to-back calls per timing")
    p.add_argument("--rounds", type=int, default=4, help="interleaved timings per variant; the best counts")
    p.add_argument("--sources", type=Path, default=SOURCES, help="the kernels' folder to build from")
    p.add_argument("--persistent-max-q-blocks", type=int,
                   help="sm90: the persistent grid up to this many query blocks (the catalog's choice unless given)")
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    if not args.variants:
        args.variants = (["n128s2", "n128s2p"] if args.family == "sm90"
                         else ["128x64x4", "128x32x4", "256x64x8", "128x128x4", "64x64x4"])

    if args.persistent_max_q_blocks is not None:
        microkernels.PERSISTENT_MAX_Q_BLOCKS = args.persistent_max_q_blocks
    out_dir = Path(tempfile.mkdtemp(prefix="flashmlir-sweep-"))
    kernels, notes = {}, []
    jobs = [(args.family, variant, d, dtype, out_dir, args.sources)
            for d in args.head_dims for dtype in args.dtypes for variant in args.variants]
    built = build_in_parallel(build, jobs, (subprocess.CalledProcessError, ValueError))  # checks: one at a time
    for (_, variant, d, dtype, _, _), result in zip(jobs, built, strict=True):
        try:
            if isinstance(result, Exception):
                raise result
            kernel, ptxas = result
            err = reference_error(kernel, getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype]))
        except (subprocess.CalledProcessError, ValueError, RuntimeError) as e:
            notes.append(f"- {variant} d{d} {dtype}: failed: {failure_text(e)}")
            continue
        kernels[(variant, d, dtype)] = kernel
        notes.append(f"- {variant} d{d} {dtype}: {ptxas}, shared {kernel.shared_bytes // 1024} KB, "
                     f"rel. error vs float64 {err:.1e}")
        print(notes[-1], flush=True)

    rows = [measure(Config(d, seq, causal, dtype), kernels, args)
            for d in args.head_dims for seq in args.seqs for causal in (False, True) for dtype in args.dtypes]

    columns = list(args.variants) + [f"sdpa-{b}" for b in SDPA_BACKENDS]
    lines = ["| hdim | seq | causal | dtype | " + " | ".join(columns)
             + " | best variant / sdpa-flash | best variant / sdpa-cudnn |",
             "|" + "---:|" * (len(columns) + 6)]
    for r in rows:
        t = r["tflops"]
        best = max((t[v] for v in args.variants if v in t), default=0.0)
        ratios = [f"{best / t[c]:.2f}x" if best and c in t else "-" for c in ("sdpa-flash", "sdpa-cudnn")]
        lines.append(f"| {r['head_dim']} | {r['seq']} | {'yes' if r['causal'] else 'no'} | {r['dtype']} | "
                     + " | ".join(f"{t[c]:.0f}" if c in t else "-" for c in columns) + f" | {' | '.join(ratios)} |")
    shape = ("[m<block_m>]n<block_n>s<stages>, p: ping-pong (block_m 128 unless given); compiled for sm_90a"
             if args.family == "sm90"
             else "block_m x block_n x warps, compiled from compute_80 for this GPU")
    text = (f"# {args.family} attention microkernel tile sweep, {torch.cuda.get_device_name()}, "
            f"{time.strftime('%Y-%m-%d')}\n\n"
            f"Forward TFLOP/s, B·S = 16k tokens, H·D = 2048; variants are {shape}. GPU time of "
            f"{args.iters} back-to-back calls, best of {args.rounds} interleaved rounds. torch {torch.__version__}.\n\n"
            + "\n".join(lines)
            + "\n\nBuild and correctness:\n" + "\n".join(notes))
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "rows": rows, "notes": notes},
                                              indent=1))


if __name__ == "__main__":
    main()
