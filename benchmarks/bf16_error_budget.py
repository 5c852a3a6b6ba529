"""How far a bf16 flash-attention output can be from float64, by arithmetic alone (CPU, seconds).

    python benchmarks/bf16_error_budget.py [--markdown FILE]
    python benchmarks/bf16_error_budget.py --gpu [--markdown FILE]   # and the GPU kernels beside it

The GPU forward's bf16 outputs measure 2.3-2.4e-3 norm-wise relative error against torch's fp32
attention (benchmarks/attention.py). This emulates the kernels' arithmetic step by step on random
bf16 inputs against a float64 reference: rounding the output to bf16 alone, then P rounded to bf16
before P·V as well (what the tensor cores need: P and V of one type, as in FlashAttention and
cuDNN), with fp32 scores, sums and accumulation. Relative error = ‖out − ref‖ / ‖ref‖. With --gpu,
the same problems also go through the library's sm_90 forward (the catalog's choice) and torch SDPA's
flash, cuDNN and efficient kernels, measured the same way: where an exact bf16 kernel can land.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "cudnn": "CUDNN_ATTENTION", "efficient": "EFFICIENT_ATTENTION"}


def gpu_errors(q, k, v, causal: bool, ref: torch.Tensor) -> list[str]:
    """Relative errors of the sm_90 forward and SDPA's kernels on the same bf16 inputs (cells)."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from flashmlir.compiler.microkernels import select_attention_forward
    from flashmlir.runtime.cuda_launcher import attention_forward

    q, k, v = (t.cuda() for t in (q, k, v))
    seq, head_dim = q.shape[-2], q.shape[-1]
    outputs = {"flashmlir": lambda: attention_forward(
        select_attention_forward("sm_90", "bf16", head_dim, seq, seq, causal), q, k, v, causal=causal)}
    for name in SDPA_BACKENDS:
        def sdpa(name=name):
            with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[name])):
                return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        outputs[f"sdpa-{name}"] = sdpa
    cells = []
    for run in outputs.values():
        try:
            out = run().cpu().double()
            cells.append(f"{((out - ref).norm() / ref.norm()).item():.2e}")
        except RuntimeError as e:  # a backend that does not take the problem
            cells.append(f"- ({str(e).splitlines()[0][:40]})")
    return cells


def online(s: torch.Tensor, v: torch.Tensor, slack: float, block: int = 128) -> torch.Tensor:
    """Flash attention's online softmax over key tiles of `block`, P rounded to bf16 for P·V, in the
    exp2 domain: the row's shift moves to a tile's maximum when that passes it by more than `slack`
    (0: every time, FlashAttention's; 8: the sm_90 kernels' lazy shift, online_softmax.cuh), O and
    ℓ rescaled when it moves. s: fp32 scores · log2 e; returns O in bf16."""
    rows = s.shape[:-1]
    shift = torch.full(rows, float("-inf"))
    row_sum, acc = torch.zeros(rows), torch.zeros(*rows, v.shape[-1])
    for j in range(0, s.shape[-1], block):
        tile = s[..., j:j + block]
        moved = tile.amax(-1) > shift + slack
        new_shift = torch.where(moved, tile.amax(-1), shift)
        factor = torch.where(torch.isinf(shift), torch.zeros(rows), torch.exp2(shift - new_shift))
        shift = new_shift
        p = torch.exp2(tile - torch.where(torch.isinf(shift), torch.zeros(rows), shift).unsqueeze(-1))
        row_sum = row_sum * factor + p.sum(-1)
        acc = acc * factor.unsqueeze(-1) + p.to(torch.bfloat16).float() @ v[..., j:j + block, :].float()
    return (acc / row_sum.unsqueeze(-1)).to(torch.bfloat16)


def errors(head_dim: int, seq: int, causal: bool, gpu: bool = False) -> list[str]:
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
    s2 = s * (1 / math.log(2))
    tracking, lagging = rel(online(s2, v, 0.0)), rel(online(s2, v, 8.0))
    return ([f"{rounded_out:.2e}", f"{rounded_p:.2e}", f"{tracking:.2e}", f"{lagging:.2e}"]
            + (gpu_errors(q, k, v, causal, ref) if gpu else []))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown")
    parser.add_argument("--gpu", action="store_true", help="also the sm_90 forward and SDPA's kernels (a GPU)")
    args = parser.parse_args()
    torch.manual_seed(0)
    columns = ["O rounded to bf16", "and P rounded to bf16 before P·V",
               "online, shift = running max (FlashAttention)", "online, shift lags ≤ 8 (ours)"]
    if args.gpu:
        columns += ["flashmlir sm_90"] + [f"sdpa-{name}" for name in SDPA_BACKENDS]
    lines = ["| head dim | seq | causal | " + " | ".join(columns) + " |", "|---:|---:|---:|" + "---:|" * len(columns)]
    for head_dim in (64, 128, 256):
        for seq in (512, 2048):
            for causal in (False, True):
                cells = errors(head_dim, seq, causal, args.gpu)
                lines.append(f"| {head_dim} | {seq} | {'yes' if causal else 'no'} | " + " | ".join(cells) + " |")
    where = (f"CPU emulation beside the GPU kernels, {torch.cuda.get_device_name()}" if args.gpu
             else "CPU emulation")
    text = f"# bf16 attention: relative error vs float64 from the arithmetic alone ({where})\n\n" + "\n".join(lines)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
