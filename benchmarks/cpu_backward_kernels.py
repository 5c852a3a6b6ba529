"""The CPU backward kernels called directly: split (`_dq` then `_dkdv`) against one pass (`_fused`).

    python benchmarks/cpu_backward_kernels.py                      # the host's best ISA, 1 and 2 threads
    python benchmarks/cpu_backward_kernels.py --tiles 2x3 2x2 1x4  # a sweep of row_vectors x key_tile
    python benchmarks/cpu_backward_kernels.py --tiles 2x3 2x3:STREAM_ROWS=24 --interleaved  # an A/B of a switch

Each tile variant is compiled here from runtime/microkernels/attention/bwd_cpu.c for the host's
best instruction set (as the build does, -march=x86-64-v4 or -v3), as a shared library Python
calls (ctypes) without IREE: `threads` workgroups, one per Python thread (ctypes lets go of the
GIL), each taking its share of the items as under IREE. Every variant is first checked against
float64 autograd, both ways. Times: the best of `--repeats` calls after one warm-up; GFLOP/s
count the backward as 2.5× the forward's 4·B·H·S²·D (half that when causal), whatever a variant
recomputes. B=1 H=8 fp32. `--interleaved` times one kernel (`--kernel`), every variant in turn
(best of `--repeats` rounds), against the first: on a small shared machine a variant timed after
another saw a different machine, and short calls moved by ±25% between runs.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch

from flashmlir.compiler import microkernels
from flashmlir.compiler.targets import get_target
from flashmlir.frontend.training_ops import reference_backward, reference_forward

ROOT = Path(__file__).parents[1] / "runtime" / "microkernels"
_P, _S = ctypes.c_void_p, ctypes.c_size_t
_MEMREF = [_P, _P, _S, _S, _S]
_CONSTANTS = [_S, _S, _S, _S, ctypes.c_float, _S, _S, _S]


def _kernel():
    """The catalog's first CPU backward kernel this host runs (its march and tile sizes)."""
    flags = get_target("cpu").cpu_features
    return next(k for k in microkernels.library().cpu_backward if k.requires <= flags)


class Kernels:
    def __init__(self, tiles: str, march: str, out_dir: Path):
        shape, _, rest = tiles.partition(":")  # `:NAME=V,...`: -DFLASHMLIR_NAME=V, an A/B of a switch
        row_vectors, key_tile = shape.split("x")
        switches = [f"-DFLASHMLIR_{switch}" for switch in rest.split(",") if switch]
        library = out_dir / f"bwd_{tiles.replace(':', '_').replace(',', '_').replace('=', '')}.so"
        subprocess.run([os.environ.get("CC", "cc"), "-std=c17", "-O3", f"-march={march}", "-shared", "-fPIC",
                        f"-DFLASHMLIR_ROW_VECTORS={row_vectors}", f"-DFLASHMLIR_KEY_TILE={key_tile}", *switches,
                        str(ROOT / "attention" / "bwd_cpu.c"), "-o", str(library)], check=True)
        self.tiles = tiles
        self._library = ctypes.CDLL(str(library))

    def _fn(self, head_dim: int, part: str, bindings: int):
        fn = getattr(self._library, f"flashmlir_attention_bwd_cpu_f32_d{head_dim}_{part}")
        fn.argtypes = _MEMREF * bindings + _CONSTANTS
        return fn

    def __call__(self, fused: bool, q, k, v, o, grad, lse, causal: bool, scale: float, threads: int):
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        dq, dk, dv = (torch.full_like(x, float("nan")) for x in (q, k, v))
        delta = torch.full_like(lse, float("nan"))
        constants = (hq // hkv, b * hq, sq, sk, scale, int(causal))

        def run(fn, tensors):
            memrefs = [x for t in tensors for x in (t.data_ptr(), t.data_ptr(), 0, t.numel(), 1)]
            workers = [threading.Thread(target=fn, args=(*memrefs, *constants, wg, threads)) for wg in range(threads)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()

        if fused:
            run(self._fn(d, "fused", 10), (q, k, v, o, grad, lse, dq, delta, dk, dv))
        else:
            run(self._fn(d, "dq", 8), (q, k, v, o, grad, lse, dq, delta))
            run(self._fn(d, "dkdv", 8), (q, k, v, grad, lse, delta, dk, dv))
        return dq, dk, dv


def _forward64(q, k, v, causal: bool, scale: float, grad):
    """O and lse (float32, the kernels' inputs) and the q/k/v gradients, all from float64: the
    training ops' reference implementations (flashmlir.frontend.training_ops)."""
    q64, k64, v64, g64 = (x.double() for x in (q, k, v, grad))
    o, lse = reference_forward(q64, k64, v64, causal, scale)
    return o.float(), lse.float(), reference_backward(g64, q64, k64, v64, o, lse, causal, scale)


def check(kernels: Kernels) -> float:
    worst = 0.0
    for b, hq, hkv, sq, sk, d, causal in ((1, 2, 2, 100, 300, 64, False), (2, 4, 2, 77, 77, 128, True),
                                          (1, 2, 1, 333, 129, 32, True), (1, 2, 2, 129, 333, 64, True)):
        q, grad = torch.randn(b, hq, sq, d), torch.randn(b, hq, sq, d)
        k, v = (torch.randn(b, hkv, sk, d) for _ in range(2))
        o, lse, want = _forward64(q, k, v, causal, 0.3, grad)
        for fused in (False, True):
            for threads in (1, 3):
                got = kernels(fused, q, k, v, o, grad, lse, causal, 0.3, threads)
                worst = max(worst, *(((g.double() - w).norm() / w.norm()).item() for g, w in zip(got, want, strict=True)))
    return worst


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiles", nargs="+", default=None, help="row_vectors x key_tile; default: the catalog's")
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--interleaved", action="store_true", help="one kernel, the variants in turn, vs the first")
    p.add_argument("--kernel", choices=("one-pass", "split"), default="one-pass", help="what --interleaved times")
    p.add_argument("--markdown")
    args = p.parse_args()
    kernel = _kernel()
    values = dict(d.removeprefix("-DFLASHMLIR_").split("=") for d in kernel.defines)
    catalog_tiles = f"{values.pop('ROW_VECTORS')}x{values.pop('KEY_TILE')}"  # row_vectors x key_tile[:the rest]
    if values:
        catalog_tiles += ":" + ",".join(f"{name}={value}" for name, value in values.items())
    out_dir = Path(tempfile.mkdtemp(prefix="flashmlir-cpu-bwd-"))
    variants = [Kernels(t, kernel.march, out_dir) for t in args.tiles or [catalog_tiles]]
    for kernels in variants:
        print(f"{kernels.tiles}: worst rel. error vs float64 {check(kernels):.1e}", flush=True)
    if args.interleaved:
        lines = interleaved(variants, args)
        title = f"{args.kernel}, variants timed in turn"
    else:
        lines = split_against_one_pass(variants, args)
        title = "split vs one pass"
    text = (f"# CPU backward kernels, {title}, {time.strftime('%Y-%m-%d')}\n\n"
            f"-march={kernel.march} ({kernel.isa}), fp32, B=1 H=8, called directly (no IREE); best of "
            f"{args.repeats}. `python benchmarks/cpu_backward_kernels.py`\n\n" + "\n".join(lines) + "\n")
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text)


def _problem(seq: int, d: int):
    torch.manual_seed(seq)
    q, k, v, grad = (torch.randn(1, 8, seq, d) for _ in range(4))
    o, lse = torch.randn_like(q) * 0.1, torch.rand(1, 8, seq) + 5  # timing only
    return q, k, v, o, grad, lse


def _flops(seq: int, d: int, causal: bool) -> float:
    return 2.5 * 4 * 8 * seq * seq * d * (0.5 if causal else 1.0)


def interleaved(variants: list[Kernels], args) -> list[str]:
    lines = ["| threads | hdim | seq | causal | " + " | ".join(f"{v.tiles} GF/s" for v in variants)
             + " | " + " | ".join(f"{v.tiles} vs {variants[0].tiles}" for v in variants[1:]) + " |",
             "|---:|---:|---:|:-:|" + "---:|" * (2 * len(variants) - 1)]
    for threads in args.threads:
        for d in args.head_dims:
            for seq in args.seqs:
                for causal in (False, True):
                    q, k, v, o, grad, lse = _problem(seq, d)
                    best = [float("inf")] * len(variants)
                    fused = args.kernel == "one-pass"
                    for kernels in variants:  # warm-up
                        kernels(fused, q, k, v, o, grad, lse, causal, d ** -0.5, threads)
                    for _ in range(args.repeats):
                        for i, kernels in enumerate(variants):
                            start = time.perf_counter()
                            kernels(fused, q, k, v, o, grad, lse, causal, d ** -0.5, threads)
                            best[i] = min(best[i], time.perf_counter() - start)
                    flops = _flops(seq, d, causal)
                    lines.append(f"| {threads} | {d} | {seq} | {'yes' if causal else 'no'} | "
                                 + " | ".join(f"{flops / t / 1e9:.0f}" for t in best) + " | "
                                 + " | ".join(f"{best[0] / t:.2f}x" for t in best[1:]) + " |")
                    print(lines[-1], flush=True)
    return lines


def split_against_one_pass(variants: list[Kernels], args) -> list[str]:
    lines = ["| tiles | threads | hdim | seq | causal | split ms | split GF/s | one pass ms | one pass GF/s | one pass vs split |",
             "|---|---:|---:|---:|:-:|---:|---:|---:|---:|---:|"]
    for kernels in variants:
        for threads in args.threads:
            for d in args.head_dims:
                for seq in args.seqs:
                    for causal in (False, True):
                        q, k, v, o, grad, lse = _problem(seq, d)
                        best = {}
                        for fused in (False, True):
                            kernels(fused, q, k, v, o, grad, lse, causal, d ** -0.5, threads)
                            times = []
                            for _ in range(args.repeats):
                                start = time.perf_counter()
                                kernels(fused, q, k, v, o, grad, lse, causal, d ** -0.5, threads)
                                times.append(time.perf_counter() - start)
                            best[fused] = min(times)
                        flops = _flops(seq, d, causal)
                        lines.append(f"| {kernels.tiles} | {threads} | {d} | {seq} | {'yes' if causal else 'no'} | "
                                     f"{best[False] * 1e3:.1f} | {flops / best[False] / 1e9:.0f} | "
                                     f"{best[True] * 1e3:.1f} | {flops / best[True] / 1e9:.0f} | "
                                     f"{best[False] / best[True]:.2f}x |")
                        print(lines[-1], flush=True)
    return lines


if __name__ == "__main__":
    main()
