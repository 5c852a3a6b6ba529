"""Compile one aot_autograd FX graph (forward, backward or inference) into a callable.

    graph → check it is something we compile → import (torch dialect) → pipeline (cached) → load

The callable takes the graph's tensor arguments and returns its outputs in order, `None` where
the graph returns None (backward graphs do, for inputs that need no gradient).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from flashmlir.compiler import iree_driver
from flashmlir.compiler.pipeline import CompileReport, compile_cached
from flashmlir.compiler.targets import Target
from flashmlir.errors import UnsupportedError
from flashmlir.frontend.fx_import import import_graph
from flashmlir.runtime.iree_module import IreeModule


@dataclass
class CompiledGraph:
    module: IreeModule
    output_slots: list[int | None]  # per graph output: index into the module's results, or None
    report: CompileReport

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor | None]:
        results = self.module(*args)
        return [None if slot is None else results[slot] for slot in self.output_slots]


def _check_inputs(example_inputs: Sequence[Any]) -> None:
    for i, x in enumerate(example_inputs):
        if not isinstance(x, torch.Tensor):
            raise UnsupportedError(
                f"graph input {i} is a {type(x).__name__} ({x}): dynamic shapes are not supported yet; "
                "compile with dynamic=False"
            )
        if isinstance(x, torch.Tensor) and any(not isinstance(d, int) for d in x.shape):
            raise UnsupportedError(f"graph input {i} has a symbolic shape {tuple(x.shape)}: dynamic "
                                   "shapes are not supported yet; compile with dynamic=False")
        if x.is_complex() or x.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
            raise UnsupportedError(f"graph input {i} has dtype {x.dtype}, which flashmlir does not compile")


def _without_none_outputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[int | None]]:
    """A copy of `gm` returning only its tensor outputs, and where each original output went."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    slots: list[int | None] = []
    kept: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op != "output":
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        values = node.args[0] if isinstance(node.args[0], (list, tuple)) else (node.args[0],)
        for v in values:
            if v is None:
                slots.append(None)
            elif isinstance(v, fx.Node):
                slots.append(len(kept))
                kept.append(env[v])
            else:
                raise UnsupportedError(
                    f"graph returns a {type(v).__name__}; flashmlir compiles graphs returning tensors"
                )
    graph.output(tuple(kept))
    return fx.GraphModule(gm, graph), slots


def compile_fx_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], target: Target,
                     what: str = "graph") -> CompiledGraph:
    """Compile an aot_autograd graph for `target`. Raises FlashmlirError subclasses."""
    _check_inputs(example_inputs)
    stripped, slots = _without_none_outputs(gm)
    session = iree_driver.new_session(target.iree_flags)
    module = import_graph(stripped, session.context)
    vmfb, report = compile_cached(session, module, target, what=what)
    return CompiledGraph(IreeModule(vmfb, target.runtime_driver), slots, report)
