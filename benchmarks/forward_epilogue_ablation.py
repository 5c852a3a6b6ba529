"""What O's stores cost the sm_90 forward at short sequences, with everything else kept, and what
the consumers' proxy fences cost. Timing only: the patched variants write no O, or read K and V
without the fence the memory model asks for.

    python benchmarks/forward_epilogue_ablation.py                     # head dims 64 and 128, 512-4k
    python benchmarks/forward_epilogue_ablation.py --head-dims 128 --seqs 512 1024

Writes a patched copy of runtime/microkernels/attention with a timing switch and runs
benchmarks/microkernel_sweep.py on it (any further arguments go to it), variants `n128s2` (the
kernel as it is), `n128s2:X_NO_STORE=1`: O's stores behind a test that is false at run time
(seq_q < 0) but that the compilers cannot decide, so that all the work that feeds them stays;
`n128s2:X_NO_FENCE=1`: no `fence.proxy.async` before the consumers' wgmmas (ptxas makes it a
MEMBAR.ALL.CTA, which might have waited for the query block's O stores before the next one's first
product: on an H200 it did not, benchmarks/results/h200-2026-12-02-sm90-forward-ablation.md); and both.
Simply deleting the stores does not measure them: ptxas then drops, as dead code, everything only
they used — P·V's wgmmas, P's packing, O's rescales (the SASS of such a build has 28 of its 56
HGMMAs left) — which is what the first "stores skipped" column of
benchmarks/results/h200-2026-12-01-sm90-forward-output-path.md measured.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

SOURCES = Path(__file__).parents[1] / "runtime" / "microkernels" / "attention"
KERNEL = "fwd_sm90_wgmma.cuh"
# (anchor, replacement): each anchor must occur once, so that a change to the kernel fails here loudly.
PATCHES = (
    ("#pragma once\n", "#pragma once\n#ifndef FLASHMLIR_X_NO_STORE\n#define FLASHMLIR_X_NO_STORE 0\n#endif\n"
                        "#ifndef FLASHMLIR_X_NO_FENCE\n#define FLASHMLIR_X_NO_FENCE 0\n#endif\n"),
    ("        *reinterpret_cast<uint32_t*>(out + c * 8) =",
     "        if (!FLASHMLIR_X_NO_STORE || seq_q < 0) *reinterpret_cast<uint32_t*>(out + c * 8) ="),
    ('__device__ __forceinline__ void fence_proxy_async() { asm volatile(',
     '__device__ __forceinline__ void fence_proxy_async() { if (!FLASHMLIR_X_NO_FENCE) asm volatile('),
)
VARIANTS = ("n128s2", "n128s2:X_NO_STORE=1", "n128s2:X_NO_FENCE=1", "n128s2:X_NO_STORE=1,X_NO_FENCE=1")


def patched_copy(into: Path) -> Path:
    """The kernels' folder with the timing switches added to the forward; raises if an anchor moved."""
    into.mkdir(parents=True, exist_ok=True)
    for f in SOURCES.iterdir():
        if f.is_file():
            (into / f.name).write_text(f.read_text())
    text = (into / KERNEL).read_text()
    for anchor, replacement in PATCHES:
        if text.count(anchor) != 1:
            raise SystemExit(f"forward_epilogue_ablation: {KERNEL} no longer has exactly one {anchor.strip()!r}")
        text = text.replace(anchor, replacement)
    (into / KERNEL).write_text(text)
    return into


def main() -> None:
    sources = patched_copy(Path(tempfile.mkdtemp(prefix="flashmlir-ablation-")))
    extra = sys.argv[1:] or ["--head-dims", "64", "128", "--seqs", "512", "1024", "2048", "4096"]
    command = [sys.executable, str(Path(__file__).parent / "microkernel_sweep.py"), "--family", "sm90",
               "--sources", str(sources), "--variants", *VARIANTS, *extra]
    sys.exit(subprocess.call(command))


if __name__ == "__main__":
    main()
