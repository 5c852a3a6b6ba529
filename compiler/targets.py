"""The one capability table of flashmlir's targets. Passes read it; nothing tests `arch >= 90`.

Each target says what IREE is told (flags), what the hardware offers that our passes care about,
and how attention is tiled there. Targets that later work will bring (CUDA sm_70/80/90, an
NPU-like target) are listed so that asking for them gives a clear answer instead of a KeyError.
"""

from __future__ import annotations

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
    # IREE's llvm-cpu rejects vector ops over this many bytes (iree-llvmcpu-verify-vector-size-
    # legality); the Q·Kᵀ contraction spans vector_q × vector_kv × head_dim f32 values.
    max_vector_bytes: int = 32768


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # "cpu" | "cuda" | "npu"
    description: str
    available: bool
    iree_flags: tuple[str, ...] = ()
    runtime_driver: str = ""
    attention_tiles: AttentionTiles | None = None
    vector_bits: int = 0
    cache_bytes: dict[str, int] = field(default_factory=dict)
    unavailable_reason: str = ""
    # What a compiled module depends on beyond the flags: "host" CPU code is only valid on a CPU
    # with the same features, so the module cache keys on them.
    fingerprint: str = ""


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


def _host_vector_bits() -> int:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return 128
    if " avx512f" in flags:
        return 512
    if " avx2" in flags or " avx " in flags:
        return 256
    return 128


@functools.cache
def _cpu() -> Target:
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
        runtime_driver="local-task",
        # Measured on the 2-core AVX2 CI machine (benchmarks/attention_cpu.py): 64×64 score tiles
        # stay in L1/L2 with a 64-wide head; 4 query rows × 16 keys per vector step.
        attention_tiles=AttentionTiles(q_block=64, kv_block=64, vector_q=4, vector_kv=16),
        vector_bits=_host_vector_bits(),
        cache_bytes=_cpu_cache_bytes(),
        fingerprint=f"host-cpu:{_host_cpu_fingerprint()}",
    )


def _planned(name: str, kind: str, description: str) -> Target:
    return Target(
        name=name, kind=kind, description=description, available=False,
        unavailable_reason=f"target '{name}' ({description}) is planned but not supported yet",
    )


_PLANNED = {
    "sm_70": ("cuda", "NVIDIA Volta, CUDA through IREE with Volta-only MMA"),
    "sm_80": ("cuda", "NVIDIA Ampere, CUDA through IREE"),
    "sm_90": ("cuda", "NVIDIA Hopper, CUDA through IREE with WGMMA/TMA microkernels"),
    "npu": ("npu", "an NPU-like target with two-level tiling"),
}

TARGET_NAMES = ("cpu", *_PLANNED)


def lookup(name: str) -> Target:
    """The table entry for `name`, available or not. Unknown names raise UnsupportedError."""
    if name == "cpu":
        return _cpu()
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
        major = capability[0]
        name = "sm_90" if major >= 9 else "sm_80" if major == 8 else "sm_70" if major == 7 else ""
        if name:
            return get_target(name)
    raise UnsupportedError(f"tensors on device '{device_type}' have no flashmlir target yet")
