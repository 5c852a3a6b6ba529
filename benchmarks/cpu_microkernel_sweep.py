"""Tile sweep of the CPU attention microkernel, single-threaded, beside torch's CPU SDPA on one thread.

    python benchmarks/cpu_microkernel_sweep.py
    python benchmarks/cpu_microkernel_sweep.py --variants 3x8x8x64 4x6x6x64 --seqs 2048

A variant is row_vectors x key_tile x dim_tile x keys (kernels.json's names). Each is compiled here
with the host C compiler from the library's source, for the host's best instruction set
(-march=x86-64-v4 with AVX-512, else x86-64-v3: AVX2 + FMA; --march to choose), as a shared library so that
Python can call it (ctypes) as one workgroup that takes all the work, on one thread: the
kernel's speed without IREE's scheduling. Each variant is first checked against float64.
The winner goes into runtime/microkernels/kernels.json.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flashmlir.compiler import microkernels
from flashmlir.compiler.targets import get_target

SOURCE = Path(__file__).parents[1] / "runtime" / "microkernels" / "attention" / "fwd_cpu.c"
_P, _S = ctypes.c_void_p, ctypes.c_size_t
_MEMREF = [_P, _P, _S, _S, _S]  # allocated, aligned, offset, size, stride


def host_march() -> str:
    """The -march of the catalog's first CPU forward build this host runs (x86-64-v4: AVX-512, -v3: AVX2)."""
    flags = get_target("cpu").cpu_features
    return next(k.march for k in microkernels.library().cpu if k.requires <= flags)


class Variant:
    def __init__(self, spec: str, out_dir: Path, march: str):
        self.spec = spec
        self.row_vectors, self.key_tile, self.dim_tile, self.keys = (int(x) for x in spec.split("x"))
        library = out_dir / f"{spec}.so"
        compiler = os.environ.get("CC", "cc")
        subprocess.run([compiler, "-std=c17", "-O3", f"-march={march}", "-shared", "-fPIC", "-fvisibility=hidden",
                        f"-DFLASHMLIR_ROW_VECTORS={self.row_vectors}", f"-DFLASHMLIR_KEY_TILE={self.key_tile}",
                        f"-DFLASHMLIR_DIM_TILE={self.dim_tile}", f"-DFLASHMLIR_KEYS={self.keys}",
                        str(SOURCE), "-o", str(library)], check=True)
        self._library = ctypes.CDLL(str(library))

    def __call__(self, q, k, v, causal: bool, scale: float | None = None) -> torch.Tensor:
        b, hq, sq, d = q.shape
        hkv, sk = k.shape[1], k.shape[2]
        o = torch.full_like(q, float("nan"))
        fn = getattr(self._library, f"flashmlir_attention_fwd_cpu_f32_d{d}")
        fn.argtypes = _MEMREF * 4 + [_S, _S, _S, _S, ctypes.c_float, _S, _S, _S]
        memrefs = [x for t in (q, k, v, o) for x in (t.data_ptr(), t.data_ptr(), 0, t.numel(), 1)]
        scale = d ** -0.5 if scale is None else scale
        fn(*memrefs, hq // hkv, b * hq, sq, sk, scale, int(causal), 0, 1)  # one workgroup: all the work
        return o


def check(variant: Variant) -> float:
    worst = 0.0
    for b, hq, hkv, sq, sk, d, causal in ((1, 2, 2, 100, 300, 64, False), (2, 4, 2, 77, 77, 128, True),
                                          (1, 2, 1, 333, 129, 32, True)):
        q = torch.randn(b, hq, sq, d)
        k, v = (torch.randn(b, hkv, sk, d) for _ in range(2))
        g = hq // hkv
        ref = F.scaled_dot_product_attention(q.double(), k.double().repeat_interleave(g, 1),
                                             v.double().repeat_interleave(g, 1), is_causal=causal)
        out = variant(q, k, v, causal)
        worst = max(worst, ((out.double() - ref).norm() / ref.norm()).item())
    return worst


def torch_sdpa(q, k, v, causal):
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def seconds(fn, *args) -> float:
    fn(*args)
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variants", nargs="+", default=["2x8x8x64", "3x8x8x64", "4x6x6x64", "3x8x8x128"])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--march", default=None, help="x86-64-v4 (AVX-512) or x86-64-v3 (AVX2); default: the host's")
    args = p.parse_args()
    march = args.march or host_march()
    torch.set_num_threads(1)
    out_dir = Path(tempfile.mkdtemp(prefix="flashmlir-cpu-sweep-"))
    variants = [Variant(spec, out_dir, march) for spec in args.variants]
    for variant in variants:
        print(f"{variant.spec}: rel. error vs float64 {check(variant):.1e}", flush=True)
    header = "| hdim | seq | causal | torch 1 thread GF/s | " + " | ".join(v.spec for v in variants) + " |"
    lines = [header, "|" + "---:|" * (4 + len(variants))]
    for d in args.head_dims:
        for seq in args.seqs:
            for causal in (False, True):
                q, k, v = (torch.randn(1, 8, seq, d) for _ in range(3))
                flops = 4 * 8 * seq * seq * d / (2 if causal else 1)
                torch_s = seconds(torch_sdpa, q, k, v, causal)
                cells = [f"{flops / seconds(variant, q, k, v, causal) / 1e9:.0f}" for variant in variants]
                lines.append(f"| {d} | {seq} | {'yes' if causal else 'no'} | {flops / torch_s / 1e9:.0f} | "
                             + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    print(f"\nGFLOP/s, one thread, B=1 H=8, fp32, -march={march}; variants are row_vectors x key_tile x dim_tile x keys\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
