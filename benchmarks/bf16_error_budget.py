"""How far a bf16 flash-attention output can be from float64, by arithmetic alone (CPU, seconds).

    python benchmarks/bf16_error_budget.py [--markdown FILE]

The GPU forward's bf16 outputs measure 2.3-2.4e-3 norm-wise relative error against torch's fp32
attention (benchmarks/attention.py). This emulates the kernels' arithmetic step by step on random
bf16 inputs against a float64 reference: rounding the output to bf16 alone, then P rounded to bf16
before P·V as well (what the tensor cores need: P and V of one type, as in FlashAttention and
cuDNN), with fp32 scores, sums and accumulation. Relative error = ‖out − ref‖ / ‖ref‖.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch


def errors(head_dim: int, seq: int, causal: bool) -> tuple[float, float]:
    q, k, v = (torch.randn(1, 4, seq, head_dim).to(torch.bfloat16) for _ in range(3))
    mask = torch.ones(seq, seq, dtype=torch.bool).tril() if causal else None

    def scores(a, b, dtype):
        s = a.to(dtype) @ b.to(dtype).transpose(-1, -2) / math.sqrt(head_dim)
        return s if mask is None else s.masked_fill(~mask, float("-inf"))

    ref = torch.softmax(scores(q, k, torch.float64), -1) @ v.double()
    s = scores(q, k, torch.float32)
    p = torch.exp(s - s.amax(-1, keepdim=True))
    row_sum = p.sum(-1, keepdim=True)

    def rel(out):
        return ((out.double() - ref).norm() / ref.norm()).item()

    rounded_out = rel(((p @ v.float()) / row_sum).to(torch.bfloat16))
    rounded_p = rel(((p.to(torch.bfloat16).float() @ v.float()) / row_sum).to(torch.bfloat16))
    return rounded_out, rounded_p


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown")
    args = parser.parse_args()
    torch.manual_seed(0)
    lines = ["| head dim | seq | causal | O rounded to bf16 | and P rounded to bf16 before P·V |", "|---:|---:|---:|---:|---:|"]
    for head_dim in (64, 128, 256):
        for seq in (512, 2048):
            for causal in (False, True):
                a, b = errors(head_dim, seq, causal)
                lines.append(f"| {head_dim} | {seq} | {'yes' if causal else 'no'} | {a:.2e} | {b:.2e} |")
    text = "# bf16 attention: relative error vs float64 from the arithmetic alone (CPU emulation)\n\n" + "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
