"""GPU attention: flashmlir per target vs torch SDPA's flash / cuDNN / efficient backends vs IREE stock.

    python benchmarks/attention.py                          # the full grid on the GPU it finds
    python benchmarks/attention.py --quick                  # a few rows
    python benchmarks/attention.py --json out.json --markdown out.md

Grid: head dim 64/128/256 × seq 512…16k × causal or not × fp16/bf16, with B·S = 16k tokens and
H·D = 2048 (the FlashAttention papers' setting). flashmlir is called as users call it:
`torch.compile(backend="flashmlir")` with no options (`flashmlir-default`: on CUDA the library's
kernel inside Inductor's graph) or with a named target (`flashmlir-sm_90`, …: the graph compiled by
IREE, whose CUDA HAL synchronizes the host at each call). "IREE stock" is torch's SDPA graph compiled
by IREE for sm_80 without our passes. Times are GPU time per call over back-to-back calls (CUDA
events, best of 3 bursts after warm-up), as when a model queues its kernels; the host's own cost
per call is measured apart on a tiny problem and printed with the table. TFLOP/s counts
4·B·H·Sq·Sk·D (half for causal). The ratio column is the best flashmlir variant over the best SDPA
backend. Compiles happen first, in parallel worker processes that fill flashmlir's module cache.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import os
import statistics
import subprocess
import time
import types
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Config:
    head_dim: int
    seq: int
    causal: bool
    dtype: str

    @property
    def batch(self) -> int:
        return max(1, 16384 // self.seq)

    @property
    def heads(self) -> int:
        return 2048 // self.head_dim

    def flops(self) -> float:
        full = 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim
        return full / 2 if self.causal else full

    def inputs(self, device: str = "cuda"):
        shape = (self.batch, self.heads, self.seq, self.head_dim)
        return tuple(torch.randn(shape, device=device, dtype=DTYPES[self.dtype]) for _ in range(3))


def _sdpa(causal: bool):
    def attention(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return attention


def _flashmlir(config: Config, target: str):
    """`default` is what a user gets with no options (on CUDA: the library's kernel for the device
    inside Inductor's graph); a named target compiles the graph with IREE for that target."""
    options = {} if target == "default" else {"target": target}
    return torch.compile(_sdpa(config.causal), backend="flashmlir", options=options)


def _stock_vmfb(config: Config) -> bytes:
    """torch's SDPA as IREE compiles it for sm_80, without flashmlir's passes."""
    from iree.compiler import ir
    from torch.fx.experimental.proxy_tensor import make_fx

    from flashmlir.compiler import iree_driver
    from flashmlir.compiler.targets import get_target
    from flashmlir.frontend.fx_import import import_graph
    from flashmlir.passes.pass_manager import run_pipeline

    q, k, v = config.inputs("meta")
    # pre_dispatch keeps SDPA whole: IREE's torch frontend then emits its own attention op.
    graph = make_fx(lambda q, k, v: torch.ops.aten.scaled_dot_product_attention(q, k, v, is_causal=config.causal),
                    tracing_mode="fake", pre_dispatch=True)(q, k, v)
    target = get_target("sm_80")
    session = iree_driver.new_session(())
    module = import_graph(graph, session.context)
    with session.context, ir.Location.unknown():
        module.operation.attributes["hal.device.targets"] = ir.Attribute.parse(target.gpu.device_targets())
        # IREE 3.13's CUDA HAL cannot export its buffers to torch: write the result into ours.
        run_pipeline(module, "flashmlir-bind-result-storage")
    return iree_driver.compile_to_vmfb(session, module, ())


def _compile_job(job: tuple[Config, str]) -> tuple[Config, str, bytes | str]:
    """Worker: compile one (config, variant). flashmlir variants land in the module cache."""
    config, variant = job
    os.environ["FLASHMLIR_STRICT"] = "1"  # a fallback to eager is a failure here, with its reason
    torch._dynamo.reset()  # one code object, many shapes: stay under dynamo's recompile limit
    try:
        if variant == "iree-stock":
            return config, variant, _stock_vmfb(config)
        with torch.no_grad():
            _flashmlir(config, variant)(*config.inputs())
        torch.cuda.synchronize()
        return config, variant, b""
    except Exception as e:  # noqa: BLE001 - reported in the table
        return config, variant, f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"


def median_ms(fn, warmup: int, iters: int) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ~2 ms of GPU sleep ahead of a burst: longer than the host takes to issue 10 calls of any launch
# path here (a torch.compile'd call costs 70-110 µs of host, benchmarks/host_overhead.py).
QUEUE_SLEEP_CYCLES = 4_000_000


def burst_ms(fn, calls: int) -> float:
    """GPU time per call of `calls` back-to-back calls: the host's launch cost stays hidden, as it is
    when a model queues its kernels, so kernels of different launch paths compare fairly. The calls
    queue behind a sleeping kernel: timed from an idle GPU, the first call's host time counted,
    70-110 µs through torch.compile against ~30 µs for a direct launch, in a burst of ten ~130 µs
    calls at 512 tokens. A launch path that synchronizes (IREE's CUDA HAL) waits out the sleep and
    is timed as before."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(QUEUE_SLEEP_CYCLES)
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / calls


def interleaved_best_ms(calls: dict, warmup: int, iters: int, rounds: int) -> dict:
    """GPU ms per call of each of `calls` (label → fn), best of `rounds` bursts taken in turn: on a
    power-capped GPU the clock drifts, and interleaving spreads that drift over all columns. Each
    round starts one column later and opens with an untimed burst of the column that ends it: the
    first burst of a round ran up to 8% faster than the same kernel's later ones (H200, 16k
    tokens: h200-2026-12-02-sm90-tma.md), and with more columns than rounds rotation alone left
    the last columns (SDPA's, in the sweeps) never first."""
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    best = {}
    order = list(calls.items())
    for r in range(rounds):
        turn = order[r % len(order):] + order[:r % len(order)]
        if len(turn) > 1:
            burst_ms(turn[-1][1], iters)
        for label, fn in turn:
            best[label] = min(best.get(label, float("inf")), burst_ms(fn, iters))
    return best


def gpu_ms(fn, warmup: int, iters: int, rounds: int = 3) -> float:
    """Best of `rounds` bursts of `iters` back-to-back calls, after `warmup` calls."""
    return interleaved_best_ms({"fn": fn}, warmup, iters, rounds)["fn"]


def host_us(fn, calls: int = 200) -> float:
    """Host time per call on a problem too small to keep the GPU busy: the launch path's own cost."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


SDPA_BACKENDS = ("flash", "cudnn", "efficient")


def separate_masked_sdpa(*labels: str) -> dict:
    """label → a function `(q, k, v, mask) -> SDPA(q, k, v, attn_mask=mask)`, each with a code
    object of its own: Dynamo caches compiled code per code object, so routes that compiled one
    function (flashmlir, Inductor, flashmlir with an option patched) would all run whichever
    compiled last."""
    def sdpa(q, k, v, mask):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    return {label: types.FunctionType(sdpa.__code__.replace(co_name=f"sdpa_{i}"), sdpa.__globals__)
            for i, label in enumerate(labels)}


def variant_switches(variant: str) -> tuple[str, list[str], str]:
    """A sweep variant `TILES[:NAME=V,...]` as (TILES, nvcc -DFLASHMLIR_NAME=V flags, a file-name tag)."""
    tiles, _, rest = variant.partition(":")
    switches = [switch for switch in rest.split(",") if switch]
    return (tiles, [f"-DFLASHMLIR_{switch}" for switch in switches],
            "".join(f"_{switch.replace('=', '')}" for switch in switches))


def build_in_parallel(build, jobs: list[tuple], errors: tuple = (subprocess.CalledProcessError,)) -> list:
    """`build(*job)` for every job with nvcc runs side by side (the sweeps' variants), results in the
    jobs' order; a build that raised one of `errors` leaves the exception in its place."""
    def one(job):
        try:
            return build(*job)
        except errors as e:
            return e

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) - 1)) as pool:
        return list(pool.map(one, jobs))


def failure_text(e: Exception) -> str:
    """The last line of what a failed build or check said (nvcc's stderr, else the message)."""
    text = e.stderr if isinstance(e, subprocess.CalledProcessError) else str(e)
    return text.strip().splitlines()[-1][:160]


def _sdpa_backend(name: str):
    from torch.nn.attention import SDPBackend
    return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}[name]


def measure(config: Config, variants: list[str], stock: bytes | None, failed: dict, args) -> dict:
    from torch.nn.attention import sdpa_kernel

    from flashmlir.runtime.iree_module import IreeModule

    torch.manual_seed(0)
    q, k, v = config.inputs()
    row = {**asdict(config), "batch": config.batch, "heads": config.heads, "tflops": {}, "notes": {}}
    attention = _sdpa(config.causal)
    with torch.no_grad():
        ref = attention(q.float(), k.float(), v.float())
        for name in SDPA_BACKENDS:
            try:
                with sdpa_kernel(_sdpa_backend(name)):
                    ms = gpu_ms(lambda: attention(q, k, v), args.warmup, args.iters)
                row["tflops"][f"sdpa-{name}"] = config.flops() / ms / 1e9
            except RuntimeError as e:
                row["notes"][f"sdpa-{name}"] = str(e).splitlines()[0][:120]
        for variant in variants:
            label = f"flashmlir-{variant}"
            if (config, variant) in failed:
                row["notes"][label] = failed[(config, variant)]
                continue
            torch._dynamo.reset()
            fn = _flashmlir(config, variant)
            out = fn(q, k, v)
            err = ((out.float() - ref).norm() / ref.norm()).item()
            row["notes"][f"{label} rel.err"] = f"{err:.1e}"
            row["tflops"][label] = config.flops() / gpu_ms(lambda fn=fn: fn(q, k, v), args.warmup, args.iters) / 1e9
        if stock is not None:
            module, out = IreeModule(stock, "cuda"), torch.empty_like(q)
            row["tflops"]["iree-stock"] = config.flops() / gpu_ms(lambda: module(q, k, v, out), 1, 3, rounds=1) / 1e9
    return row


def dense_gemm_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    ms = gpu_ms(lambda: a @ b, 3, 10)
    return 2 * 8192**3 / ms / 1e9


def host_costs(targets: list[str]) -> str:
    """Host time per call of SDPA and of each flashmlir variant on a problem too small to hide it."""
    q, k, v = (torch.randn(1, 2, 128, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    tiny = Config(64, 128, False, "fp16")
    costs = {"sdpa (eager)": _sdpa(False)}
    costs.update({f"flashmlir-{t}": _flashmlir(tiny, t) for t in targets if t != "sm_70"})
    with torch.no_grad():
        return ", ".join(f"{label} {host_us(lambda fn=fn: fn(q, k, v)):.0f} µs" for label, fn in costs.items())


def table(rows: list[dict], columns: list[str], gemm: float) -> str:
    head = ("| hdim | seq | causal | dtype | " + " | ".join(columns)
            + " | best flashmlir / best SDPA | best flashmlir / cuDNN | best flashmlir / GEMM |")
    lines = [head, "|" + "---:|" * (len(columns) + 7)]
    for r in rows:
        t = r["tflops"]
        cells = [f"{t[c]:.0f}" if c in t else "-" for c in columns]
        ours = max((v for c, v in t.items() if c.startswith("flashmlir")), default=0.0)
        sdpa = max((v for c, v in t.items() if c.startswith("sdpa")), default=0.0)
        cudnn = t.get("sdpa-cudnn", 0.0)
        ratio = f"{ours / sdpa:.2f}x" if ours and sdpa else "-"
        vs_cudnn = f"{ours / cudnn:.2f}x" if ours and cudnn else "-"
        lines.append(f"| {r['head_dim']} | {r['seq']} | {'yes' if r['causal'] else 'no'} | {r['dtype']} | "
                     + " | ".join(cells) + f" | {ratio} | {vs_cudnn} | {ours / gemm:.0%} |")
    return "\n".join(lines)


def main() -> None:
    os.environ["FLASHMLIR_STRICT"] = "1"  # time only what flashmlir compiled, never an eager fallback
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--head-dims", type=int, nargs="+", default=[64, 128, 256])
    p.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--dtypes", nargs="+", default=["fp16", "bf16"], choices=list(DTYPES))
    p.add_argument("--targets", nargs="+", default=["default", "sm_90", "sm_80", "sm_70"],
                   help="default: no backend options (what users get); sm_XX: IREE code for that target")
    p.add_argument("--quick", action="store_true", help="hdim 128, seq 1k/8k, fp16")
    p.add_argument("--no-stock", action="store_true", help="leave out IREE's stock attention (slow to compile)")
    p.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json")
    p.add_argument("--markdown")
    args = p.parse_args()
    if args.quick:
        args.head_dims, args.seqs, args.dtypes = [128], [1024, 8192], ["fp16"]

    capability = torch.cuda.get_device_capability()
    targets = [t for t in args.targets if t == "default" or (int(t[3]), int(t[4])) <= capability]
    configs = [Config(d, s, c, t) for d in args.head_dims for s in args.seqs for c in (False, True) for t in args.dtypes]

    def variants_of(config: Config) -> list[str]:
        # Volta cannot be timed here (sm_70 PTX runs JIT-compiled on this GPU): one sanity dtype.
        return [t for t in targets if not (t == "sm_70" and config.dtype != "fp16")]

    jobs = [(c, v) for c in configs for v in variants_of(c)]
    if not args.no_stock:
        jobs += [(c, "iree-stock") for c in configs if c.dtype == "fp16"]
    start = time.perf_counter()
    stock: dict[Config, bytes] = {}
    failed: dict[tuple[Config, str], str] = {}
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(args.workers, mp_context=ctx) as pool:
        for config, variant, result in pool.map(_compile_job, jobs):
            if isinstance(result, str):
                failed[(config, variant)] = result
            elif variant == "iree-stock":
                stock[config] = result
    print(f"compiled {len(jobs)} variants in {time.perf_counter() - start:.0f} s "
          f"({args.workers} workers, {len(failed)} failed)", flush=True)
    for (config, variant), reason in failed.items():
        print(f"  failed: {variant} {config}: {reason}", flush=True)

    gemm = dense_gemm_tflops()
    host = host_costs(targets)
    rows = []
    for config in configs:
        rows.append(measure(config, variants_of(config), stock.get(config), failed, args))
        print(json.dumps(rows[-1]["tflops"], default=float), flush=True)

    name = torch.cuda.get_device_name()
    columns = [f"flashmlir-{t}" for t in targets] + ["iree-stock"] + [f"sdpa-{b}" for b in SDPA_BACKENDS]
    text = (f"# Attention forward, {name}, {time.strftime('%Y-%m-%d')}\n\n"
            f"TFLOP/s (B·S = 16k tokens, H·D = 2048). Dense bf16 GEMM 8192³ in the same run: {gemm:.0f} TFLOP/s. "
            f"torch {torch.__version__}. flashmlir-sm_70 is Volta code run through the driver's PTX JIT "
            "(a sanity figure, not Volta speed), fp16 only; iree-stock is fp16 only. GPU time per call over "
            f"back-to-back calls; host time per call (B=1 H=2 S=128 D=64): {host}.\n\n" + table(rows, columns, gemm))
    notes = [f"- {r['head_dim']}/{r['seq']}/{'causal' if r['causal'] else 'full'}/{r['dtype']} {k}: {v}"
             for r in rows for k, v in r["notes"].items() if "rel.err" not in k]
    if notes:
        text += "\n\nNot run:\n" + "\n".join(notes)
    errors = [float(v) for r in rows for k, v in r["notes"].items() if "rel.err" in k]
    if errors:
        text += f"\n\nLargest relative error of a flashmlir output vs torch in fp32: {max(errors):.1e}"
    print("\n" + text)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(text + "\n")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"gpu": name, "gemm_tflops": gemm, "rows": rows}, f, indent=1, default=float)


if __name__ == "__main__":
    main()
