"""Compile one aot_autograd FX graph (forward, backward or inference) into a callable.

    graph → check it is something we compile → import (torch dialect) → pipeline (cached) → load

The callable takes the graph's tensor arguments and returns its outputs in order, `None` where
the graph returns None (backward graphs do, for inputs that need no gradient). Outputs are
allocated by torch on the inputs' device and written in place by the module
(flashmlir-bind-result-storage).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from flashmlir import config
from flashmlir.compiler import iree_driver
from flashmlir.compiler.pipeline import CompileReport, compile_cached
from flashmlir.compiler.targets import Target
from flashmlir.errors import UnsupportedError
from flashmlir.frontend.fx_import import import_graph
from flashmlir.runtime.iree_module import IreeModule


@dataclass(frozen=True)
class OutputSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


@dataclass
class CompiledGraph:
    module: IreeModule
    outputs: list[OutputSpec | None]  # per graph output; None where the graph returns None
    device: torch.device
    report: CompileReport

    def __call__(self, *args: torch.Tensor) -> list[torch.Tensor | None]:
        storage = [None if o is None else torch.empty(o.shape, dtype=o.dtype, device=self.device)
                   for o in self.outputs]
        if config.poison_outputs():
            for t in storage:
                if t is not None and t.is_floating_point():
                    t.fill_(float("nan"))
        self.module(*args, *(t for t in storage if t is not None))
        return storage


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


def _without_none_outputs(gm: fx.GraphModule) -> tuple[fx.GraphModule, list[OutputSpec | None]]:
    """A copy of `gm` returning only its tensor outputs, and the shape and dtype of every output."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    specs: list[OutputSpec | None] = []
    kept: list[fx.Node] = []
    for node in gm.graph.nodes:
        if node.op != "output":
            env[node] = graph.node_copy(node, lambda n: env[n])
            continue
        values = node.args[0] if isinstance(node.args[0], (list, tuple)) else (node.args[0],)
        for v in values:
            val = v.meta.get("val") if isinstance(v, fx.Node) else None
            if v is None:
                specs.append(None)
            elif isinstance(val, torch.Tensor):
                specs.append(OutputSpec(tuple(int(d) for d in val.shape), val.dtype))
                kept.append(env[v])
            else:
                raise UnsupportedError(
                    f"graph returns a {type(val or v).__name__}; flashmlir compiles graphs returning tensors"
                )
    graph.output(tuple(kept))
    return fx.GraphModule(gm, graph), specs


def _device_of(example_inputs: Sequence[Any]) -> torch.device:
    return next((x.device for x in example_inputs if isinstance(x, torch.Tensor)), torch.device("cpu"))


def compile_fx_graph(gm: fx.GraphModule, example_inputs: Sequence[Any], target: Target,
                     what: str = "graph") -> CompiledGraph:
    """Compile an aot_autograd graph for `target`. Raises FlashmlirError subclasses. Under torch's
    deterministic mode (torch.use_deterministic_algorithms; Dynamo recompiles when it changes) the
    gradients' kernels are deterministic ones."""
    _check_inputs(example_inputs)
    stripped, outputs = _without_none_outputs(gm)
    device = _device_of(example_inputs)
    session = iree_driver.new_session(target.compile_flags)
    module = import_graph(stripped, session.context)
    vmfb, report = compile_cached(session, module, target, what=what, bind_result_storage=True,
                                  deterministic=torch.are_deterministic_algorithms_enabled())
    loaded = IreeModule(vmfb, target.runtime_driver, device_index=device.index or 0)
    return CompiledGraph(loaded, outputs, device, report)
