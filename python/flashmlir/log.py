"""The 'flashmlir' logger, and warnings that must be said once per process, not once per graph."""

from __future__ import annotations

import logging
import threading

from flashmlir import config

logger = logging.getLogger("flashmlir")
_said: set[str] = set()
_lock = threading.Lock()


def _configure() -> None:
    if logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("flashmlir: %(message)s"))
    logger.addHandler(handler)
    logger.propagate = False
    logger.setLevel(getattr(logging, config.log_level(), logging.WARNING))


_configure()


def warn_once(message: str) -> None:
    """Log `message` as a warning the first time it is seen in this process."""
    with _lock:
        if message in _said:
            return
        _said.add(message)
    logger.warning(message)
