"""What attention dropout costs the library's CPU kernels (the torch path's training pair).

    python benchmarks/cpu_dropout_cost.py --markdown cpu-dropout.md

The forward with lse and the backward, called as the training graph calls them
(`flashmlir::attention_forward[_dropout]`, `attention_backward[_dropout]` on CPU tensors, float32),
without dropout and with p (cpu_dropout.h: a 32-bit hash per probability, vectorized), beside
torch's CPU SDPA forward and backward with the same p. Wall ms per call, best of `--repeat`.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from flashmlir.runtime import torch_kernels


def best_ms(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return min(times)


def measure(q, k, v, grad, seed, causal: bool, p: float, repeat: int) -> list[float]:
    """ms of: our forward, its dropout twin, our backward, its twin, SDPA forward+backward, with p."""
    ops = torch.ops.flashmlir
    out, lse = ops.attention_forward(q, k, v, causal, None)
    out_p, lse_p = ops.attention_forward_dropout(q, k, v, p, seed, causal, None)
    row = [best_ms(lambda: ops.attention_forward(q, k, v, causal, None), repeat),
           best_ms(lambda: ops.attention_forward_dropout(q, k, v, p, seed, causal, None), repeat),
           best_ms(lambda: ops.attention_backward(grad, q, k, v, out, lse, causal, None), repeat),
           best_ms(lambda: ops.attention_backward_dropout(grad, q, k, v, out_p, lse_p, p, seed, causal, None), repeat)]
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    for rate in (0.0, p):
        def sdpa(rate=rate):
            o = F.scaled_dot_product_attention(qg, kg, vg, dropout_p=rate, is_causal=causal)
            torch.autograd.grad(o, (qg, kg, vg), grad)
        row.append(best_ms(sdpa, repeat))
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", nargs="+", default=["1x8x1024x64", "1x12x512x64", "1x4x1024x128"],
                   help="BxHxSxD")
    p.add_argument("--p", type=float, default=0.1)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--markdown")
    args = p.parse_args()
    torch_kernels.register()
    lines = ["| shape | causal | fwd ms | fwd ms, p | bwd ms | bwd ms, p | SDPA fwd+bwd ms | SDPA fwd+bwd ms, p |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for shape in args.shapes:
        b, h, s, d = (int(x) for x in shape.split("x"))
        for causal in (False, True):
            q, k, v, grad = (torch.randn(b, h, s, d) for _ in range(4))
            row = measure(q, k, v, grad, torch.tensor(7), causal, args.p, args.repeat)
            lines.append(f"| {shape} | {'yes' if causal else 'no'} | " + " | ".join(f"{x:.1f}" for x in row) + " |")
            print(lines[-1], flush=True)
    text = (f"CPU attention dropout (p = {args.p}), {torch.get_num_threads()} threads, torch {torch.__version__}\n\n"
            + "\n".join(lines) + "\n")
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
