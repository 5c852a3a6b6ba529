"""Shared test fixtures: a private module cache, strict mode, fresh dynamo state, references."""

from __future__ import annotations

import os

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory):
    """Every test run compiles into its own cache, so results never depend on an old one."""
    old = os.environ.get("FLASHMLIR_CACHE_DIR")
    os.environ["FLASHMLIR_CACHE_DIR"] = str(tmp_path_factory.mktemp("flashmlir-cache"))
    yield
    if old is None:
        os.environ.pop("FLASHMLIR_CACHE_DIR", None)
    else:
        os.environ["FLASHMLIR_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def _strict(monkeypatch):
    """Fallbacks are errors in tests unless a test asks for them (see `lenient`)."""
    monkeypatch.setenv("FLASHMLIR_STRICT", "1")


@pytest.fixture
def lenient(monkeypatch):
    monkeypatch.setenv("FLASHMLIR_STRICT", "0")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _forget_process_memory():
    """Once-per-process warnings and remembered compile failures must not leak between tests."""
    from flashmlir import log
    from flashmlir.compiler import pipeline

    log._said.clear()
    pipeline._FAILED.clear()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
