"""The microkernel library as the compiler sees it: which kernels exist, their tiles, their objects.

The library is built by CMake from runtime/microkernels/ when flashmlir is installed and lands in
the package (flashmlir/microkernels/): `kernels.json`, the catalog that also drove the build, one
CUDA fatbin per kernel under cuda/ and one CPU object per instruction set under cpu/. Launch
geometry is derived from the catalog entry, so it always matches the compiled tile sizes.
FLASHMLIR_MICROKERNEL_DIR points elsewhere (tests, a library built by hand).

Selection answers with a kernel or with the reason there is none, which the dispatch pass turns
into a decline (the op then goes to IREE's own codegen, and `flashmlir-opt --debug` says why).
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

from flashmlir import config

CATALOG = "kernels.json"
CPU_TILE_KEYS = ("row_vectors", "key_tile", "dim_tile", "keys", "stream_rows")  # as CMakeLists.txt passes them
ELEMENT_BYTES = {"f16": 2, "bf16": 2}
TENSOR_MAP_BYTES = 128  # a TMA tensor map (CUtensorMap), 128-aligned


def tma_workspace_bytes(maps: int, workgroups: int) -> int:
    """The workspace binding of a kernel whose workgroups each make `maps` tensor maps on the device
    (tma_sm90.cuh block_tensor_maps): theirs, and room to align them, as a binding's offset in IREE's
    buffers need not be."""
    return maps * TENSOR_MAP_BYTES * workgroups + TENSOR_MAP_BYTES

# Up to this many query blocks (4k rows) the sm_90 grid is persistent, one workgroup per SM taking
# tiles in turn: no cold start per tile (+2-16% at 512-4k tokens). Beyond it a workgroup per tile
# measured as fast or faster for the cp.async kernels (the hardware's dynamic scheduling evens out
# SMs of different speed, which a static share cannot): h100-2026-11-24-sm90-persistent.md. A TMA
# kernel is persistent at every length: its workgroups make their tensor maps once, not per tile,
# and it gained 2-10% at 8k-16k so (h200-2026-12-02-sm90-tma.md).
PERSISTENT_MAX_Q_BLOCKS = 32


def length_tag(min_seq: int) -> str:
    """`_from<min_seq>` for a tiling meant for long sequences, as CMakeLists.txt names its object and
    -DFLASHMLIR_NAME_TAG its symbols; nothing for the tiling that serves any length."""
    return f"_from{min_seq}" if min_seq else ""


@dataclass(frozen=True)
class CudaAttentionKernel:
    """One CUDA forward attention kernel: an (element type, head dim) instance with its tile sizes."""

    family: str  # "attention_fwd_sm90" | "attention_fwd_sm80" | "attention_fwd_sm70"
    element: str  # "f16" | "bf16"
    head_dim: int
    block_m: int  # query rows per workgroup
    block_n: int  # keys per KV tile
    warps: int
    min_arch: str  # "sm_80": runs there and on every newer architecture; "sm_90a": on sm_90 only
    object_path: Path
    stages: int = 2  # shared-memory stages of K and V (sm_90: a ring; sm_80: double buffering)
    pingpong: bool = False  # sm_90: the two consumer warpgroups take turns at the tensor cores
    # The entry serves problems whose query and key lengths are both at least this (0: any). An
    # (element, head dim) may have several such tilings; select_attention_forward takes the one
    # with the largest min_seq the problem reaches.
    min_seq: int = 0
    # Causal problems take the entry from this length instead (0: min_seq): a causal query block's
    # work is shorter and more uneven, so a larger tiling pays off later.
    min_seq_causal: int = 0
    # sm_90: the producer loads through TMA, from tensor maps each workgroup makes on the device in a
    # workspace binding after the outputs (`workspace_bytes`).
    tma: bool = False
    # With `tma`: O leaves through the copy engine too, from a shared tile per consumer warpgroup.
    tma_store: bool = False
    # sm_90: a build whose Sm90Config::kPersistent was set by -DFLASHMLIR_PERSISTENT (benchmarks'
    # A/Bs; the catalog's entries leave it None: `persistent` follows the head dim).
    persistent_override: bool | None = None

    @property
    def tag(self) -> str:
        """What tells this tiling apart in file and symbol names: `_from<min_seq>`, or nothing."""
        return length_tag(self.min_seq)

    def serves_from(self, causal: bool) -> int:
        """The length both of a problem's sequences must reach for this entry to serve it."""
        return self.min_seq_causal if causal and self.min_seq_causal else self.min_seq

    @property
    def name(self) -> str:
        """The exported symbol; the lse variant appends `_lse`."""
        return f"flashmlir_{self.family}_{self.element}_d{self.head_dim}{self.tag}"

    @property
    def threads(self) -> int:
        return self.warps * 32

    @property
    def dropout(self) -> bool:
        """Whether the image also exports `<name>_lse_dropout` (fwd_sm90_kernels.cu,
        fwd_sm80_kernels.cu), the training forward that drops P by the seeded hash of dropout.cuh."""
        return self.family in ("attention_fwd_sm90", "attention_fwd_sm80")

    @property
    def shared_bytes(self) -> int:
        """Dynamic shared memory, as the family's source lays it out."""
        e = ELEMENT_BYTES[self.element]
        if self.family == "attention_fwd_sm70":
            # fwd_sm70_wmma.cu `Shared`: Q, K, V tiles with rows padded by 8 elements; per warp an
            # fp32 S tile (row pad 4), an fp16 P tile (row pad 8) and 16 row factors.
            tiles = (self.block_m + 2 * self.block_n) * (self.head_dim + 8) * e
            per_warp = 16 * ((self.block_n + 4) * 4 + (self.block_n + 8) * 2 + 4)
            return tiles + self.warps * per_warp
        if self.family == "attention_fwd_sm90":
            # fwd_sm90_wgmma.cuh `Sm90Config`: Q, `stages` K and V tiles, 8-byte mbarriers (Q full and
            # empty; K, V full and empty per stage), and 1024 bytes to align the tiles to the swizzle period.
            tiles = (self.block_m + 2 * self.stages * self.block_n) * self.head_dim * e
            maps = self.tensor_maps * TENSOR_MAP_BYTES  # with `tma`: where the maps are made
            # A 64-row O tile a consumer; where a workgroup takes one query block, its rows of Q instead.
            o_tiles = self.block_m * self.head_dim * e if self.tma_store and self.persistent else 0
            return tiles + o_tiles + maps + 8 * (2 + 4 * self.stages) + 1024
        # fwd_sm80_mma_sync.cuh: the Q tile and two stages of (K, V) tiles.
        return (self.block_m + 4 * self.block_n) * self.head_dim * e

    @property
    def persistent(self) -> bool:
        """Whether a workgroup can take tiles one after another (the sm_90 kernel below head dim 256:
        `Sm90Config::kPersistent`, unless `persistent_override` says otherwise, as a build with
        -DFLASHMLIR_PERSISTENT does); `grid` decides whether it does."""
        if self.persistent_override is not None:
            return self.persistent_override
        return self.family == "attention_fwd_sm90" and self.head_dim < 256

    @property
    def tensor_maps(self) -> int:
        """Tensor maps a workgroup makes: Q, K, V with `tma`, and O with `tma_store`."""
        return (4 if self.tma_store else 3) if self.tma else 0

    def workspace_bytes(self, grid: tuple[int, int, int]) -> int:
        """The workspace binding a `tma` kernel takes after its outputs (0: none)."""
        return tma_workspace_bytes(self.tensor_maps, grid[0]) if self.tma else 0

    def grid(self, seq_q: int, batch_heads: int, multiprocessors: int, causal: bool) -> tuple[int, int, int]:
        """The launch grid; `multiprocessors` is the device's SM count (what a persistent grid fills)."""
        q_blocks = -(-seq_q // self.block_m)
        if self.family != "attention_fwd_sm90":
            return (q_blocks, batch_heads, 1)
        # sm_90: a 1-d list of (head, query block) tiles (fwd_sm90_wgmma.cuh `scheduled_tile`).
        tiles = q_blocks * batch_heads
        if not self.persistent or (q_blocks > PERSISTENT_MAX_Q_BLOCKS and not self.tma):
            return (tiles, 1, 1)
        shares = -(-tiles // 2) if causal else tiles  # causal tiles go out in pairs
        return (min(shares, multiprocessors * self.workgroups_per_multiprocessor), 1, 1)

    @property
    def workgroups_per_multiprocessor(self) -> int:
        """Workgroups of this kernel an SM holds at once (`Sm90Config::kBlocksPerSm`): two where the
        sm_90 kernel has a single consumer warpgroup (block_m 64), else one."""
        return 2 if self.family == "attention_fwd_sm90" and self.block_m == 64 else 1


@dataclass(frozen=True)
class CudaAttentionBackwardKernel:
    """One CUDA backward attention instance: kernels run one after another on a stream (`parts`).

    sm_80 (bwd_sm80_mma_sync.cuh), deterministic: `dq` (dQ and Δ = rowsum(dO∘O)) then `dkdv`, each
    keeping 16·warps rows per block resident (dq: query rows, dkdv: keys) and streaming tiles of
    the other side: dq `block_n` keys, dkdv `block_m` queries.
    sm_90 (bwd_sm90_wgmma.cuh): `prep` (Δ, lse in the exp2 domain, a zeroed fp32 dQ accumulator,
    over query rows padded to whole `block_m` tiles), `dkdv` (`block_n` resident keys, `block_m`-row
    query tiles through `stages` shared-memory stages; dK, dV, and dQ added into the accumulator
    by the copy engine's fp32 reductions: not deterministic), `dq` (the accumulator scaled into dQ).
    """

    family: str  # "attention_bwd_sm80" | "attention_bwd_sm90"
    element: str
    head_dim: int
    block_m: int  # queries per tile streamed by dkdv
    block_n: int  # keys per tile streamed by dq (sm_80); resident keys per dkdv block (sm_90)
    warps: int
    min_arch: str
    object_path: Path
    stages: int = 2  # sm_90: shared-memory stages of the query-side tiles
    # sm_90: dkdv loads through TMA, from tensor maps each block makes in a workspace binding after
    # its outputs (`workspace_bytes`), as the forward's `tma`.
    tma: bool = False

    @property
    def accumulates_dq(self) -> bool:
        """Whether key blocks add their dQ shares into one fp32 accumulator (the sm_90 kernels): the
        order of the additions, and so dQ's last bits, vary from run to run."""
        return self.family == "attention_bwd_sm90"

    @property
    def parts(self) -> tuple[str, ...]:
        """The kernels of one backward, in launch order."""
        return ("prep", "dkdv", "dq") if self.accumulates_dq else ("dq", "dkdv")

    def name(self, part: str) -> str:
        """The exported symbol of `part`."""
        return f"flashmlir_{self.family}_{self.element}_d{self.head_dim}_{part}"

    @property
    def dropout_parts(self) -> tuple[str, ...]:
        """The parts with a `_dropout` twin that regenerates the forward's dropout mask (and takes
        the seed): sm_90 dkdv only (its prep and dq never see P), both sm_80 kernels (each
        recomputes dS)."""
        return {"attention_bwd_sm90": ("dkdv",), "attention_bwd_sm80": ("dq", "dkdv")}.get(self.family, ())

    @property
    def dropout(self) -> bool:
        """Whether the backward can drop P as the forward's dropout twin did."""
        return bool(self.dropout_parts)

    def threads(self, part: str) -> int:
        if self.accumulates_dq and part != "dkdv":
            return 256  # prep and dq: 8 warps over a query tile (BwdSm90Config::kPrepThreads)
        return self.warps * 32

    @property
    def rows(self) -> int:
        """sm_80: resident rows a block."""
        return 16 * self.warps

    def padded_rows(self, seq_q: int) -> int:
        """sm_90: query rows of the statistics and the dQ accumulator (whole query tiles)."""
        return -(-seq_q // self.block_m) * self.block_m

    def shared_bytes(self, part: str) -> int:
        """Dynamic shared memory of `part`, as the family's source lays it out."""
        e = ELEMENT_BYTES[self.element]
        if self.accumulates_dq:
            if part != "dkdv":
                return 0
            # BwdSm90Config: K, V; per stage Q, dO and the rows' lse₂, Δ; two dSᵀ tiles; four fp32
            # 64 x 64 dQ staging tiles; 8-byte mbarriers (K/V landed, full and empty per stage and
            # per dSᵀ tile); 1024 bytes to align to the swizzle period.
            tiles = (2 * self.block_n + 2 * self.stages * self.block_m) * self.head_dim * e
            maps = 4 * TENSOR_MAP_BYTES if self.tma else 0  # Q, dO, K, V, made in shared memory first
            return (tiles + 2 * self.block_n * self.block_m * e + self.stages * 2 * self.block_m * 4
                    + 4 * 64 * 64 * 4 + maps + 8 * (1 + 2 * self.stages + 4) + 1024)
        resident = 2 * self.rows * self.head_dim * e  # Q and dO (dq), K and V (dkdv)
        if part == "dq":
            return resident + 4 * self.block_n * self.head_dim * e  # two stages of K, V
        return resident + 2 * (2 * self.block_m * self.head_dim * e + 2 * self.block_m * 4)  # Q, dO, lse, Δ

    def workspace_bytes(self, part: str, grid: tuple[int, int, int]) -> int:
        """The workspace binding `part` takes after its outputs (0: none): with `tma`, dkdv's Q, dO,
        K and V maps a block."""
        return tma_workspace_bytes(4, grid[0] * grid[1]) if self.tma and part == "dkdv" else 0

    def grid(self, part: str, seq: int, batch_heads: int) -> tuple[int, int, int]:
        """dkdv: seq = Sk, batch_heads = B·Hkv; the others: seq = Sq, batch_heads = B·Hq."""
        if self.accumulates_dq:
            return (-(-seq // (self.block_n if part == "dkdv" else self.block_m)), batch_heads, 1)
        return (-(-seq // self.rows), batch_heads, 1)


# Workgroups per IREE worker thread for the CPU kernels: fewer than IREE's 8-tile reservation,
# enough that a thread held up by the OS leaves the others a share to take.
CPU_WORKGROUPS_PER_THREAD = 4


# fp32 lanes of a vector register in each instruction set the CPU kernels are built for (cpu_simd.h).
CPU_ISA_LANES = {"avx512": 16, "avx2": 8}


@dataclass(frozen=True)
class CpuAttentionKernel:
    """The CPU attention kernels of one family and instruction set: functions per head dim. The
    work is items of `rows` query rows (backward dK/dV: keys) of one (batch, head); each IREE
    workgroup takes a share. One source serves every instruction set (cpu_simd.h): the catalog
    entry's `march` picks it and its tile sizes become -DFLASHMLIR_<KEY> (`defines`)."""

    family: str  # "attention_fwd_cpu", "attention_bwd_cpu"
    isa: str  # "avx512" | "avx2"
    element: str  # "f32"
    head_dims: tuple[int, ...]
    row_vectors: int
    requires: frozenset[str]  # /proc/cpuinfo flags the object's code uses
    object_path: Path
    march: str = "x86-64-v4"
    source: str = ""  # under runtime/microkernels/
    defines: tuple[str, ...] = ()
    # Backward only: whether the pass may call the one-pass `_fused` function (kernels.json's
    # "one_pass": set once measured and checked on that instruction set's hardware).
    one_pass: bool = False

    @property
    def rows(self) -> int:
        return CPU_ISA_LANES[self.isa] * self.row_vectors

    @property
    def shared_library(self) -> Path:
        """The instruction set's objects (forward and backward) linked as one shared library, which
        the torch path calls (runtime/cpu_kernels.py); IREE links the objects themselves."""
        return self.object_path.parent / f"libflashmlir_attention_cpu_{self.isa}.so"

    def name(self, head_dim: int) -> str:
        return f"flashmlir_{self.family}_{self.element}_d{head_dim}"

    def items(self, seq_q: int, batch_heads: int) -> int:
        return -(-seq_q // self.rows) * batch_heads

    def workgroups(self, seq_q: int, batch_heads: int, threads: int) -> int:
        """The 1-d grid: a few workgroups per worker thread, each an equal share of the items' cost
        (the kernel splits them); under 8 per thread, so that IREE's task system hands them out one
        at a time."""
        return max(1, min(self.items(seq_q, batch_heads), CPU_WORKGROUPS_PER_THREAD * threads))

    def fuses_backward(self, kv_heads: int, threads: int) -> bool:
        """Whether the backward takes the one-pass `_fused` function over the split `_dq`, `_dkdv`.

        The fused pass does 5 matrix products a tile against the split's 7 (1.24-1.72x faster on
        the 2-core AVX2 machine, benchmarks/results/cpu-2026-12-01-avx2-backward-kernels.md), but
        its items are whole (batch, K/V head)s: it only wins where they share out evenly between
        the threads. Taken where at least 80% of the threads' time is work (B·Hkv heads on T
        threads: B·Hkv / (T·⌈B·Hkv / T⌉) ≥ 0.8).
        """
        rounds = -(-kv_heads // threads)
        return self.one_pass and 5 * kv_heads >= 4 * threads * rounds

    def fused_workgroups(self, kv_heads: int, threads: int) -> int:
        """The fused backward's grid: a workgroup per head, at most a few per thread."""
        return max(1, min(kv_heads, CPU_WORKGROUPS_PER_THREAD * threads))


@dataclass(frozen=True)
class Library:
    cuda: tuple[CudaAttentionKernel, ...] = ()
    cpu: tuple[CpuAttentionKernel, ...] = ()
    cuda_backward: tuple[CudaAttentionBackwardKernel, ...] = ()
    cpu_backward: tuple[CpuAttentionKernel, ...] = ()

    def objects(self) -> list[Path]:
        return [k.object_path for k in (*self.cuda, *self.cpu, *self.cuda_backward, *self.cpu_backward)]


# What the build makes of a CUDA entry (runtime/microkernels/CMakeLists.txt): a fatbin from nvcc, or
# for Volta, which nvcc 13 dropped, PTX from NVRTC 12.
_CUDA_FORMAT = {"sm_70": "ptx", "sm_80": "fatbin", "sm_90a": "fatbin"}


def _arch_number(arch: str) -> int:
    return int(arch.removeprefix("sm_").rstrip("a"))


def runs_on(kernel: CudaAttentionKernel | CudaAttentionBackwardKernel, arch: str) -> bool:
    """Whether the kernel's image runs on `arch`: an architecture-specific build ("sm_90a": wgmma,
    setmaxnreg) only there, any other from its minimum architecture on."""
    if kernel.min_arch.endswith("a"):
        return _arch_number(kernel.min_arch) == _arch_number(arch)
    return _arch_number(kernel.min_arch) <= _arch_number(arch)


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


def _tile_defines(entry: dict) -> tuple[str, ...]:
    """A CPU entry's tile sizes as the build passes them to the compiler (CMakeLists.txt)."""
    return tuple(f"-DFLASHMLIR_{key.upper()}={entry[key]}" for key in CPU_TILE_KEYS if key in entry)


@functools.cache
def _load(directory: Path | None) -> Library:
    if directory is None or not (directory / CATALOG).is_file():
        return Library()
    catalog = json.loads((directory / CATALOG).read_text())

    def cuda_object(e: dict) -> Path:
        tag = length_tag(e.get("min_seq", 0))
        return directory / "cuda" / f"{e['family']}_{e['element']}_d{e['head_dim']}{tag}.{_CUDA_FORMAT[e['min_arch']]}"

    entries = catalog.get("cuda", [])
    cuda = tuple(
        CudaAttentionKernel(e["family"], e["element"], e["head_dim"], e["block_m"], e["block_n"], e["warps"],
                            e["min_arch"], cuda_object(e), e.get("stages", 2), e.get("pingpong", False),
                            e.get("min_seq", 0), e.get("min_seq_causal", 0), e.get("tma", False),
                            e.get("tma_store", False))
        for e in entries if e["family"].startswith("attention_fwd"))
    cuda_backward = tuple(
        CudaAttentionBackwardKernel(e["family"], e["element"], e["head_dim"], e["block_m"], e["block_n"],
                                    e["warps"], e["min_arch"], cuda_object(e), e.get("stages", 2), e.get("tma", False))
        for e in entries if e["family"].startswith("attention_bwd"))
    cpu_entries = [
        CpuAttentionKernel(e["family"], e["isa"], e["element"], tuple(e["head_dims"]), e["row_vectors"],
                           frozenset(e["requires"]), directory / "cpu" / f"{e['family']}_{e['isa']}.o",
                           e["march"], e["source"], _tile_defines(e), e.get("one_pass", False))
        for e in catalog.get("cpu", [])]
    cpu = tuple(k for k in cpu_entries if k.family.startswith("attention_fwd"))
    cpu_backward = tuple(k for k in cpu_entries if k.family.startswith("attention_bwd"))
    return Library(cuda, cpu, cuda_backward, cpu_backward)


def library() -> Library:
    return _load(library_dir())


def dropout_threshold(p: float) -> int:
    """⌈p · 2¹⁶⌉, what the kernels' dropout twins take: they keep a probability when its 16 bits of
    the mixed hash reach it, which is attention_op.dropout_keep's bits / 2¹⁶ ≥ p exactly (p · 2¹⁶ is
    exact in float64)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"dropout probability {p} outside what the kernels take, (0, 1)")
    return math.ceil(p * 2.0**16)


def dropout_constants(p: float) -> tuple[int, float]:
    """What every dropout twin (CUDA and CPU) takes after the constants: the threshold and the kept
    values' scale 1 / (1 − p)."""
    return dropout_threshold(p), 1.0 / (1.0 - p)


class NoKernel(Exception):
    """No microkernel serves this attention; the message says why."""


def select_attention_forward(arch: str, element: str, head_dim: int, seq_q: int | None = None,
                             seq_k: int | None = None, causal: bool = False) -> CudaAttentionKernel:
    """The CUDA kernel for `arch` (the target's), or NoKernel with the reason. With the problem's
    lengths (and whether it is causal), the tiling for them (the largest `min_seq`, or
    `min_seq_causal`, both reach); without, the one for any."""
    kernels = library().cuda
    if not kernels:
        raise NoKernel("the microkernel library is not installed (no kernels.json next to the package)")
    runnable = [k for k in kernels if runs_on(k, arch)]
    if not runnable:
        raise NoKernel(f"no attention microkernel for {arch} yet")
    matching = [k for k in runnable if k.element == element and k.head_dim == head_dim]
    if not matching:
        have = sorted({(k.element, k.head_dim) for k in runnable})
        offer = ", ".join(f"{e} d{d}" for e, d in have)
        raise NoKernel(f"no {arch} attention microkernel for {element} head dim {head_dim} (have: {offer})")
    # The newest family the target can run whose object was built (an older family's kernel is still
    # right on a newer GPU, only slower), in it the tiling for the lengths; if none was built, say
    # why for the newest.
    shortest = min(seq_q, seq_k) if seq_q is not None and seq_k is not None else 0
    fitting = [k for k in matching if k.serves_from(causal) <= shortest] or matching
    fitting.sort(key=lambda k: (_arch_number(k.min_arch), k.serves_from(causal)), reverse=True)
    kernel = next((k for k in fitting if k.object_path.is_file()), fitting[0])
    if not kernel.object_path.is_file():
        if kernel.min_arch == "sm_70":
            raise NoKernel(f"microkernel {kernel.name} was not built ({kernel.object_path} is missing: Volta "
                           "code is built by NVRTC 12, as nvcc 13 dropped sm_70; pip install '.[volta]', then "
                           "reinstall flashmlir)")
        raise NoKernel(f"microkernel {kernel.name} was not built ({kernel.object_path} is missing: nvcc was "
                       "not found when flashmlir was installed; put nvcc on PATH and reinstall)")
    return kernel


def select_attention_backward(arch: str, element: str, head_dim: int,
                              deterministic: bool = False) -> CudaAttentionBackwardKernel:
    """The CUDA backward kernels for `arch`, or NoKernel with the reason. `deterministic` (torch's
    deterministic mode) leaves out kernels whose dQ sum varies in order (accumulates_dq)."""
    kernels = [k for k in library().cuda_backward if runs_on(k, arch) and not (deterministic and k.accumulates_dq)]
    if not kernels:
        raise NoKernel(f"no {'deterministic ' if deterministic else ''}attention backward microkernel for {arch} "
                       f"(the library has {'none' if not library().cuda_backward else 'none that runs there'})")
    matching = [k for k in kernels if k.element == element and k.head_dim == head_dim]
    if not matching:
        offer = ", ".join(f"{e} d{d}" for e, d in sorted({(k.element, k.head_dim) for k in kernels}))
        raise NoKernel(f"no {arch} attention backward microkernel for {element} head dim {head_dim} (have: {offer})")
    matching.sort(key=lambda k: _arch_number(k.min_arch), reverse=True)
    kernel = next((k for k in matching if k.object_path.is_file()), matching[0])
    if not kernel.object_path.is_file():
        raise NoKernel(f"microkernel {kernel.family}_{kernel.element}_d{kernel.head_dim} was not built "
                       f"({kernel.object_path} is missing: nvcc was not found when flashmlir was installed; "
                       "put nvcc on PATH and reinstall)")
    return kernel


def select_cpu_attention_forward(features: frozenset[str], element: str, head_dim: int) -> CpuAttentionKernel:
    """The CPU kernel for a host with `features` (its /proc/cpuinfo flags), or NoKernel with the reason."""
    return _select_cpu(library().cpu, "attention", features, element, head_dim)


def select_cpu_attention_backward(features: frozenset[str], element: str, head_dim: int) -> CpuAttentionKernel:
    """The CPU backward kernels (dq, dkdv) for a host with `features`, or NoKernel with the reason."""
    return _select_cpu(library().cpu_backward, "attention backward", features, element, head_dim)


def _select_cpu(kernels: tuple[CpuAttentionKernel, ...], what: str, features: frozenset[str], element: str,
                head_dim: int) -> CpuAttentionKernel:
    if not kernels:
        raise NoKernel(f"the microkernel library has no CPU {what} kernels (not installed)")
    runnable = [k for k in kernels if k.requires <= features]
    if not runnable:
        need = " or ".join("+".join(sorted(k.requires)) for k in kernels)
        raise NoKernel(f"no CPU {what} microkernel for this CPU (they need {need})")
    matching = [k for k in runnable if k.element == element and head_dim in k.head_dims]
    if not matching:
        offer = ", ".join(f"{k.element} d{'/'.join(map(str, k.head_dims))}" for k in runnable)
        raise NoKernel(f"no CPU {what} microkernel for {element} head dim {head_dim} (have: {offer})")
    kernel = next((k for k in matching if k.object_path.is_file()), matching[0])  # the catalog's order
    if not kernel.object_path.is_file():
        raise NoKernel(f"CPU microkernel {kernel.family}_{kernel.isa} was not built ({kernel.object_path} is "
                       f"missing: no C compiler for -march={kernel.march} when flashmlir was installed)")
    return kernel


def library_problem(kind: str = "cuda") -> str | None:
    """Why no microkernel of `kind` ("cuda", "cpu") can be used at all, else None."""
    kernels = library().cuda if kind == "cuda" else library().cpu
    if not kernels:
        return f"the {kind.upper()} microkernel library is not installed"
    if not any(k.object_path.is_file() for k in kernels):
        tool = "nvcc" if kind == "cuda" else "a C compiler"
        return (f"the {kind.upper()} microkernels were not built ({tool} was not found when flashmlir was "
                f"installed; {'put nvcc on PATH or set CUDA_HOME' if kind == 'cuda' else 'install gcc or clang'}, "
                "then reinstall)")
    return None


def fingerprint() -> str:
    """A hash of the catalog and every built object: compiled modules embed them, the cache keys on it."""
    directory = library_dir()
    digest = hashlib.sha256()
    for path in library().objects():
        digest.update(path.name.encode())
        if path.is_file():
            digest.update(path.read_bytes())
    if directory is not None and (directory / CATALOG).is_file():
        digest.update((directory / CATALOG).read_bytes())
    return digest.hexdigest()[:16]
