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
FlashAttention-3 does to halve the L2 traffic of short sequences); before it, a cluster kernel that
only reads its rank. Each case runs in a child process, as a fault leaves the CUDA context unusable
for whatever follows it. Timing is not its business: the kernels' A/B comes after.
"""

from __future__ import annotations

import argparse
import ctypes
import json
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


MAPS = {"host": "host (cuTensorMapEncodeTiled)", "template": "device, from a host template",
        "scratch3": "device, from scratch, rank field 3", "scratch2": "device, from scratch, rank field 2"}
CASES = [*(f"load:{m}" for m in MAPS), "cluster:ranks", "cluster:multicast"]


def run_case(case: str, cubin: Path) -> dict:
    """One case in this process (its CUDA context is lost if the case faults): a dict of results."""
    image = cubin.read_bytes()
    torch.manual_seed(0)
    tensor = torch.randn(PLANES, ROWS, COLS, dtype=torch.float16, device="cuda")
    reference = host_map(tensor)
    want = expected_box(tensor)
    ranks = torch.full((4,), 99, dtype=torch.int32, device="cuda")
    if case == "cluster:ranks":
        CudaKernel(image, "probe_cluster_ranks").launch((2, 1, 1), (128, 1, 1), 0, [ranks.data_ptr()])
        torch.cuda.synchronize()
        return {"ranks": ranks.tolist()}
    if case == "cluster:multicast":
        host = torch.tensor(list(reference), dtype=torch.uint8, device="cuda")
        out = torch.zeros(2 * len(want), dtype=torch.uint8, device="cuda")
        status = torch.zeros(2, dtype=torch.int32, device="cuda")
        CudaKernel(image, "probe_tma_multicast").launch(
            (2, 1, 1), (128, 1, 1), len(want) + 1024,
            [host.data_ptr(), out.data_ptr(), status.data_ptr(), ranks.data_ptr(), *AT, len(want)])
        torch.cuda.synchronize()
        boxes = bytes(out.cpu().tolist())
        return {"ranks": ranks.tolist(), "landed": status.tolist(),
                "match": boxes[:len(want)] == want and boxes[len(want):] == want}
    which = case.split(":")[1]
    if which == "host":
        m = torch.tensor(list(reference), dtype=torch.uint8, device="cuda")
    else:
        # A template as a compiler could make it once: another address and other lengths, same box and modes.
        dummy = torch.zeros(1, 64, 64, dtype=torch.float16, device="cuda")
        template = torch.tensor(list(host_map(dummy)), dtype=torch.uint8, device="cuda")
        m = torch.zeros(256, dtype=torch.uint8, device="cuda")[:128]  # torch's allocations are 256-aligned
        rank_value = {"template": 0, "scratch3": 3, "scratch2": 2}[which]
        CudaKernel(image, "probe_make_map").launch(
            (1, 1, 1), (32, 1, 1), 0,
            [m.data_ptr(), template.data_ptr() if which == "template" else 0, tensor.data_ptr(),
             COLS, ROWS, PLANES, BOX_COLS, BOX_ROWS, rank_value])
        torch.cuda.synchronize()
    got = bytes(m.cpu().tolist())
    out = torch.zeros(BOX_ROWS * BOX_COLS * 2, dtype=torch.uint8, device="cuda")
    status = torch.zeros(1, dtype=torch.int32, device="cuda")
    result = {"bytes": differing_bytes(got, reference), "map": got.hex()}
    CudaKernel(image, "probe_tma_load").launch((1, 1, 1), (128, 1, 1), len(want) + 1024,
                                               [m.data_ptr(), out.data_ptr(), status.data_ptr(), *AT, len(want)])
    torch.cuda.synchronize()
    result["landed"] = bool(status.item())
    result["match"] = result["landed"] and bytes(out.cpu().tolist()) == want
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--markdown")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--cubin", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not torch.cuda.is_available() or torch.cuda.get_device_capability() < (9, 0):
        sys.exit("tma_probe: needs an sm_90 GPU")
    if args.case:
        print(json.dumps(run_case(args.case, args.cubin)))
        return
    cubin = Path(tempfile.mkdtemp(prefix="flashmlir-tma-")) / "tma_probe.cubin"
    subprocess.run(["nvcc", "--cubin", "-O3", "-std=c++17", "-gencode=arch=compute_90a,code=sm_90a", str(SOURCE),
                    "-o", str(cubin)], check=True)
    results = {}
    for case in CASES:  # each in a process of its own: a fault makes a CUDA context unusable
        done = subprocess.run([sys.executable, __file__, "--case", case, "--cubin", str(cubin)],
                              capture_output=True, text=True, timeout=120)
        lines = done.stdout.strip().splitlines()
        if done.returncode == 0 and lines:
            results[case] = json.loads(lines[-1])
        else:
            error = [line for line in done.stderr.splitlines() if "CUDA error" in line or line.startswith("RuntimeError")]
            results[case] = {"failed": (error[-1] if error else f"exit {done.returncode}")[:120]}
        print(case, {k: v for k, v in results[case].items() if k != "map"}, flush=True)

    lines = ["| map | bytes vs the host's | load landed | box matches the kernels' layout |", "|---|---|---|---|"]
    for key, label in MAPS.items():
        r = results[f"load:{key}"]
        if "failed" in r:
            lines.append(f"| {label} | - | failed: {r['failed']} | - |")
        else:
            lines.append(f"| {label} | {r['bytes']} | {'yes' if r['landed'] else 'no'} | "
                         f"{'yes' if r['match'] else 'no'} |")
    lines += ["", "| two-block cluster, cuLaunchKernel | (rank, cluster size) of blocks 0, 1 | landed in | "
              "both boxes match |", "|---|---|---|---|"]
    for case, label in (("cluster:ranks", "ranks only"), ("cluster:multicast", "multicast of the host map's box")):
        r = results[case]
        if "failed" in r:
            lines.append(f"| {label} | failed: {r['failed']} | - | - |")
            continue
        ranks = r["ranks"]
        landed = ", ".join(f"block {b}" for b, ok in enumerate(r.get("landed", [])) if ok) or "neither"
        lines.append(f"| {label} | {tuple(ranks[:2])}, {tuple(ranks[2:])} | "
                     f"{landed if 'landed' in r else '-'} | {('yes' if r['match'] else 'no') if 'match' in r else '-'} |")
    maps = "\n".join(f"- {MAPS[c.split(':')[1]]}: `{r['map']}`" for c, r in results.items() if "map" in r)
    text = (f"# TMA from a device-made tensor map, {torch.cuda.get_device_name()}\n\n"
            "`python benchmarks/tma_probe.py`: a [3, 130, 128] fp16 tensor, boxes of 64 × 64 with the 128-byte "
            "swizzle, the box at cols 64, rows 100 (30 past the end: zero), plane 1. Each case runs in a "
            "process of its own (a fault is fatal to a CUDA context).\n\n" + "\n".join(lines)
            + "\n\nThe maps' bytes:\n" + maps)
    print(text)
    if args.markdown:
        Path(args.markdown).write_text(text + "\n")


if __name__ == "__main__":
    main()
