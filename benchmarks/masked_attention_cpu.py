"""Attention with an explicit mask on the CPU: flashmlir's routes beside eager SDPA and Inductor.

    python benchmarks/masked_attention_cpu.py --markdown masked.md

The CPU microkernels take no explicit mask. A masked site can run as IREE's compile of our flash
loop nest (`rest="iree"`), or on the torch path (`rest="inductor"`), where the op runs torch's
fused SDPA when that means the same thing (attention_op.sdpa_attention) and its float32 reference
otherwise. The default for a CPU inference graph is IREE unless it has masked sites SDPA takes
(backend.py `_masked_sites`). Padding masks as BERT-style models make them: bool [B, 1, 1, S] with
the last keys of one sequence masked out, and the same as an additive float mask; and decoders'
[B, 1, S, S] masks, causal masking and that padding together, bool and as Hugging Face writes them
(finfo.min). fp32, B=2 H=8
D=64, 2 threads as the CI machine has; best of `--repeats` calls after one warm-up.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from attention import separate_masked_sdpa  # noqa: E402


def attention(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def best_ms(fn, inputs: tuple, repeats: int) -> float:
    fn(*inputs)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(*inputs)
        times.append(time.perf_counter() - start)
    return min(times) * 1e3


def row_times(inputs: tuple, routes: dict, repeats: int, what: str) -> dict:
    """ms of eager SDPA, Inductor and every flashmlir route on `inputs`, each checked against eager."""
    want = attention(*inputs)
    times = {"eager": best_ms(attention, inputs, repeats)}
    torch._dynamo.reset()
    times["inductor"] = best_ms(torch.compile(attention), inputs, repeats)
    for route, options in routes.items():
        torch._dynamo.reset()
        compiled = torch.compile(attention, backend="flashmlir", options=options)
        err = ((compiled(*inputs) - want).norm() / want.norm()).item()
        if err > 1e-5:
            raise SystemExit(f"{route}, {what}: relative error {err:.1e}")
        times[route] = best_ms(compiled, inputs, repeats)
    return times


def training_rows(seqs: list[int], repeats: int) -> list[str]:
    """ms per forward + backward of SDPA with a padding or decoder mask, bool and finfo.min: eager,
    Inductor, flashmlir (the masked pair: our kernels' key-bias entries; float masks through the
    checked route, whose fused branch is that pair) and flashmlir with the pair on ATen's CPU flash
    attention (as before)."""
    from unittest import mock

    from flashmlir.runtime import cpu_kernels

    lines = ["| seq | mask | eager ms | inductor ms | flashmlir ms | flashmlir, ATen's pair ms | flashmlir vs eager |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    for seq in seqs:
        q, k, v = (torch.randn(2, 8, seq, 64, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        keep = torch.ones(2, 1, 1, seq, dtype=torch.bool)
        keep[1, ..., seq - seq // 8:] = False
        decoder = keep & torch.ones(seq, seq).tril().bool()
        low = torch.finfo(torch.float32).min
        for kind, mask in (("bool padding", keep), ("bool causal + padding", decoder),
                           ("finfo.min padding", torch.zeros(keep.shape).masked_fill(~keep, low)),
                           ("finfo.min causal + padding", torch.zeros(decoder.shape).masked_fill(~decoder, low))):
            def step(fn, mask=mask, q=q, k=k, v=v, do=do):
                return lambda: fn(q, k, v, mask).backward(do)

            torch._dynamo.reset()
            fns = separate_masked_sdpa("eager", "inductor", "flashmlir", "aten")
            times = {"eager": best_ms(step(fns["eager"]), (), repeats),
                     "inductor": best_ms(step(torch.compile(fns["inductor"])), (), repeats),
                     "flashmlir": best_ms(step(torch.compile(fns["flashmlir"], backend="flashmlir")), (), repeats)}
            with mock.patch.object(cpu_kernels, "_masked_pair_route", lambda *a: "aten"):
                times["aten"] = best_ms(step(torch.compile(fns["aten"], backend="flashmlir")), (), repeats)
            lines.append(f"| {seq} | {kind} | {times['eager']:.1f} | {times['inductor']:.1f} | "
                         f"{times['flashmlir']:.1f} | {times['aten']:.1f} | {times['eager'] / times['flashmlir']:.2f}x |")
            print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--markdown")
    p.add_argument("--training", action="store_true", help="time forward + backward instead (the masked pair)")
    args = p.parse_args()
    torch.set_num_threads(2)
    if args.training:
        text = "\n".join(training_rows(args.seqs, args.repeats)) + "\n"
        print("\n" + text)
        if args.markdown:
            Path(args.markdown).write_text(text)
        return
    routes = {"flashmlir default": {}, "flashmlir rest=iree": {"rest": "iree"},
              "flashmlir rest=inductor": {"rest": "inductor"}}
    lines = ["| seq | mask | eager SDPA ms | inductor ms | " + " | ".join(f"{r} ms" for r in routes)
             + " | default vs eager |", "|---:|---|---:|---:|" + "---:|" * (len(routes) + 1)]
    for seq in args.seqs:
        q, k, v = (torch.randn(2, 8, seq, 64) for _ in range(3))
        keep = torch.ones(2, 1, 1, seq, dtype=torch.bool)
        keep[1, ..., seq - seq // 8:] = False
        decoder = keep & torch.ones(seq, seq, dtype=torch.bool).tril()  # [B, 1, S, S]: causal and padding
        for kind, mask in (("bool padding", keep),
                           ("float padding", torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))),
                           ("bool causal + padding", decoder),
                           ("finfo.min causal + padding",
                            torch.zeros(decoder.shape).masked_fill(~decoder, torch.finfo(torch.float32).min))):
            with torch.no_grad():
                times = row_times((q, k, v, mask), routes, args.repeats, f"{seq} tokens, {kind}")
            lines.append(f"| {seq} | {kind} | {times['eager']:.1f} | {times['inductor']:.1f} | "
                         + " | ".join(f"{times[r]:.1f}" for r in routes)
                         + f" | {times['eager'] / times['flashmlir default']:.2f}x |")
            print(lines[-1], flush=True)
    text = (f"# Masked attention on the CPU, {time.strftime('%Y-%m-%d')}\n\nfp32, B=2 H=8 D=64, 2 threads, "
            f"torch {torch.__version__}; best of {args.repeats} calls. `python benchmarks/masked_attention_cpu.py`\n\n"
            + "\n".join(lines) + "\n")
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
