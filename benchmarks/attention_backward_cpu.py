"""CPU attention training (forward + backward): flashmlir vs torch's CPU SDPA, one run, one table.

    python benchmarks/attention_backward_cpu.py          # B=1 H=8, D 64/128, seq 512..4096, causal or not

A step is `out = attention(q, k, v); out.backward(grad)` with q, k, v needing gradients, timed as
users get it: flashmlir through `torch.compile(backend="flashmlir")` (its forward-with-lse and
backward microkernels, runtime/microkernels/attention/bwd_cpu.c; by default a training graph on
the CPU goes to Inductor with the kernels called from torch, `--rest iree` compiles it with IREE)
and, where asked, without its library (FLASHMLIR_MICROKERNELS=0: the op's textbook backward, S×S
matrices and all, compiled the same way); torch is eager SDPA (its CPU flash forward and backward). Medians after a warm-up, torch
and flashmlir in alternating rounds, fp32. FLOPs: 3.5× the forward's 4·B·H·Sq·Sk·D (half that
when causal). Speed ratios > 1 mean flashmlir is faster.
"""

from __future__ import annotations

import argparse
import json
import os
import time

import torch
import torch.nn.functional as F
from attention_cpu import _compiled, cpu_name, median_ms, paired_median_ms


def _step(fn):
    def step(q, k, v, grad):
        q.grad = k.grad = v.grad = None
        fn(q, k, v).backward(grad)

    return step


def measure(seq: int, head_dim: int, causal: bool, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(args.batch, args.heads, seq, head_dim, requires_grad=True) for _ in range(3))
    grad = torch.randn(args.batch, args.heads, seq, head_dim)

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    start = time.perf_counter()
    ours = _compiled(sdpa, microkernels=True, rest=args.rest)
    _step(ours)(q, k, v, grad)
    compile_s = time.perf_counter() - start
    got = [x.grad.clone() for x in (q, k, v)]
    q64, k64, v64 = (x.detach().double().requires_grad_() for x in (q, k, v))
    sdpa(q64, k64, v64).backward(grad.double())
    err = max(((g.double() - w.grad).norm() / w.grad.norm()).item() for g, w in zip(got, (q64, k64, v64), strict=True))
    row = {"seq": seq, "head_dim": head_dim, "causal": causal, "compile_s": compile_s, "rel_err": err}
    row["torch_ms"], row["flashmlir_ms"] = paired_median_ms(args.repeats, (_step(sdpa), _step(ours)), q, k, v, grad)
    if not args.no_codegen and seq <= args.codegen_max_seq:
        row["textbook_ms"] = median_ms(max(2, args.repeats // 2), _step(_compiled(sdpa, microkernels=False, rest=args.rest)),
                                       q, k, v, grad)
    os.environ.pop("FLASHMLIR_MICROKERNELS", None)
    flops = 3.5 * 4 * args.batch * args.heads * seq * seq * head_dim * (0.5 if causal else 1.0)
    row["flashmlir_gflops"] = flops / row["flashmlir_ms"] / 1e6
    row["torch_gflops"] = flops / row["torch_ms"] / 1e6
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--repeats", type=int, default=4)
    p.add_argument("--rest", choices=("auto", "iree", "inductor"), default="auto",
                   help="what compiles the graph around attention (the backend's option)")
    p.add_argument("--no-codegen", action="store_true", help="skip flashmlir without its microkernels")
    p.add_argument("--codegen-max-seq", type=int, default=2048, help="longest seq for the textbook path")
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
                      f"flashmlir {row['flashmlir_ms']:8.1f} ms  textbook {row.get('textbook_ms', float('nan')):8.1f} "
                      f"ms  err {row['rel_err']:.1e}", flush=True)

    lines = [f"# CPU attention training step (forward + backward), {time.strftime('%Y-%m-%d')}", "",
             f"fp32, B={args.batch} H={args.heads}; {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} "
             f"({torch.get_num_threads()} threads). Medians of at least {args.repeats} steps each and 1 s, torch and "
             "flashmlir in alternating rounds. `python benchmarks/attention_backward_cpu.py`", "",
             "| hdim | seq | causal | torch SDPA ms | flashmlir ms | flashmlir, no microkernels ms | torch GFLOP/s "
             "| flashmlir GFLOP/s | vs torch | grad rel. err | compile s |",
             "|---:|----:|:------:|-------------:|-------------:|-------------:|-----:|-----:|---------:|---------:|"
             "----------:|"]
    for r in rows:
        textbook = r.get("textbook_ms")
        lines.append(
            f"| {r['head_dim']} | {r['seq']} | {'yes' if r['causal'] else 'no'} | {r['torch_ms']:.1f} | "
            f"{r['flashmlir_ms']:.1f} | {'-' if textbook is None else f'{textbook:.1f}'} | {r['torch_gflops']:.0f} | "
            f"{r['flashmlir_gflops']:.0f} | {r['torch_ms'] / r['flashmlir_ms']:.2f}x | {r['rel_err']:.1e} | "
            f"{r['compile_s']:.1f} |")
    lines.append("")
    lines.append("vs torch > 1 means flashmlir is faster. grad rel. err: the largest of dQ, dK, dV against float64. "
                 f"compile s: the first step (dynamo, then {'IREE' if args.rest == 'iree' else 'Inductor'} for the "
                 f"forward and backward graphs; rest={args.rest}).")
    text = "\n".join(lines)
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
