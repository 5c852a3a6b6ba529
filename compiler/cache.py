"""The on-disk cache of compiled modules, so a second process does not compile again.

Key: sha256 over the imported IR (graph, shapes and dtypes are all in it; weights are function
arguments, not constants), the target with its flags, the pipeline, and the versions of
flashmlir (including a fingerprint of its source, so an edited pass never reuses a stale
module), iree-base-compiler and torch. Writes go to a temporary file renamed into place, so a
crash or a concurrent writer never leaves a half-written module under a valid key.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
from pathlib import Path

from flashmlir import config
from flashmlir.files import write_atomically
from flashmlir.log import logger

_SOURCE_ROOTS = ("passes", "compiler", "frontend", "runtime")


@functools.cache
def source_fingerprint() -> str:
    """sha256 of flashmlir's compiler-side Python sources (passes, compiler, frontend, runtime)."""
    import flashmlir

    digest = hashlib.sha256()
    roots = [Path(flashmlir.__file__).parent]
    for name in _SOURCE_ROOTS:
        module = __import__(f"flashmlir.{name}", fromlist=["__file__"])
        roots.append(Path(module.__file__).parent)
    for root in roots:
        for path in sorted(root.glob("*.py")):
            digest.update(path.name.encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


@functools.cache
def tool_versions() -> dict[str, str]:
    import flashmlir

    versions = {"flashmlir": f"{flashmlir.__version__}+{source_fingerprint()}"}
    for dist in ("iree-base-compiler", "torch"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "unknown"
    return versions


def cache_key(ir_text: str, target: str, flags: tuple[str, ...], pipeline: tuple[str, ...]) -> str:
    payload = json.dumps(
        {"target": target, "flags": list(flags), "pipeline": list(pipeline), "versions": tool_versions()},
        sort_keys=True,
    )
    digest = hashlib.sha256(payload.encode())
    digest.update(ir_text.encode())
    return digest.hexdigest()


class ModuleCache:
    """A directory of `<key>.vmfb` files, each with a `<key>.json` summary of its compile."""

    def __init__(self, directory: Path | None = None):
        self.directory = directory or config.cache_dir()
        self.enabled = config.cache_enabled()

    def path(self, key: str) -> Path:
        return self.directory / f"{key}.vmfb"

    def load(self, key: str) -> tuple[bytes, dict] | None:
        """The module and its summary, or None if absent (or the cache is off)."""
        if not self.enabled:
            return None
        try:
            summary = json.loads(self.path(key).with_suffix(".json").read_text())
            return self.path(key).read_bytes(), summary
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            logger.warning("module cache entry %s unreadable (%s); compiling instead", key[:16], e)
            return None

    def store(self, key: str, data: bytes, summary: dict) -> None:
        """Write the module, then its summary; a reader needs both, so it never sees half."""
        if not self.enabled:
            return
        try:
            write_atomically(self.path(key), data)
            write_atomically(self.path(key).with_suffix(".json"), json.dumps(summary).encode())
        except OSError as e:
            logger.warning("could not write the module cache in %s: %s", self.directory, e)
