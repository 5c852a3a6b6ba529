"""One launch of a library attention kernel (and optionally SDPA's flash kernel), for profilers.

    ncu --section WarpStateStats -k regex:flash python benchmarks/profile_microkernel.py --sdpa flash
    compute-sanitizer --tool racecheck python benchmarks/profile_microkernel.py --seq 300
    compute-sanitizer --tool racecheck python benchmarks/profile_microkernel.py --seq 333 --batch 1 --heads 4 \
        --kv-heads 2 --causal --head-dim 64 --backward
    ncu --section WarpStateStats python benchmarks/profile_microkernel.py --seq 512 --object patched.cubin
    ncu ... python benchmarks/profile_microkernel.py --seq 4096 --object t_store.cubin --set tma_store=1

Shapes as benchmarks/attention.py (B·S = 16k tokens, H·D = 2048) unless --batch/--heads say
otherwise. Each kernel runs twice (a warm-up, then the one to look at).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F

from flashmlir.compiler.microkernels import select_attention_backward, select_attention_forward
from flashmlir.runtime.cuda_launcher import attention_backward, attention_forward


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--seq", type=int, default=4096)
    p.add_argument("--batch", type=int)
    p.add_argument("--heads", type=int)
    p.add_argument("--kv-heads", type=int, help="K/V heads (GQA); as many as --heads unless given")
    p.add_argument("--backward", action="store_true", help="run the backward kernels too (after a forward with lse)")
    p.add_argument("--select-seq", type=int,
                   help="the length the forward kernel is chosen for (default --seq): e.g. 4096 runs head dim "
                        "64's long-sequence tiling on a small problem")
    p.add_argument("--dtype", choices=["f16", "bf16"], default="f16")
    p.add_argument("--causal", action="store_true")
    p.add_argument("--arch", default="sm_90", help="the target whose kernel is chosen (sm_90: the Hopper one)")
    p.add_argument("--object", type=Path,
                   help="run the forward from this cubin/fatbin instead of the library's (a patched build of "
                        "the kernel the catalog chooses: same symbol, same tiles)")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="with --object: a catalog field of the kernel it was built as (e.g. tma_store=1, for "
                        "a variant the catalog does not choose at this length): the launch follows it")
    p.add_argument("--sdpa", choices=["flash", "cudnn", "efficient"],
                   help="also run this SDPA backend (with --backward: its forward and backward)")
    args = p.parse_args()
    dtype = {"f16": torch.float16, "bf16": torch.bfloat16}[args.dtype]
    batch = args.batch or max(1, 16384 // args.seq)
    heads = args.heads or 2048 // args.head_dim
    q = torch.randn(batch, heads, args.seq, args.head_dim, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, args.kv_heads or heads, args.seq, args.head_dim, device="cuda", dtype=dtype)
            for _ in range(2))
    chosen_for = args.select_seq or args.seq
    kernel = select_attention_forward(args.arch, args.dtype, args.head_dim, chosen_for, chosen_for, args.causal)
    if args.object:
        fields = {}
        for item in args.set:
            name, _, value = item.partition("=")
            current = getattr(kernel, name)  # AttributeError names a field the kernel does not have
            fields[name] = bool(int(value)) if isinstance(current, bool) else type(current)(value)
        kernel = dataclasses.replace(kernel, object_path=args.object, **fields)
    for _ in range(2):
        out = attention_forward(kernel, q, k, v, causal=args.causal, with_lse=args.backward)
    if args.backward:
        backward = select_attention_backward(args.arch, args.dtype, args.head_dim)
        o, lse = out
        d_o = torch.randn_like(q)
        for _ in range(2):
            attention_backward(backward, q, k, v, o, d_o, lse, causal=args.causal)
    if args.sdpa:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION}[args.sdpa]
        with sdpa_kernel(backend):
            for _ in range(2):
                if args.backward:  # its backward too, from the same gradient of O
                    q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
                    F.scaled_dot_product_attention(q_, k_, v_, is_causal=args.causal).backward(d_o)
                else:
                    F.scaled_dot_product_attention(q, k, v, is_causal=args.causal)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
