"""Graphs we cannot compile run in eager PyTorch, with the reason logged once; strict mode raises."""

import logging

import pytest
import torch
import torch.nn.functional as F

import flashmlir
from tests.helpers import rel_err


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def flashmlir_log():
    """The 'flashmlir' logger does not propagate to the root logger; listen to it directly."""
    logger, handler = logging.getLogger("flashmlir"), _Records()
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


def attention_then_eigh(q, k, v):
    # torch.linalg.eigh has no lowering in IREE's torch frontend: the graph cannot compile.
    out = F.scaled_dot_product_attention(q, k, v)
    return torch.linalg.eigh(out[0, 0] @ out[0, 0].T).eigenvalues


def test_uncompilable_graph_falls_back_and_logs_the_reason(lenient, flashmlir_log):
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    with torch.no_grad():
        out = torch.compile(attention_then_eigh, backend="flashmlir")(q, k, v)
        again = torch.compile(attention_then_eigh, backend="flashmlir")(q, k, v)
    assert rel_err(out, attention_then_eigh(q, k, v)) < 1e-5 and rel_err(again, out) == 0
    warnings = [r.getMessage() for r in flashmlir_log.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings  # logged once per process, not once per graph
    assert "falling back to eager PyTorch" in warnings[0] and "eigh" in warnings[0]


def test_strict_mode_raises_instead(flashmlir_log):
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    with pytest.raises(Exception, match="FLASHMLIR_STRICT=1"):
        with torch.no_grad():
            torch.compile(attention_then_eigh, backend="flashmlir")(q, k, v)


def test_unsupported_target_falls_back_with_reason(lenient):
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    fn = torch.compile(F.scaled_dot_product_attention, backend="flashmlir", options={"target": "sm_90"})
    with torch.no_grad():
        assert rel_err(fn(q, k, v), F.scaled_dot_product_attention(q, k, v)) < 1e-6


def test_explain_lists_the_fallback_and_its_reason(lenient):
    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    with torch.no_grad():
        report = flashmlir.explain(attention_then_eigh, q, k, v)
    assert len(report.sites) == 1 and not report.compiled
    (graph,) = [r for r in report.rejected if r.kind == "graph"]
    assert "eigh" in graph.reason
    assert "eager (fallback)" in str(report)


def test_dynamic_shapes_fall_back_cleanly(lenient, flashmlir_log):
    fn = torch.compile(F.scaled_dot_product_attention, backend="flashmlir", dynamic=True)
    with torch.no_grad():
        for s in (16, 24):
            q, k, v = (torch.randn(1, 2, s, 8) for _ in range(3))
            assert rel_err(fn(q, k, v), F.scaled_dot_product_attention(q, k, v)) < 1e-6
    assert any("dynamic shapes" in r.getMessage() for r in flashmlir_log.records)


def test_compile_error_carries_a_reproducer_that_reproduces(monkeypatch):
    import os
    import shlex
    import subprocess
    import sys
    from pathlib import Path

    from flashmlir.errors import CompileError

    q, k, v = (torch.randn(1, 2, 16, 16) for _ in range(3))
    with pytest.raises(Exception) as info:
        with torch.no_grad():
            torch.compile(attention_then_eigh, backend="flashmlir")(q, k, v)
    error = info.value
    while error is not None and not isinstance(error, CompileError):
        error = error.__cause__ or error.__context__
    assert isinstance(error, CompileError) and error.stage.startswith("iree-")
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    proc = subprocess.run(shlex.split(error.reproducer), capture_output=True, text=True, env=env)
    assert proc.returncode != 0 and "_linalg_eigh" in proc.stderr
