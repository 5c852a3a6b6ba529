"""flashmlir-demo: a small GPT-style model compiled with flashmlir on the CPU.

Prints the attention sites flashmlir found, the error against eager PyTorch (and against a float64
run), and the time of one forward pass against eager. The model mixes the two ways attention is
usually written: half its layers spell it out (nanoGPT's slow path: q @ kᵀ, masked_fill with a
causal buffer, softmax, @ v), half call F.scaled_dot_product_attention(is_causal=True).
"""

from __future__ import annotations

import argparse
import math
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F


class CausalSelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, use_sdpa: bool):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.heads, self.use_sdpa = heads, use_sdpa
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        if self.use_sdpa:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))
            att = att.masked_fill(self.bias[:, :, :t, :t] == 0, float("-inf"))
            y = F.softmax(att, dim=-1) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, max_len: int, use_sdpa: bool):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads, max_len, use_sdpa)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 512, dim: int = 256, heads: int = 8, layers: int = 4, max_len: int = 1024):
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, max_len, use_sdpa=i % 2 == 1) for i in range(layers))
        self.ln, self.head = nn.LayerNorm(dim), nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.tok(tokens) + self.pos(torch.arange(tokens.shape[1], device=tokens.device))
        for block in self.blocks:
            x = block(x)
        return self.head(self.ln(x))


def _median_ms(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flashmlir-demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq", type=int, default=512, help="sequence length (default 512)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    import flashmlir

    torch.manual_seed(0)
    model = TinyGPT().eval()
    tokens = torch.randint(0, 512, (args.batch, args.seq))
    print(f"TinyGPT: 4 layers, dim 256, 8 heads, batch {args.batch}, sequence {args.seq}, float32, CPU\n")
    with torch.no_grad():
        start = time.perf_counter()
        report = flashmlir.explain(model, tokens)
        print(report)
        print(f"(first compile: {time.perf_counter() - start:.1f} s; later runs load it from the cache)\n")

        compiled = torch.compile(model, backend="flashmlir")
        out = compiled(tokens)
        eager = model(tokens)
        ref = model.double()(tokens)
        model.float()
        max_abs = (out - eager).abs().max().item()
        rel64 = ((out.double() - ref).norm() / ref.norm()).item()
        rel_eager = ((eager.double() - ref).norm() / ref.norm()).item()
        print(f"max |flashmlir - eager|        = {max_abs:.3e}")
        print(f"relative error vs float64: flashmlir {rel64:.2e}, eager {rel_eager:.2e}")

        t_eager = _median_ms(lambda: model(tokens), args.repeats)
        t_ours = _median_ms(lambda: compiled(tokens), args.repeats)
    print(f"forward time (median of {args.repeats}): eager {t_eager:.1f} ms, flashmlir {t_ours:.1f} ms "
          f"({t_eager / t_ours:.2f}x)")
    ok = report.compiled and len(report.sites) == 4 and rel64 < 1e-4
    print("OK" if ok else "UNEXPECTED: see above")
    return 0 if ok else 1
