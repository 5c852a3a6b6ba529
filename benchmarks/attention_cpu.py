"""CPU attention: flashmlir vs torch's CPU SDPA vs IREE's stock lowering of SDPA, one run, one table.

    python benchmarks/attention_cpu.py                      # B=1 H=8 D=64, seq 512..4096, causal or not
    python benchmarks/attention_cpu.py --head-dim 128 --json benchmarks/results/cpu.json

flashmlir is timed as users get it (`torch.compile(backend="flashmlir")`); IREE stock is the same
SDPA graph imported and compiled by IREE without our passes. Times are medians of `--repeats`
runs after a warm-up, in milliseconds, fp32. Speed ratios > 1 mean flashmlir is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from flashmlir.compiler import iree_driver
from flashmlir.compiler.targets import get_target
from flashmlir.frontend.fx_import import import_graph
from flashmlir.runtime.iree_module import IreeModule


def median_ms(repeats: int, fn, *args) -> float:
    fn(*args)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def iree_stock(q, k, v, causal: bool) -> IreeModule:
    """SDPA compiled by IREE alone: torch-mlir's lowering to iree_linalg_ext.attention, IREE's codegen."""
    # pre_dispatch keeps SDPA whole: IREE's torch frontend then emits its own attention op.
    gm = make_fx(lambda q, k, v: torch.ops.aten.scaled_dot_product_attention(q, k, v, is_causal=causal),
                 pre_dispatch=True)(q, k, v)
    target = get_target("cpu")
    session = iree_driver.new_session(target.iree_flags)
    vmfb = iree_driver.compile_to_vmfb(session, import_graph(gm, session.context), target.iree_flags)
    return IreeModule(vmfb)


def measure(seq: int, causal: bool, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, seq, args.head_dim) for _ in range(3))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    with torch.no_grad():
        torch._dynamo.reset()
        start = time.perf_counter()
        ours = torch.compile(sdpa, backend="flashmlir")
        out = ours(q, k, v)
        compile_s = time.perf_counter() - start
        ref = sdpa(q.double(), k.double(), v.double())
        row = {"seq": seq, "causal": causal, "compile_s": compile_s,
               "rel_err": ((out.double() - ref).norm() / ref.norm()).item(),
               "torch_ms": median_ms(args.repeats, sdpa, q, k, v),
               "flashmlir_ms": median_ms(args.repeats, ours, q, k, v)}
        if not args.no_stock:
            row["iree_stock_ms"] = median_ms(max(2, args.repeats // 2), iree_stock(q, k, v, causal), q, k, v)
    return row


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-stock", action="store_true", help="skip IREE's stock lowering (slow)")
    p.add_argument("--json", help="write the rows here as JSON")
    args = p.parse_args()

    rows = []
    for seq in args.seqs:
        for causal in (False, True):
            row = measure(seq, causal, args)
            rows.append(row)
            print(f"seq {seq:5d} causal {causal!s:5}: torch {row['torch_ms']:8.1f} ms  "
                  f"flashmlir {row['flashmlir_ms']:8.1f} ms  stock {row.get('iree_stock_ms', float('nan')):8.1f} ms",
                  flush=True)

    header = (f"\nCPU attention, fp32, B={args.batch} H={args.heads} D={args.head_dim}; {cpu_name()}, "
              f"{os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)\n")
    print(header)
    print("| seq | causal | torch SDPA ms | flashmlir ms | IREE stock ms | vs torch | vs IREE stock | rel. err | compile s |")
    print("|----:|:------:|-------------:|-------------:|--------------:|---------:|--------------:|---------:|----------:|")
    for r in rows:
        stock = r.get("iree_stock_ms")
        stock_ms = "-" if stock is None else f"{stock:.1f}"
        vs_stock = "-" if stock is None else f"{stock / r['flashmlir_ms']:.1f}x"
        print(f"| {r['seq']} | {'yes' if r['causal'] else 'no'} | {r['torch_ms']:.1f} | {r['flashmlir_ms']:.1f} | "
              f"{stock_ms} | {r['torch_ms'] / r['flashmlir_ms']:.2f}x | {vs_stock} | {r['rel_err']:.1e} | "
              f"{r['compile_s']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "cpu": cpu_name(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
