"""End-to-end training: a GPT-2 small step with flashmlir vs eager attention, eager SDPA and Inductor.

    python benchmarks/train_gpt2.py                         # GPT-2 small (124M), seq 1024, on the GPU
    python benchmarks/train_gpt2.py --tiny --device cpu     # a 2-layer model, to try the script anywhere
    python benchmarks/train_gpt2.py --cpu-small --device cpu --precision fp32   # a CPU-sized model

The model is built from its configuration with random weights (GPT-2's architecture: learned
positions, pre-norm blocks, GELU MLP, tied embeddings) and trained on synthetic tokens (a fixed
random stream, the same for every variant) with AdamW under bf16 autocast (`--precision fp32`:
without). Variants:
- eager: attention written out (q·kᵀ, causal mask, softmax, dropout with `--attn-dropout`, ·v), as in
  GPT-2's original code;
- eager-sdpa: the same model calling F.scaled_dot_product_attention(is_causal=True);
- inductor: the eager model under torch.compile's default backend;
- flashmlir: the eager model under torch.compile(backend="flashmlir") with its default (on CUDA and
  for CPU training attention as flashmlir's kernels, the rest of the graph compiled by Inductor;
  for CPU inference IREE compiles the whole graph);
- flashmlir-iree: the same with options={"rest": "iree"} (IREE compiles the whole graph);
- flashmlir-inductor: with options={"rest": "inductor"} (our kernels from torch, Inductor's rest);
- flashmlir-sdpa: the eager-sdpa model under torch.compile(backend="flashmlir").
The eager model's causal mask is a registered buffer (GPT-2's `bias`): the backend reads its value
when it compiles, finds it causal, and gives those sites the flash kernels (the buffer is checked on
every call; docs/MATCHER.md).
Each variant starts from the same weights; its first `--loss-steps` losses are compared with eager's
(the table gives the largest difference), then steps are timed in blocks (tokens/s from the median
block's CUDA-synchronized wall time after warm-up, and the blocks' range; the first step, which
compiles, is reported separately).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class GPTConfig:
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    vocab_size: int = 50257
    block_size: int = 1024
    attn_pdrop: float = 0.0  # dropout of the attention probabilities (GPT-2's own config: 0.1)


TINY = GPTConfig(n_layer=2, n_head=4, n_embd=128, vocab_size=512, block_size=128)
CPU_SMALL = GPTConfig(n_layer=2, n_head=4, n_embd=256, vocab_size=2048, block_size=512)  # a step in ~0.5 s on 2 cores


class SelfAttention(nn.Module):
    def __init__(self, config: GPTConfig, sdpa: bool):
        super().__init__()
        self.n_head, self.sdpa, self.attn_pdrop = config.n_head, sdpa, config.attn_pdrop
        self.qkv = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.proj = nn.Linear(config.n_embd, config.n_embd)
        mask = torch.ones(config.block_size, config.block_size, dtype=torch.bool).tril()
        self.register_buffer("causal", mask.view(1, 1, config.block_size, config.block_size), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).split(c, dim=2)
        q, k, v = (y.view(b, t, self.n_head, c // self.n_head).transpose(1, 2) for y in (q, k, v))
        drop = self.attn_pdrop if self.training else 0.0
        if self.sdpa:
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=drop, is_causal=True)
        else:
            att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.shape[-1]))
            att = att.masked_fill(~self.causal[:, :, :t, :t], float("-inf"))
            y = F.dropout(F.softmax(att, dim=-1), drop, self.training) @ v
        return self.proj(y.transpose(1, 2).contiguous().view(b, t, c))


class Block(nn.Module):
    def __init__(self, config: GPTConfig, sdpa: bool):
        super().__init__()
        self.ln_1, self.ln_2 = nn.LayerNorm(config.n_embd), nn.LayerNorm(config.n_embd)
        self.attn = SelfAttention(config, sdpa)
        self.mlp = nn.Sequential(nn.Linear(config.n_embd, 4 * config.n_embd), nn.GELU(approximate="tanh"),
                                 nn.Linear(4 * config.n_embd, config.n_embd))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig, sdpa: bool = False):
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.blocks = nn.ModuleList(Block(config, sdpa) for _ in range(config.n_layer))
        self.ln_f = nn.LayerNorm(config.n_embd)
        self.head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.head.weight = self.wte.weight  # tied, as in GPT-2
        for name, p in self.named_parameters():
            if p.dim() > 1:
                std = 0.02 / math.sqrt(2 * config.n_layer) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, 0.0, std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(positions)
        for block in self.blocks:
            x = block(x)
        logits = self.head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.shape[-1]).float(), targets.view(-1))


VARIANTS = ("eager", "eager-sdpa", "inductor", "flashmlir", "flashmlir-iree", "flashmlir-inductor", "flashmlir-sdpa")


def _model(variant: str, config: GPTConfig, device: str, state: dict, inference: bool = False) -> nn.Module:
    model = GPT(config, sdpa=variant in ("eager-sdpa", "flashmlir-sdpa")).to(device)
    model.load_state_dict(state)
    model.train(not inference)
    if variant == "inductor":
        return torch.compile(model)
    if variant in ("flashmlir", "flashmlir-sdpa"):
        return torch.compile(model, backend="flashmlir")
    if variant in ("flashmlir-iree", "flashmlir-inductor"):
        return torch.compile(model, backend="flashmlir", options={"rest": variant.removeprefix("flashmlir-")})
    return model


def run_variant(variant: str, config: GPTConfig, args, state: dict, batches: list) -> dict:
    torch._dynamo.reset()
    torch.manual_seed(1)
    model = _model(variant, config, args.device, state, args.inference)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, fused=args.device == "cuda")
    autocast = torch.autocast(args.device, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(i: int) -> float:
        idx, targets = batches[i % len(batches)]
        if args.inference:
            with torch.no_grad(), autocast:
                return model(idx, targets)
        with autocast:
            loss = model(idx, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync():
        if args.device == "cuda":
            torch.cuda.synchronize()

    start = time.perf_counter()
    losses = [step(0).item()]
    first_step_s = time.perf_counter() - start
    losses += [step(i).item() for i in range(1, args.loss_steps)]
    for i in range(args.warmup):
        step(args.loss_steps + i)
    sync()
    block_ms = []  # the timed steps in blocks: the median is reported, the spread shows the noise
    for b in range(args.blocks):
        start = time.perf_counter()
        for i in range(args.steps):
            last = step(b * args.steps + i)
        last.item()
        sync()
        block_ms.append((time.perf_counter() - start) / args.steps * 1e3)
    step_ms = sorted(block_ms)[len(block_ms) // 2]
    row = {"variant": variant, "first_step_s": first_step_s, "step_ms": step_ms, "block_ms": block_ms,
           "tokens_per_s": args.batch * config.block_size / step_ms * 1e3, "losses": losses}
    print(json.dumps({k: v for k, v in row.items() if k != "losses"}), flush=True)
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--tiny", action="store_true", help="a 2-layer model with a 128-token context")
    p.add_argument("--cpu-small", action="store_true", help="a 2-layer, 256-wide model with a 512-token context")
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16",
                   help="bf16: under bf16 autocast (weights and optimizer fp32); fp32: no autocast")
    p.add_argument("--inference", action="store_true",
                   help="time forward passes without gradients (the loss of a fixed model) instead of training steps")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument("--loss-steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed steps per block")
    p.add_argument("--blocks", type=int, default=5,
                   help="timed blocks per variant; the median block is reported (one block of 10 moved ±15%% "
                        "between runs on the H100)")
    p.add_argument("--attn-dropout", type=float, default=0.0,
                   help="dropout of the attention probabilities in training (GPT-2's config has 0.1)")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    config = TINY if args.tiny else CPU_SMALL if args.cpu_small else GPTConfig()
    config = dataclasses.replace(config, attn_pdrop=args.attn_dropout)

    torch.manual_seed(0)
    state = {k: v.clone() for k, v in GPT(config).state_dict().items()}
    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, config.vocab_size, (8, args.batch, config.block_size + 1), generator=generator)
    batches = [(t[:, :-1].contiguous().to(args.device), t[:, 1:].contiguous().to(args.device)) for t in tokens]

    rows = []
    for variant in args.variants:
        try:
            rows.append(run_variant(variant, config, args, state, batches))
        except Exception as e:  # noqa: BLE001 - reported in the table
            rows.append({"variant": variant, "error": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"})
            print(rows[-1], flush=True)

    base = next((r for r in rows if r["variant"] == "eager" and "error" not in r), None)
    lines = ["| variant | tokens/s | step ms | blocks' range ms | vs eager | first step s | max loss diff vs eager "
             f"(first {args.loss_steps} steps) | loss at step {args.loss_steps} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | | | |")
            continue
        ratio = f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-"
        diff = max(abs(a - b) for a, b in zip(r["losses"], base["losses"], strict=True)) if base else float("nan")
        lines.append(f"| {r['variant']} | {r['tokens_per_s']:.0f} | {r['step_ms']:.1f} | "
                     f"{min(r['block_ms']):.1f}–{max(r['block_ms']):.1f} | {ratio} | "
                     f"{r['first_step_s']:.1f} | {diff:.3f} | {r['losses'][-1]:.3f} |")
    device = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    name = ("tiny GPT (2 layers, 128 tokens)" if args.tiny else "small GPT (2 layers, width 256, 512 tokens)"
            if args.cpu_small else "GPT-2 small (124M), seq 1024")
    precision = "bf16 autocast" if args.precision == "bf16" else "fp32"
    text = (f"# {'Inference (forward, no gradients)' if args.inference else 'Training step'}, {name}, {device}, "
            f"{time.strftime('%Y-%m-%d')}\n\n"
            f"Batch {args.batch}, {precision}, AdamW, synthetic tokens, attention dropout {args.attn_dropout}; timed in {args.blocks} blocks of "
            f"{args.steps} steps after {args.loss_steps + args.warmup} (step ms: the median block). torch {torch.__version__}. `python benchmarks/train_gpt2.py`\n\n"
            + "\n".join(lines))
    print("\n" + text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": device, "config": name, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
