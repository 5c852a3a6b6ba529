"""The one capability table of flashmlir's targets. Passes read it; nothing tests `arch >= 90`.

Each target says what IREE is told (flags, or for GPUs the `#iree_gpu.target` description put on
the module), what the hardware offers that our passes care about, and how attention is tiled
there. Targets that later work will bring (an NPU-like one) are listed so that asking for them
gives a clear answer instead of a KeyError.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field

from flashmlir.errors import UnsupportedError


@dataclass(frozen=True)
class AttentionTiles:
    """Block sizes of the flash loop nest (flashmlir-tile-attention) and vector tile sizes.

    q_block × kv_block is the score tile one workgroup holds; vector_q rows × the full head dim
    and vector_kv keys are what IREE's vectorizer works on at a time.
    """

    q_block: int
    kv_block: int
    vector_q: int
    vector_kv: int
    # IREE's llvm-cpu rejects vector ops of this many bytes or more (iree-llvmcpu-verify-vector-
    # size-legality: 512 native vectors, so 32 KB with AVX-512, 16 KB with AVX2); the Q·Kᵀ
    # contraction spans vector_q × vector_kv × head_dim f32 values.
    max_vector_bytes: int = 32768


@dataclass(frozen=True)
class GpuCaps:
    """What an NVIDIA architecture offers IREE's GPU codegen (the `#iree_gpu.target` it gets)."""

    arch: str  # "sm_80"
    ptx_features: str  # the PTX ISA version LLVM emits, "+ptx76"
    compute_capability: tuple[int, int]
    mma: tuple[str, ...]  # IREE's MMA intrinsics this arch really has
    shared_memory_bytes: int  # per workgroup (block), opt-in maximum
    # SMs of the device: the arch's flagship part unless the device is known (with_device). The
    # persistent sm_90 kernel's grid is one workgroup per SM; a grid sized for more SMs than the
    # device has runs a second, nearly empty wave.
    multiprocessors: int
    max_workgroup_sizes: tuple[int, int, int] = (1024, 1024, 64)

    def iree_target(self) -> str:
        mma = ", ".join(f"<{m}>" for m in self.mma)
        x, y, z = self.max_workgroup_sizes
        return (
            f'#iree_gpu.target<arch = "{self.arch}", features = "{self.ptx_features}", wgp = <'
            "compute = fp64|fp32|fp16|int64|int32|int16|int8, storage = b64|b32|b16|b8, "
            f"subgroup = shuffle|arithmetic, dot = dp4xi8toi32, mma = [{mma}], subgroup_size_choices = [32], "
            f"max_workgroup_sizes = [{x}, {y}, {z}], max_thread_count_per_workgroup = 1024, "
            f"max_workgroup_memory_bytes = {self.shared_memory_bytes}, "
            "max_workgroup_counts = [2147483647, 65535, 65535]>>"
        )

    def device_targets(self) -> str:
        """The `hal.device.targets` attribute value that makes IREE compile for this GPU."""
        executable = f'#hal.executable.target<"cuda", "cuda-nvptx-fb", {{iree_codegen.target_info = {self.iree_target()}}}>'
        return f'[#hal.device.target<"cuda", [{executable}]> : !hal.device]'


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "cpu" | "cuda" | "npu"
    description: str
    available: bool
    iree_flags: tuple[str, ...] = ()
    # Flags for faster code that IREE does not manage on every graph: tried first, and a compile
    # that fails with them is done again without (compiler/pipeline.py, compile_module).
    iree_fast_flags: tuple[str, ...] = ()
    runtime_driver: str = ""
    attention_tiles: AttentionTiles | None = None
    vector_bits: int = 0
    cache_bytes: dict[str, int] = field(default_factory=dict)
    unavailable_reason: str = ""
    # What a compiled module depends on beyond the flags: "host" CPU code is only valid on a CPU
    # with the same features, so the module cache keys on them.
    fingerprint: str = ""
    gpu: GpuCaps | None = None
    dtypes: tuple[str, ...] = ("float32", "float16", "bfloat16")  # element types it computes in
    cpu_features: frozenset[str] = frozenset()  # the host CPU's /proc/cpuinfo flags (cpu target)
    cpu_threads: int = 0  # CPUs this process may run on: IREE's worker threads (cpu target)

    @property
    def compile_flags(self) -> tuple[str, ...]:
        """The flags a compile starts with (a session's)."""
        return self.iree_flags + self.iree_fast_flags


def _cpu_cache_bytes() -> dict[str, int]:
    """L1d/L2/L3 sizes read from sysfs (Linux); empty where unreadable."""
    sizes: dict[str, int] = {}
    root = "/sys/devices/system/cpu/cpu0/cache"
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        return sizes
    for entry in entries:
        try:
            with open(f"{root}/{entry}/level") as f:
                level = f.read().strip()
            with open(f"{root}/{entry}/type") as f:
                kind = f.read().strip()
            with open(f"{root}/{entry}/size") as f:
                text = f.read().strip()
        except OSError:
            continue
        if kind == "Instruction":
            continue
        scale = {"K": 1024, "M": 1024 * 1024}.get(text[-1], 1)
        sizes[f"L{level}"] = int(text.rstrip("KM")) * scale
    return sizes


def _host_cpu_fingerprint() -> str:
    """The host CPU's model and feature flags (what --iree-llvmcpu-target-cpu=host compiles for)."""
    import hashlib
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = [platform.machine(), platform.processor()]
    return hashlib.sha256("".join(lines).encode()).hexdigest()[:16]


def _host_cpu_flags() -> frozenset[str]:
    """The host CPU's feature flags as /proc/cpuinfo lists them (empty where unreadable)."""
    try:
        with open("/proc/cpuinfo") as f:
            line = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def _host_threads() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


# iree-llvmcpu-verify-vector-size-legality's limit, in native vectors of the target CPU.
IREE_CPU_MAX_NATIVE_VECTORS = 512


def _host_vector_bits() -> int:
    flags = _host_cpu_flags()
    if "avx512f" in flags:
        return 512
    if "avx2" in flags or "avx" in flags:
        return 256
    return 128


@functools.cache
def _cpu() -> Target:
    threads = _host_threads()
    vector_bits = _host_vector_bits()
    return Target(
        name="cpu",
        kind="cpu",
        description="the host CPU through IREE's llvm-cpu backend (local-task runtime)",
        available=True,
        iree_flags=(
            "--iree-hal-target-device=local",
            "--iree-hal-local-target-device-backends=llvm-cpu",
            "--iree-llvmcpu-target-cpu=host",
        ),
        # Matmuls packed into the CPU's register tiles (mmt4d): on the 2-core AVX2 machine matmuls
        # and weight gradients 2-3.4x faster, the small GPT's IREE-compiled training step 510 ->
        # 320 ms (scratch runs of 2026-12-01, not in a table; with it, IREE's whole graph is the
        # fastest CPU inference: cpu-2026-12-01-inference-small.md). IREE 3.13 fails on some graphs
        # with it (BERT training with dropout: a load_from_buffer shape mismatch), hence optional.
        iree_fast_flags=("--iree-opt-data-tiling=true",),
        runtime_driver="local-task",
        # Measured on the 2-core AVX2 CI machine (benchmarks/attention_cpu.py): 64×64 score tiles
        # stay in L1/L2 with a 64-wide head; 4 query rows × 16 keys per vector step.
        attention_tiles=AttentionTiles(q_block=64, kv_block=64, vector_q=4, vector_kv=16,
                                       max_vector_bytes=IREE_CPU_MAX_NATIVE_VECTORS * vector_bits // 8),
        vector_bits=vector_bits,
        cache_bytes=_cpu_cache_bytes(),
        fingerprint=f"host-cpu:{_host_cpu_fingerprint()}:threads={threads}",
        cpu_features=_host_cpu_flags(),
        cpu_threads=threads,
    )


# IREE's MMA intrinsics for NVIDIA: mma.sync m16n8k16 (f16/bf16 inputs) exists from sm_80 on.
_AMPERE_MMA = ("NV_MMA_SYNC_F32_16x8x16_F16", "NV_MMA_SYNC_F16_16x8x16_F16", "NV_MMA_SYNC_F32_16x8x16_BF16")

_GPUS = {
    # Volta: no mma.sync m16n8k16 (IREE's own sm_70 entry lists it and crashes in instruction
    # selection); its HMMA m8n8k4 / WMMA 16x16x16 are not in IREE's codegen, so attention here
    # runs on SIMT FMA until the Volta microkernel. No bf16 arithmetic. 96 KB shared memory.
    "sm_70": GpuCaps("sm_70", "+ptx63", (7, 0), (), 98304, 80),  # V100
    # Ampere (A100): 163 KB of shared memory per block.
    "sm_80": GpuCaps("sm_80", "+ptx76", (8, 0), _AMPERE_MMA, 166912, 108),  # A100
    # Hopper: absent from IREE 3.13's table; written out here with Hopper's limits (227 KB shared
    # memory per block). IREE's codegen still emits Ampere mma.sync for it: WGMMA and TMA come
    # with our sm_90 microkernel.
    "sm_90": GpuCaps("sm_90", "+ptx80", (9, 0), _AMPERE_MMA, 232448, 132),  # H100 SXM, H200
}


def _cuda(name: str) -> Target:
    gpu = _GPUS[name]
    return Target(
        name=name,
        kind="cuda",
        description=f"NVIDIA {name} through IREE's CUDA backend",
        available=True,
        runtime_driver="cuda",
        gpu=gpu,
        dtypes=("float32", "float16") if gpu.compute_capability < (8, 0) else ("float32", "float16", "bfloat16"),
        fingerprint=_gpu_fingerprint(gpu),
    )


def _gpu_fingerprint(gpu: GpuCaps) -> str:
    """What a module compiled for `gpu` depends on: IREE's target and the SM count our grids fill."""
    return f"{gpu.iree_target()} multiprocessors={gpu.multiprocessors}"


def with_device(target: Target, multiprocessors: int) -> Target:
    """`target` for a known device: its SM count instead of the arch's flagship one."""
    if target.gpu is None or target.gpu.multiprocessors == multiprocessors:
        return target
    gpu = dataclasses.replace(target.gpu, multiprocessors=multiprocessors)
    return dataclasses.replace(target, gpu=gpu, fingerprint=_gpu_fingerprint(gpu))


def _planned(name: str, kind: str, description: str) -> Target:
    return Target(
        name=name, kind=kind, description=description, available=False,
        unavailable_reason=f"target '{name}' ({description}) is planned but not supported yet",
    )


_PLANNED = {
    "npu": ("npu", "an NPU-like target with two-level tiling"),
}

TARGET_NAMES = ("cpu", *_GPUS, *_PLANNED)


def lookup(name: str) -> Target:
    """The table entry for `name`, available or not. Unknown names raise UnsupportedError."""
    if name == "cpu":
        return _cpu()
    if name in _GPUS:
        return _cuda(name)
    if name in _PLANNED:
        kind, description = _PLANNED[name]
        return _planned(name, kind, description)
    raise UnsupportedError(f"unknown target '{name}' (known: {', '.join(TARGET_NAMES)})")


def get_target(name: str) -> Target:
    """The target called `name`, if flashmlir can compile for it; else UnsupportedError."""
    target = lookup(name)
    if not target.available:
        supported = ", ".join(n for n in TARGET_NAMES if lookup(n).available)
        raise UnsupportedError(f"{target.unavailable_reason} (supported now: {supported})")
    return target


def target_for_device(device_type: str, capability: tuple[int, int] | None = None) -> Target:
    """The target for tensors living on `device_type` ('cpu', 'cuda'), as torch.compile sees them."""
    if device_type == "cpu":
        return _cpu()
    if device_type == "cuda" and capability is not None:
        # The newest target the device can run (PTX for an older arch is JIT-compiled forward).
        for name in ("sm_90", "sm_80", "sm_70"):
            if _GPUS[name].compute_capability <= capability:
                return get_target(name)
        raise UnsupportedError(f"CUDA device of compute capability {capability} is older than sm_70")
    raise UnsupportedError(f"tensors on device '{device_type}' have no flashmlir target yet")


def check_runs_on(target: Target, capability: tuple[int, int]) -> None:
    """Raise if code for `target` cannot run on a device of `capability`."""
    if target.gpu is not None and target.gpu.compute_capability > capability:
        raise UnsupportedError(
            f"target {target.name} needs compute capability {target.gpu.compute_capability}, the device "
            f"has {capability}")
