"""The microkernel library as the compiler sees it: which kernels exist, their tiles, their objects.

The library is built by CMake from runtime/microkernels/ when flashmlir is installed and lands in
the package (flashmlir/microkernels/): `kernels.json`, the catalog that also drove the build, and
one CUDA fatbin per kernel under cuda/. Launch geometry is derived from the catalog entry, so it
always matches the compiled tile sizes. FLASHMLIR_MICROKERNEL_DIR points elsewhere (tests, a
library built by hand).

Selection answers with a kernel or with the reason there is none, which the dispatch pass turns
into a decline (the op then goes to IREE's own codegen, and `flashmlir-opt --debug` says why).
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from flashmlir import config

CATALOG = "kernels.json"
ELEMENT_BYTES = {"f16": 2, "bf16": 2}


@dataclass(frozen=True)
class AttentionKernel:
    """One forward attention kernel: an (element type, head dim) instance with its tile sizes."""

    family: str  # "attention_fwd_sm80"
    element: str  # "f16" | "bf16"
    head_dim: int
    block_m: int  # query rows per workgroup
    block_n: int  # keys per KV tile
    warps: int
    min_arch: str  # "sm_80": runs there and on every newer architecture
    object_path: Path

    @property
    def name(self) -> str:
        """The exported symbol; the lse variant appends `_lse`."""
        return f"flashmlir_{self.family}_{self.element}_d{self.head_dim}"

    @property
    def threads(self) -> int:
        return self.warps * 32

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory: the Q tile and two stages of (K, V) tiles (fwd_sm80_mma_sync.cuh)."""
        return (self.block_m + 4 * self.block_n) * self.head_dim * ELEMENT_BYTES[self.element]

    def grid(self, seq_q: int, batch_heads: int) -> tuple[int, int, int]:
        return (-(-seq_q // self.block_m), batch_heads, 1)


def _arch_number(arch: str) -> int:
    return int(arch.removeprefix("sm_").rstrip("a"))


def library_dir() -> Path | None:
    """Where the installed library is: FLASHMLIR_MICROKERNEL_DIR, else inside the package."""
    override = config.microkernel_dir()
    if override is not None:
        return override
    import flashmlir

    for base in flashmlir.__path__:  # an editable install lists the build's install dir here too
        candidate = Path(base) / "microkernels"
        if (candidate / CATALOG).is_file():
            return candidate
    return None


@functools.cache
def _load(directory: Path | None) -> tuple[AttentionKernel, ...]:
    if directory is None or not (directory / CATALOG).is_file():
        return ()
    entries = json.loads((directory / CATALOG).read_text())["cuda"]
    kernels = []
    for e in entries:
        stem = f"{e['family']}_{e['element']}_d{e['head_dim']}"
        kernels.append(AttentionKernel(
            e["family"], e["element"], e["head_dim"], e["block_m"], e["block_n"], e["warps"], e["min_arch"],
            directory / "cuda" / f"{stem}.fatbin"))
    return tuple(kernels)


def attention_kernels() -> tuple[AttentionKernel, ...]:
    return _load(library_dir())


class NoKernel(Exception):
    """No microkernel serves this attention; the message says why."""


def select_attention_forward(arch: str, element: str, head_dim: int) -> AttentionKernel:
    """The kernel for `arch` (the target's), or NoKernel with the reason."""
    kernels = attention_kernels()
    if not kernels:
        raise NoKernel("the microkernel library is not installed (no kernels.json next to the package)")
    runnable = [k for k in kernels if _arch_number(k.min_arch) <= _arch_number(arch)]
    if not runnable:
        raise NoKernel(f"no attention microkernel for {arch} yet")
    matching = [k for k in runnable if k.element == element and k.head_dim == head_dim]
    if not matching:
        have = sorted({(k.element, k.head_dim) for k in runnable})
        offer = ", ".join(f"{e} d{d}" for e, d in have)
        raise NoKernel(f"no {arch} attention microkernel for {element} head dim {head_dim} (have: {offer})")
    # The newest family the target can run.
    kernel = max(matching, key=lambda k: _arch_number(k.min_arch))
    if not kernel.object_path.is_file():
        raise NoKernel(f"microkernel {kernel.name} was not built ({kernel.object_path} is missing: nvcc was "
                       "not found when flashmlir was installed; put nvcc on PATH and reinstall)")
    return kernel


def library_problem() -> str | None:
    """Why no microkernel can be used at all (library missing or built without nvcc), else None."""
    kernels = attention_kernels()
    if not kernels:
        return "the CUDA microkernel library is not installed"
    if not any(k.object_path.is_file() for k in kernels):
        return ("the CUDA microkernels were not built (nvcc was not found when flashmlir was installed; put nvcc "
                "on PATH or set CUDA_HOME, then reinstall)")
    return None


def fingerprint() -> str:
    """A hash of the catalog and every built object: compiled modules embed them, the cache keys on it."""
    directory = library_dir()
    digest = hashlib.sha256()
    for kernel in attention_kernels():
        digest.update(kernel.name.encode())
        if kernel.object_path.is_file():
            digest.update(kernel.object_path.read_bytes())
    if directory is not None and (directory / CATALOG).is_file():
        digest.update((directory / CATALOG).read_bytes())
    return digest.hexdigest()[:16]
