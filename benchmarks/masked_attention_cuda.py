"""Attention with an explicit mask on CUDA: what torch's SDPA kernels compute, and what they cost.

    python benchmarks/masked_attention_cuda.py --markdown masked.md

Our CUDA kernels take no explicit mask, so a masked site runs on the torch path. Until this script
was run there that meant the op's float32 reference (every score materialized); torch's SDPA
takes masks in its memory-efficient, cuDNN and math kernels, but whether each computes what the
op means is for the GPU to say, not the documentation:

1. Semantics: per SDPA backend (and the default dispatch given the mask as attention_op.sdpa_mask
   puts it, what the op's torch path runs), mask kind and dtype, the forward's and the gradients' relative
   error against the op in float64 (attention_op.attention: a row whose every key is masked by
   a bool or -inf mask gets zeros and no gradient; a finite finfo.min mask is plain arithmetic),
   and NaNs. Odd lengths (333 queries, 517 keys), GQA 4:2 for the default dispatch.
2. Speed: forward and forward + backward of a padding-masked site (bool [B, 1, 1, S], the last
   eighth of every other sequence's keys masked) at head dim 128: the op's reference, SDPA's
   default dispatch and each backend, and our kernels without the mask (the training pair) as the
   ceiling.
3. Compiled training: a function calling SDPA with a bool or a finfo.min padding mask, forward and
   backward through flashmlir (masked_training_ops' routes), the same with those routes off,
   Inductor and eager.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, str(Path(__file__).parent))
from attention import interleaved_best_ms, separate_masked_sdpa  # noqa: E402

from flashmlir.frontend.attention_op import (  # noqa: E402
    attention,
    reference_attention,
    sdpa_attention,
    sdpa_mask,
)

BACKENDS = {"default": None, "math": SDPBackend.MATH, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "default, sdpa_mask": None}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
EMPTY_ROWS = slice(5, 9)  # rows whose every key the "rows" masks remove
DEVICE = "cuda"  # --device cpu: a smoke test of the semantics table


def make_mask(kind: str, b: int, sq: int, sk: int, dtype: torch.dtype) -> torch.Tensor:
    """A mask of `kind`: bool-padding [B,1,1,Sk]; bool-rows, inf-rows, min-rows [B,1,Sq,Sk] with
    30% of keys masked at random and rows EMPTY_ROWS of batch 0 masked entirely."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    if kind == "bool-padding":
        keep = torch.ones(b, 1, 1, sk, dtype=torch.bool, device=DEVICE)
        keep[1::2, ..., sk - sk // 8:] = False
        return keep
    keep = torch.rand(b, 1, sq, sk, generator=g, device=DEVICE) > 0.3
    keep[0, :, EMPTY_ROWS] = False
    if kind == "bool-rows":
        return keep
    masked = float("-inf") if kind == "inf-rows" else torch.finfo(dtype).min
    return torch.zeros(keep.shape, dtype=dtype, device=DEVICE).masked_fill(~keep, masked)


def relative(got: torch.Tensor, want: torch.Tensor) -> str:
    if not torch.isfinite(got).all():
        return f"NaN/inf x{int((~torch.isfinite(got)).sum())}"
    return f"{((got.double() - want).norm() / want.norm().clamp_min(1e-30)).item():.1e}"


def semantics(head_dims: list[int]) -> list[dict]:
    rows = []
    b, sq, sk = 2, 333, 517
    for d in head_dims:
        for dname, dtype in DTYPES.items():
            for kind in ("bool-padding", "bool-rows", "inf-rows", "min-rows"):
                for hq, hkv in ((4, 4), (4, 2)):
                    torch.manual_seed(0)
                    q = torch.randn(b, hq, sq, d, device=DEVICE, dtype=dtype)
                    k, v = (torch.randn(b, hkv, sk, d, device=DEVICE, dtype=dtype) for _ in range(2))
                    do = torch.randn(b, hq, sq, d, device=DEVICE, dtype=dtype)
                    mask = make_mask(kind, b, sq, sk, dtype)
                    ref_in = [t.double().requires_grad_() for t in (q, k, v)]
                    want = attention(*ref_in, mask)
                    want.backward(do.double())
                    for backend, which in BACKENDS.items():
                        if hq != hkv and which is not None:
                            continue  # GQA: what the op's sdpa_attention asks of the default dispatch
                        inputs = [t.clone().requires_grad_() for t in (q, k, v)]
                        row = {"head_dim": d, "dtype": dname, "mask": kind, "gqa": f"{hq}:{hkv}", "backend": backend}
                        try:
                            context = sdpa_kernel([which]) if which is not None else torch.enable_grad()
                            with context:
                                given = sdpa_mask(mask, q) if "sdpa_mask" in backend else mask
                                out = F.scaled_dot_product_attention(*inputs, attn_mask=given, enable_gqa=hq != hkv)
                                out.backward(do)
                        except RuntimeError as e:
                            row["error"] = str(e).splitlines()[0][:80]
                            rows.append(row)
                            continue
                        row["out"] = relative(out, want)
                        row["empty rows |out|"] = f"{out[0, :, EMPTY_ROWS].float().abs().max().item():.1e}"
                        for name, got, ref in zip(("dq", "dk", "dv"), inputs, ref_in, strict=True):
                            row[name] = relative(got.grad, ref.grad)
                        rows.append(row)
                        print(row, flush=True)
    return rows


def speed(seqs: list[int], head_dim: int, dtype: torch.dtype, rounds: int) -> list[dict]:
    """ms per call, forward and forward + backward, B·S = 16k tokens, H·D = 2048."""
    from flashmlir.runtime import torch_kernels

    torch_kernels.register()
    return [row for s in seqs for row in _speed_rows(s, head_dim, dtype, rounds)]


def _speed_rows(s: int, head_dim: int, dtype: torch.dtype, rounds: int) -> list[dict]:
    rows = []
    b, h = max(1, 16384 // s), 2048 // head_dim
    q, k, v = (torch.randn(b, h, s, head_dim, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
    do = torch.randn_like(q)
    mask = make_mask("bool-padding", b, s, s, dtype)
    routes = {
        "op reference (before)": lambda: reference_attention(q, k, v, mask),
        "sdpa_attention": lambda: sdpa_attention(q, k, v, mask),
        **{f"sdpa {name}": (lambda which=which: _with(which, lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask))) for name, which in BACKENDS.items() if which not in (None, SDPBackend.MATH)},
        "ours, no mask": lambda: torch.ops.flashmlir.attention_forward(q, k, v)[0],
    }
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).double()
    errors = {}
    for label, fn in routes.items():
        try:
            got = _no_grad(fn)
            errors[label] = None if "no mask" in label else relative(got, want)
        except RuntimeError as e:
            errors[label] = f"error: {str(e).splitlines()[0][:60]}"
    runnable = {label: fn for label, fn in routes.items() if not str(errors[label]).startswith("error")}
    for mode in ("forward", "forward+backward"):
        if mode == "forward":
            calls = {label: (lambda fn=fn: _no_grad(fn)) for label, fn in runnable.items()}
        else:
            calls = {label: (lambda fn=fn: fn().backward(do)) for label, fn in runnable.items()}
        ms = interleaved_best_ms(calls, warmup=2, iters=5, rounds=rounds)
        for label in routes:
            rows.append({"seq": s, "batch": b, "heads": h, "mode": mode, "route": label,
                         "ms": ms.get(label), "error": errors[label]})
            print(rows[-1], flush=True)
        q.grad = k.grad = v.grad = None
    return rows


def compiled_training(seqs: list[int], head_dim: int, rounds: int) -> list[dict]:
    """ms per forward + backward of a compiled function that calls SDPA with a padding mask (bf16,
    B·S = 16k tokens): as a bool mask and as Hugging Face's additive one (0 / finfo.min), through
    flashmlir (the masked training routes), flashmlir with those routes off (the op's textbook
    backward, as before), Inductor, and eager."""
    from unittest import mock

    from flashmlir.frontend import masked_training_ops

    rows = []
    dtype = torch.bfloat16
    for s in seqs:
        b, h = max(1, 16384 // s), 2048 // head_dim
        q, k, v = (torch.randn(b, h, s, head_dim, device=DEVICE, dtype=dtype, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        keep = make_mask("bool-padding", b, s, s, dtype)
        for kind, mask in (("bool", keep), ("finfo.min", torch.zeros(keep.shape, dtype=dtype, device=DEVICE)
                                            .masked_fill(~keep, torch.finfo(dtype).min))):
            def step(fn, operands=(q, k, v, mask), do=do):
                return lambda: fn(*operands).backward(do)

            torch._dynamo.reset()
            fns = separate_masked_sdpa("eager", "inductor", "flashmlir", "textbook")
            calls = {"eager SDPA": step(fns["eager"]), "inductor": step(torch.compile(fns["inductor"])),
                     "flashmlir": step(torch.compile(fns["flashmlir"], backend="flashmlir"))}
            with mock.patch.object(masked_training_ops, "rewrite_masked_for_training", lambda *a: 0):
                calls["flashmlir, textbook backward (before)"] = step(torch.compile(fns["textbook"],
                                                                                    backend="flashmlir"))
                calls["flashmlir, textbook backward (before)"]()  # compiled with the routes off
            for fn in calls.values():
                fn()
            ms = interleaved_best_ms(calls, warmup=2, iters=5, rounds=rounds)
            for label, t in ms.items():
                rows.append({"seq": s, "mask": kind, "route": label, "ms": t})
                print(rows[-1], flush=True)
            q.grad = k.grad = v.grad = None
    return rows


def _with(which, fn):
    with sdpa_kernel([which]):
        return fn()


def _no_grad(fn):
    with torch.no_grad():
        return fn()


def markdown(sem: list[dict], spd: list[dict], trained: list[dict]) -> str:
    where = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU"
    lines = [f"torch {torch.__version__}, {where}", "", "## What SDPA computes", "",
             "| head dim | dtype | mask | GQA | backend | out | empty rows max abs out | dq | dk | dv |",
             "|---:|---|---|---|---|---:|---:|---:|---:|---:|"]
    for r in sem:
        if "error" in r:
            lines.append(f"| {r['head_dim']} | {r['dtype']} | {r['mask']} | {r['gqa']} | {r['backend']} | "
                         f"refused: {r['error']} | | | | |")
        else:
            lines.append(f"| {r['head_dim']} | {r['dtype']} | {r['mask']} | {r['gqa']} | {r['backend']} | {r['out']} "
                         f"| {r['empty rows |out|']} | {r['dq']} | {r['dk']} | {r['dv']} |")
    lines += ["", "## What it costs (ms per call, head dim 128, padding mask)", "",
              "| seq | B x H | mode | route | ms | rel. error vs fp32 SDPA |", "|---:|---|---|---|---:|---:|"]
    for r in spd:
        ms = "-" if r["ms"] is None else f"{r['ms']:.3f}"
        lines.append(f"| {r['seq']} | {r['batch']}x{r['heads']} | {r['mode']} | {r['route']} | {ms} | {r['error'] or ''} |")
    if trained:
        lines += ["", "## Compiled training (ms per forward + backward, bf16, head dim 128, padding mask)", "",
                  "| seq | mask | route | ms |", "|---:|---|---|---:|"]
        lines += [f"| {r['seq']} | {r['mask']} | {r['route']} | {r['ms']:.3f} |" for r in trained]
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    p.add_argument("--seqs", type=int, nargs="+", default=[1024, 4096])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--markdown")
    p.add_argument("--device", default="cuda")
    p.add_argument("--parts", nargs="+", default=["semantics", "speed", "training"],
                   choices=["semantics", "speed", "training"])
    args = p.parse_args()
    global DEVICE
    DEVICE = args.device
    gpu = DEVICE == "cuda"
    sem = semantics(args.head_dims) if "semantics" in args.parts else []
    spd = speed(args.seqs, 128, torch.float16, args.rounds) if gpu and "speed" in args.parts else []
    trained = compiled_training(args.seqs, 128, args.rounds) if gpu and "training" in args.parts else []
    text = markdown(sem, spd, trained)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text)


if __name__ == "__main__":
    main()
