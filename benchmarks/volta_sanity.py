"""The Volta (sm_70) kernel's speed on whatever GPU this is, beside the sm_80 kernel: a sanity figure.

    python benchmarks/volta_sanity.py

On an H100 the Volta kernel is compute_70 PTX JIT-compiled for sm_90: WMMA through shared memory on
a GPU it was not written for. Its speed here says nothing about a V100's; it shows the kernel is
not pathologically slow and runs at full size.
"""

import torch

from flashmlir.compiler import microkernels
from flashmlir.runtime.cuda_launcher import attention_forward


def tflops(kernel, b, h, s, d, causal) -> float:
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
    attention_forward(kernel, q, k, v, causal=causal)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        attention_forward(kernel, q, k, v, causal=causal)
    end.record()
    torch.cuda.synchronize()
    flops = 4 * b * h * s * s * d / (2 if causal else 1)
    return flops * 10 / (start.elapsed_time(end) * 1e-3) / 1e12


def main() -> None:
    print(f"# Volta kernel sanity figure on {torch.cuda.get_device_name()} (fp16, B=2 H=16, TFLOP/s)\n")
    print("| hdim | seq | causal | sm_70 kernel (PTX JIT) | sm_80 kernel |")
    print("|---:|---:|:---:|---:|---:|")
    for d in (64, 128):
        volta = microkernels.select_attention_forward("sm_70", "f16", d)
        ampere = microkernels.select_attention_forward("sm_80", "f16", d)
        for s in (1024, 4096):
            for causal in (False, True):
                print(f"| {d} | {s} | {'yes' if causal else 'no'} | {tflops(volta, 2, 16, s, d, causal):.0f} | "
                      f"{tflops(ampere, 2, 16, s, d, causal):.0f} |", flush=True)


if __name__ == "__main__":
    main()
