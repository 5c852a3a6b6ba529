"""Whether the sm_90 kernels could load through TMA under IREE's launch ABI: a tensor map made on the
device (from scratch, or patched from a host-made template), checked byte for byte against the host
encoder's and by a TMA load into the 128-byte-swizzled layout the kernels read. Needs an sm_90 GPU.

    python benchmarks/tma_probe.py [--markdown FILE]

IREE passes our kernels buffer pointers and 32-bit constants, so a map holding the operands'
addresses must be made or finished on the device (issue 8's hazard); benchmarks/tma_probe.cu says
how. Prints, per map: its bytes against cuTensorMapEncodeTiled's for the same tensor, and whether a
load of a 64 × 64 box at (cols 64.., rows 100.., plane 1) of a [3, 130, 128] fp16 tensor landed
within a bound and matches the swizzled layout (row r's 16-byte chunk c at c ^ (r % 8); rows past
130 zero). Then the same box multicast to both blocks of a two-block cluster whose size is compiled
into the kernel (`__cluster_dims__`), launched with plain cuLaunchKernel as IREE launches: whether
IREE's launch path makes clusters at all, and whether one load can feed two query blocks' K/V (what
FlashAttention-3 does to halve the L2 traffic of short sequences). Timing is not its business: the
kernels' A/B would come after.
"""

from __future__ import annotations

import argparse
import ctypes
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from flashmlir.runtime.cuda_launcher import CudaKernel, _check, _driver

SOURCE = Path(__file__).with_suffix(".cu")
PLANES, ROWS, COLS = 3, 130, 128
BOX_COLS, BOX_ROWS = 64, 64
AT = (64, 100, 1)  # col0, row0, plane0 of the box loaded
FLOAT16, SWIZZLE_128B = 6, 3  # CUtensorMapDataType, CUtensorMapSwizzle


def host_map(tensor: torch.Tensor) -> bytes:
    """cuTensorMapEncodeTiled's map of `tensor` ([planes, rows, cols] fp16), boxes BOX_COLS × BOX_ROWS."""
    planes, rows, cols = tensor.shape
    storage = ctypes.create_string_buffer(256)
    aligned = (ctypes.addressof(storage) + 127) // 128 * 128  # the map wants 64-byte alignment
    u64, u32 = ctypes.c_uint64, ctypes.c_uint32
    dims = (u64 * 3)(cols, rows, planes)
    strides = (u64 * 2)(cols * 2, cols * rows * 2)
    box = (u32 * 3)(BOX_COLS, BOX_ROWS, 1)
    element_strides = (u32 * 3)(1, 1, 1)
    encode = _driver().cuTensorMapEncodeTiled
    encode.argtypes = [ctypes.c_void_p, ctypes.c_int, u32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                       ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    _check(encode(aligned, FLOAT16, 3, tensor.data_ptr(), dims, strides, box, element_strides, 0, SWIZZLE_128B, 0, 0),
           "cuTensorMapEncodeTiled")
    return ctypes.string_at(aligned, 128)


def expected_box(tensor: torch.Tensor) -> bytes:
    """The box as the kernels' layout has it: row r's 16-byte chunk c at chunk c ^ (r % 8)."""
    col0, row0, plane0 = AT
    rows = torch.zeros(BOX_ROWS, BOX_COLS, dtype=torch.float16)
    valid = min(BOX_ROWS, ROWS - row0)
    rows[:valid] = tensor[plane0, row0:row0 + valid, col0:col0 + BOX_COLS].cpu()
    chunks = rows.view(BOX_ROWS, 8, 8)  # [row, chunk, 8 elements]
    out = torch.empty_like(chunks)
    for r in range(BOX_ROWS):
        for c in range(8):
            out[r, c ^ (r % 8)] = chunks[r, c]
    return out.contiguous().view(torch.uint8).numpy().tobytes()


def differing_bytes(a: bytes, b: bytes) -> str:
    diff = [i for i in range(128) if a[i] != b[i]]
    return "identical" if not diff else f"{len(diff)} bytes differ (at {diff[:12]}{'…' if len(diff) > 12 else ''})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown")
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("tma_probe: needs an sm_90 GPU")
    cubin = Path(tempfile.mkdtemp(prefix="flashmlir-tma-")) / "tma_probe.cubin"
    subprocess.run(["nvcc", "--cubin", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", str(SOURCE),
                    "-o", str(cubin)], check=True)
    image = cubin.read_bytes()
    make_map, tma_load = CudaKernel(image, "probe_make_map"), CudaKernel(image, "probe_tma_load")
    multicast = CudaKernel(image, "probe_tma_multicast")

    torch.manual_seed(0)
    tensor = torch.randn(PLANES, ROWS, COLS, dtype=torch.float16, device="cuda")
    reference = host_map(tensor)
    # A template as a compiler could make it once: another address and other lengths, same box and modes.
    dummy = torch.zeros(1, 64, 64, dtype=torch.float16, device="cuda")
    template = torch.tensor(list(host_map(dummy)), dtype=torch.uint8, device="cuda")

    def device_map(from_template: bool, rank_value: int) -> torch.Tensor:
        out = torch.zeros(256, dtype=torch.uint8, device="cuda")[:128]  # torch's allocations are 256-aligned
        words = [out.data_ptr(), template.data_ptr() if from_template else 0, tensor.data_ptr(),
                 COLS, ROWS, PLANES, BOX_COLS, BOX_ROWS, rank_value]
        make_map.launch((1, 1, 1), (32, 1, 1), 0, words)
        torch.cuda.synchronize()
        return out

    maps = {"host (cuTensorMapEncodeTiled)": torch.tensor(list(reference), dtype=torch.uint8, device="cuda"),
            "device, from a host template": device_map(True, 0),
            "device, from scratch, rank field 3": device_map(False, 3),
            "device, from scratch, rank field 2": device_map(False, 2)}
    want = expected_box(tensor)

    # The host map first (a bad map can fault the context for everything after it).
    out = torch.zeros(2 * len(want), dtype=torch.uint8, device="cuda")
    status = torch.zeros(2, dtype=torch.int32, device="cuda")
    ranks = torch.full((4,), 99, dtype=torch.int32, device="cuda")
    cluster = ["| two-block cluster, cuLaunchKernel | (rank, cluster size) of blocks 0, 1 | landed in | both boxes match |",
               "|---|---|---|---|"]
    try:
        multicast.launch((2, 1, 1), (128, 1, 1), len(want) + 1024,
                         [maps["host (cuTensorMapEncodeTiled)"].data_ptr(), out.data_ptr(), status.data_ptr(),
                          ranks.data_ptr(), *AT, len(want)])
        torch.cuda.synchronize()
    except RuntimeError as e:  # the launch refused or faulted: say so, keep the table
        cluster.append(f"| multicast of the host map's box | failed: {str(e)[:100]} | - | - |")
    else:
        boxes = bytes(out.cpu().tolist())
        cluster.append(f"| multicast of the host map's box | {tuple(ranks[:2].tolist())}, {tuple(ranks[2:].tolist())} | "
                       f"{', '.join(f'block {b}' for b in range(2) if status[b].item()) or 'neither'} | "
                       f"{'yes' if boxes[:len(want)] == want and boxes[len(want):] == want else 'no'} |")

    lines = ["| map | bytes vs the host's | load landed | box matches the kernels' layout |", "|---|---|---|---|"]
    for label, m in maps.items():
        got = bytes(m.cpu().tolist())
        out = torch.zeros(BOX_ROWS * BOX_COLS * 2, dtype=torch.uint8, device="cuda")
        status = torch.zeros(1, dtype=torch.int32, device="cuda")
        try:
            tma_load.launch((1, 1, 1), (128, 1, 1), len(want) + 1024,
                            [m.data_ptr(), out.data_ptr(), status.data_ptr(), *AT, len(want)])
            torch.cuda.synchronize()
        except RuntimeError as e:
            lines.append(f"| {label} | {differing_bytes(got, reference)} | failed: {str(e)[:80]} | - |")
            continue
        landed = bool(status.item())
        matches = landed and bytes(out.cpu().tolist()) == want
        lines.append(f"| {label} | {differing_bytes(got, reference)} | {'yes' if landed else 'no'} | "
                     f"{'yes' if matches else 'no'} |")
    lines += [""] + cluster
    text = (f"# TMA from a device-made tensor map, {torch.cuda.get_device_name()}\n\n"
            "`python benchmarks/tma_probe.py`: a [3, 130, 128] fp16 tensor, boxes of 64 × 64 with the 128-byte "
            "swizzle, the box at cols 64, rows 100 (30 past the end: zero), plane 1.\n\n" + "\n".join(lines))
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
