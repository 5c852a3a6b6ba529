"""What attention dropout costs the library's sm_90 (or sm_80) kernels, beside SDPA's kernels with and without it.

    python benchmarks/dropout_cost.py --markdown dropout.md
    python benchmarks/dropout_cost.py --arch sm_80     # the sm_80 kernels (on Hopper: their compute_80 code)

The catalog's forward (with lse, as training runs it) and backward kernels, launched directly with
p = 0 and with p (dropout.cuh: a 32-bit hash per pair of probabilities), and SDPA's flash and efficient
backends (cuDNN's where this torch lets it drop) with the same p; forward and backward timed
separately (backward: SDPA's `torch.autograd.grad` through a forward done once). Shapes as
benchmarks/attention.py (B·S = 16k tokens, H·D = 2048); TFLOP/s counts 4·B·H·Sq·Sk·D a forward
(half for causal), 2.5× that a backward. Each problem is first checked against float64 with the
same seed (`attention_op.dropout_keep`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from attention import SDPA_BACKENDS, Config, _sdpa_backend, interleaved_best_ms  # noqa: E402

from flashmlir.compiler import microkernels  # noqa: E402
from flashmlir.frontend.training_ops import reference_forward  # noqa: E402
from flashmlir.runtime.cuda_launcher import attention_backward, attention_forward  # noqa: E402

ELEMENTS = {"fp16": ("f16", torch.float16), "bf16": ("bf16", torch.bfloat16)}


def check(config: Config, p: float, arch: str) -> float:
    """Relative error of our dropped forward vs float64 (a small problem of the same kind)."""
    element, dtype = ELEMENTS[config.dtype]
    q, k, v = (torch.randn(1, 2, 333, config.head_dim, device="cuda", dtype=dtype) for _ in range(3))
    seed = torch.tensor(1234567, device="cuda")
    kernel = microkernels.select_attention_forward(arch, element, config.head_dim, 333, 333, config.causal)
    out, _ = attention_forward(kernel, q, k, v, causal=config.causal, with_lse=True, dropout_p=p, dropout_seed=seed)
    want, _ = reference_forward(q.double(), k.double(), v.double(), config.causal, None, p, seed)
    return ((out.double() - want).norm() / want.norm()).item()


def measure(config: Config, p: float, args) -> dict:
    element, dtype = ELEMENTS[config.dtype]
    q, k, v = config.inputs()
    seq = config.seq
    forward = microkernels.select_attention_forward(args.arch, element, config.head_dim, seq, seq, config.causal)
    backward = microkernels.select_attention_backward(args.arch, element, config.head_dim)
    seed = torch.tensor(42, device="cuda")
    d_o = torch.randn_like(q)
    calls_fwd, calls_bwd = {}, {}
    for label, rate in (("ours", 0.0), (f"ours p={p}", p)):
        drop = {"dropout_p": rate, "dropout_seed": seed} if rate else {}
        out, lse = attention_forward(forward, q, k, v, causal=config.causal, with_lse=True, **drop)
        calls_fwd[label] = lambda drop=drop: attention_forward(forward, q, k, v, causal=config.causal, with_lse=True,
                                                               **drop)
        calls_bwd[label] = lambda drop=drop, out=out, lse=lse: attention_backward(
            backward, q, k, v, out, d_o, lse, causal=config.causal, **drop)
    qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))
    for name in SDPA_BACKENDS:
        for rate in (0.0, p):
            label = f"sdpa-{name}" + (f" p={p}" if rate else "")
            try:
                with torch.nn.attention.sdpa_kernel(_sdpa_backend(name)):
                    out = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=rate, is_causal=config.causal)
                    torch.autograd.grad(out, (qg, kg, vg), d_o, retain_graph=True)
            except RuntimeError:
                continue

            def fwd(name=name, rate=rate):
                with torch.nn.attention.sdpa_kernel(_sdpa_backend(name)), torch.no_grad():
                    F.scaled_dot_product_attention(q, k, v, dropout_p=rate, is_causal=config.causal)

            def bwd(out=out):
                torch.autograd.grad(out, (qg, kg, vg), d_o, retain_graph=True)

            calls_fwd[label], calls_bwd[label] = fwd, bwd
    flops = config.flops()
    fwd_ms = interleaved_best_ms(calls_fwd, args.warmup, args.iters, args.rounds)
    bwd_ms = interleaved_best_ms(calls_bwd, args.warmup, args.iters, args.rounds)
    return {"head_dim": config.head_dim, "seq": seq, "causal": config.causal, "dtype": config.dtype,
            "forward": {k: flops / ms / 1e9 for k, ms in fwd_ms.items()},
            "backward": {k: 2.5 * flops / ms / 1e9 for k, ms in bwd_ms.items()}}


def table(rows: list[dict], part: str) -> list[str]:
    columns = sorted({c for r in rows for c in r[part]}, key=lambda c: (not c.startswith("ours"), c))
    lines = ["| hdim | seq | causal | dtype | " + " | ".join(columns) + " |",
             "|---:|---:|---:|---:|" + "---:|" * len(columns)]
    for r in rows:
        cells = [f"{r[part][c]:.0f}" if c in r[part] else "-" for c in columns]
        lines.append(f"| {r['head_dim']} | {r['seq']} | {'yes' if r['causal'] else 'no'} | {r['dtype']} | "
                     + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096, 16384])
    p.add_argument("--dtypes", nargs="+", default=["fp16"], choices=list(ELEMENTS))
    p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--arch", default="sm_90", choices=["sm_90", "sm_80"], help="whose kernels are `ours`")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--markdown")
    args = p.parse_args()
    configs = [Config(d, s, c, t) for d in args.head_dims for s in args.seqs for c in (False, True)
               for t in args.dtypes]
    errors = {(c.head_dim, c.causal, c.dtype): check(c, args.p, args.arch) for c in configs}
    rows = []
    for config in configs:
        rows.append(measure(config, args.p, args))
        print(rows[-1], flush=True)
    lines = [f"# Attention dropout (p = {args.p}) in the {args.arch} kernels, {torch.cuda.get_device_name()}", "",
             "TFLOP/s (B·S = 16k tokens, H·D = 2048); `ours`: the catalog's kernels launched directly, "
             f"`ours p={args.p}` their dropout twins. torch {torch.__version__}. Relative error of our dropped "
             "forward vs float64 with the same seed (1×2×333 tokens): "
             + ", ".join(f"d{d}{' causal' if c else ''} {t} {e:.1e}" for (d, c, t), e in errors.items()) + ".",
             "", "## Forward (with lse)", "", *table(rows, "forward"), "", "## Backward", "", *table(rows, "backward")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
