"""Every environment knob flashmlir reads, declared once, typed and documented.

Knobs are read when used (not at import), so a test or a long-lived process can change them.
`flashmlir-opt --help-env` and the README print this table.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Knob:
    name: str
    default: str
    doc: str

    def raw(self) -> str:
        return os.environ.get(self.name, self.default)


def _flag(knob: Knob) -> bool:
    return knob.raw().strip().lower() in ("1", "true", "yes", "on")


STRICT = Knob(
    "FLASHMLIR_STRICT", "0",
    "1: a graph the backend cannot compile raises instead of falling back to eager PyTorch.",
)
CACHE_DIR = Knob(
    "FLASHMLIR_CACHE_DIR", "",
    "Directory of the on-disk cache of compiled modules (default: ~/.cache/flashmlir).",
)
DISABLE_CACHE = Knob("FLASHMLIR_DISABLE_CACHE", "0", "1: never read or write the module cache.")
SAVE_TEMPS = Knob(
    "FLASHMLIR_SAVE_TEMPS", "",
    "Directory: keep the IR after every stage of every compile there (one folder per module).",
)
LOG_LEVEL = Knob(
    "FLASHMLIR_LOG", "warning",
    "Log level of the 'flashmlir' logger: debug, info, warning or error. info shows each compile.",
)

POISON_OUTPUTS = Knob(
    "FLASHMLIR_POISON_OUTPUTS", "0",
    "1: fill every output with NaN before a compiled graph writes it (catches unwritten elements).",
)

MICROKERNELS = Knob(
    "FLASHMLIR_MICROKERNELS", "1",
    "0: never use the microkernel library; attention on GPUs goes through IREE's own codegen.",
)
MICROKERNEL_DIR = Knob(
    "FLASHMLIR_MICROKERNEL_DIR", "",
    "Directory of the microkernel library (kernels.json, cuda/*.fatbin); default: the installed one.",
)

ALL_KNOBS = (STRICT, CACHE_DIR, DISABLE_CACHE, SAVE_TEMPS, LOG_LEVEL, POISON_OUTPUTS, MICROKERNELS, MICROKERNEL_DIR)


def strict() -> bool:
    return _flag(STRICT)


def cache_enabled() -> bool:
    return not _flag(DISABLE_CACHE)


def cache_dir() -> Path:
    raw = CACHE_DIR.raw()
    if raw:
        return Path(raw).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "flashmlir"


def save_temps_dir() -> Path | None:
    raw = SAVE_TEMPS.raw()
    return Path(raw).expanduser() if raw else None


def poison_outputs() -> bool:
    return _flag(POISON_OUTPUTS)


def microkernels_enabled() -> bool:
    return _flag(MICROKERNELS)


def microkernel_dir() -> Path | None:
    raw = MICROKERNEL_DIR.raw()
    return Path(raw).expanduser() if raw else None


def log_level() -> str:
    return LOG_LEVEL.raw().strip().upper() or "WARNING"


def knob_table() -> str:
    """A readable table of the knobs, for --help output and docs."""
    width = max(len(k.name) for k in ALL_KNOBS)
    return "\n".join(f"  {k.name:<{width}}  {k.doc}" for k in ALL_KNOBS)
