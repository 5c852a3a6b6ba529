"""CPU attention: flashmlir vs torch's CPU SDPA vs IREE's stock lowering of SDPA, one run, one table.

    python benchmarks/attention_cpu.py          # B=1 H=8, D 64/128, seq 512..8192, causal or not
    python benchmarks/attention_cpu.py --head-dims 128 --seqs 2048 --json out.json --markdown out.md

flashmlir is timed as users get it (`torch.compile(backend="flashmlir")`), with its microkernel
library (the default) and without it (FLASHMLIR_MICROKERNELS=0: our passes' loop nest, IREE's
codegen of the tiles); IREE stock is the same SDPA graph imported and compiled by IREE without our
passes. Times are medians after a warm-up (torch and flashmlir timed in alternating rounds), in
milliseconds, fp32 unless --dtype says otherwise. Speed ratios > 1 mean flashmlir is faster.
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


def paired_median_ms(repeats: int, fns, *args, min_seconds: float = 1.0) -> list[float]:
    """Median time of each of `fns` over back-to-back calls, in alternating rounds.

    On the 2-core VM call times are bimodal and drift, so both sides are timed in the same
    stretches of time. A round is one untimed call (whatever ran before, torch's spinning OpenMP
    threads or IREE's sleeping workers, settles) and 4 timed ones. At least `repeats` timed calls
    each, and `min_seconds` in all.
    """
    times: list[list[float]] = [[] for _ in fns]
    while len(times[0]) < repeats or sum(map(sum, times)) < min_seconds * 1e3:
        for fn, series in zip(fns, times, strict=True):
            fn(*args)
            for _ in range(4):
                start = time.perf_counter()
                fn(*args)
                series.append((time.perf_counter() - start) * 1e3)
        if len(times[0]) >= 100 * repeats:
            break
    return [statistics.median(series) for series in times]


def iree_stock(q, k, v, causal: bool) -> IreeModule:
    """SDPA compiled by IREE alone: torch-mlir's lowering to iree_linalg_ext.attention, IREE's codegen."""
    # pre_dispatch keeps SDPA whole: IREE's torch frontend then emits its own attention op.
    gm = make_fx(lambda q, k, v: torch.ops.aten.scaled_dot_product_attention(q, k, v, is_causal=causal),
                 pre_dispatch=True)(q, k, v)
    target = get_target("cpu")
    session = iree_driver.new_session(target.iree_flags)
    vmfb = iree_driver.compile_to_vmfb(session, import_graph(gm, session.context), target.iree_flags)
    return IreeModule(vmfb)


def _compiled(fn, microkernels: bool, rest: str = "auto"):
    """fn compiled by flashmlir (compile time included in the first call) with or without the library."""
    torch._dynamo.reset()
    os.environ["FLASHMLIR_MICROKERNELS"] = "1" if microkernels else "0"
    return torch.compile(fn, backend="flashmlir", options={"rest": rest})


def measure(seq: int, head_dim: int, causal: bool, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    q, k, v = (torch.randn(args.batch, args.heads, seq, head_dim, dtype=dtype) for _ in range(3))

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    with torch.no_grad():
        start = time.perf_counter()
        ours = _compiled(sdpa, microkernels=True)
        out = ours(q, k, v)
        compile_s = time.perf_counter() - start
        ref = sdpa(q.double(), k.double(), v.double())
        row = {"seq": seq, "head_dim": head_dim, "causal": causal, "compile_s": compile_s,
               "rel_err": ((out.double() - ref).norm() / ref.norm()).item()}
        row["torch_ms"], row["flashmlir_ms"] = paired_median_ms(args.repeats, (sdpa, ours), q, k, v)
        slow_repeats = max(1, args.repeats // 3) if seq >= 4096 else max(2, args.repeats // 2)
        if not args.no_codegen:
            row["codegen_ms"] = median_ms(slow_repeats, _compiled(sdpa, microkernels=False), q, k, v)
        os.environ.pop("FLASHMLIR_MICROKERNELS", None)
        if not args.no_stock and (args.stock_max_seq is None or seq <= args.stock_max_seq):
            row["iree_stock_ms"] = median_ms(slow_repeats, iree_stock(q, k, v, causal), q, k, v)
    return row


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown CPU"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="bf16/f16 run the f32 kernel on widened inputs; the error is still against float64")
    p.add_argument("--no-stock", action="store_true", help="skip IREE's stock lowering (slow)")
    p.add_argument("--stock-max-seq", type=int, default=None,
                   help="time IREE's stock lowering only up to this length (AVX2: 30 s a call at 2k, head dim 128)")
    p.add_argument("--no-codegen", action="store_true", help="skip flashmlir without its microkernels (slow)")
    p.add_argument("--json", help="write the rows here as JSON")
    p.add_argument("--markdown", help="write the table here")
    args = p.parse_args()

    rows = []
    for head_dim in args.head_dims:
        for seq in args.seqs:
            for causal in (False, True):
                row = measure(seq, head_dim, causal, args)
                rows.append(row)
                print(f"d {head_dim:3d} seq {seq:5d} causal {causal!s:5}: torch {row['torch_ms']:8.1f} ms  "
                      f"flashmlir {row['flashmlir_ms']:8.1f} ms  codegen {row.get('codegen_ms', float('nan')):8.1f} "
                      f"ms  stock {row.get('iree_stock_ms', float('nan')):8.1f} ms", flush=True)

    def cell(value, fmt):
        return "-" if value is None else format(value, fmt)

    lines = [f"# CPU attention, {time.strftime('%Y-%m-%d')}", "",
             f"{args.dtype}, B={args.batch} H={args.heads}; {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads). torch and flashmlir: medians of at least {args.repeats} "
             "calls each and 1 s, timed in alternating rounds; IREE stock and flashmlir without microkernels: "
             "medians of fewer runs at long sequences. `python benchmarks/attention_cpu.py`", "",
             "| hdim | seq | causal | torch SDPA ms | flashmlir ms | flashmlir, no microkernels ms | IREE stock ms "
             "| vs torch | vs IREE stock | rel. err | compile s |",
             "|---:|----:|:------:|-------------:|-------------:|-------------:|--------------:|---------:|"
             "--------------:|---------:|----------:|"]
    for r in rows:
        stock = r.get("iree_stock_ms")
        lines.append(
            f"| {r['head_dim']} | {r['seq']} | {'yes' if r['causal'] else 'no'} | {r['torch_ms']:.1f} | "
            f"{r['flashmlir_ms']:.1f} | {cell(r.get('codegen_ms'), '.1f')} | {cell(stock, '.1f')} | "
            f"{r['torch_ms'] / r['flashmlir_ms']:.2f}x | {cell(stock and stock / r['flashmlir_ms'], '.1f')}"
            f"{'' if stock is None else 'x'} | {r['rel_err']:.1e} | {r['compile_s']:.1f} |")
    lines.append("")
    lines.append("vs torch > 1 means flashmlir is faster. compile s: the first call of the torch.compile'd "
                 "function (dynamo, our passes, IREE).")
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"config": vars(args), "cpu": cpu_name(), "cores": os.cpu_count(),
                       "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
