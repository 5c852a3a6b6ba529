"""Graph inputs whose values a compiled graph relies on, checked on every call.

GPT-2 and nanoGPT mask attention with a registered `tril` buffer. Dynamo passes buffers to the
backend as graph inputs, so the matcher cannot see the mask is causal from the graph alone; given
the buffer's value at compile time it can (`find_attention(known=...)`), and the kernels then
skip masked blocks instead of reading an S×S mask. That holds only while the buffer keeps its
value, which dynamo does not guard: `AssumedInputs` does, cheaply on the common path (the same
tensor object at the same version counter: nothing wrote to it), by comparing values when the
object changed (`model.to(device)` makes new buffers), and the graph runs uncompiled, in eager
PyTorch, on a call whose value differs.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor

from flashmlir import config
from flashmlir.errors import FlashmlirError
from flashmlir.frontend.masks import MAX_EVALUATED_ELEMENTS
from flashmlir.log import logger, warn_once


def _source_names(dynamo_gm: fx.GraphModule) -> list[str]:
    """Where dynamo took each graph input from, e.g. "L['self']._modules['attn']._buffers['causal']"."""
    names = []
    for node in dynamo_gm.graph.find_nodes(op="placeholder"):
        name = getattr(getattr(node.meta.get("grapharg"), "source", None), "name", None)
        names.append(str(name() if callable(name) else name or node.name))
    return names


def module_buffers(dynamo_gm: fx.GraphModule, graph: fx.GraphModule,
                   example_inputs: Sequence[Any]) -> dict[fx.Node, torch.Tensor]:
    """`graph`'s placeholders that are module buffers (by dynamo's source for the input), with
    their values: the inputs a mask may be evaluated from. Parameters, user inputs, tensors that
    need gradients, fake tensors and large tensors are left out."""
    placeholders = list(graph.graph.find_nodes(op="placeholder"))
    known = {}
    for node, name, value in zip(placeholders, _source_names(dynamo_gm), example_inputs, strict=False):
        if ("._buffers[" in name and isinstance(value, torch.Tensor) and not isinstance(value, FakeTensor)
                and not value.requires_grad and value.numel() <= MAX_EVALUATED_ELEMENTS):
            known[node] = value
    return known


@dataclass
class _Expected:
    name: str
    value: torch.Tensor  # a copy, to compare a replaced tensor with
    seen: weakref.ref  # the tensor last found to hold `value`
    version: int | None  # its version counter then (None: it has none, compare values every call)


def _version(x: torch.Tensor) -> int | None:
    try:
        return x._version
    except RuntimeError:  # inference tensors keep no version counter
        return None


class AssumedInputs:
    """The values some inputs (by position) must have for the compiled graph to be right."""

    def __init__(self, dynamo_gm: fx.GraphModule, graph: fx.GraphModule, nodes: Sequence[fx.Node],
                 example_inputs: Sequence[Any]):
        positions = {n: i for i, n in enumerate(graph.graph.find_nodes(op="placeholder"))}
        names = _source_names(dynamo_gm)
        self.expected: dict[int, _Expected] = {}
        for node in nodes:
            i = positions[node]
            x = example_inputs[i]
            self.expected[i] = _Expected(names[i], x.detach().clone(), weakref.ref(x), _version(x))

    def mismatch(self, args: Sequence[Any]) -> str | None:
        """None if every assumed input holds its value, else which one does not."""
        for i, e in self.expected.items():
            x = args[i]
            if e.seen() is x and e.version is not None and _version(x) == e.version:
                continue
            if not (isinstance(x, torch.Tensor) and x.shape == e.value.shape and x.dtype == e.value.dtype
                    and x.device == e.value.device and torch.equal(x, e.value)):
                return e.name
            e.seen, e.version = weakref.ref(x), _version(x)
        return None

    def guard(self, compiled: Callable, eager: Callable, graph_name: str) -> Callable:
        """`compiled` while the assumed values hold, else `eager` (logged)."""
        if not self.expected:
            return compiled

        def run(*args):
            changed = self.mismatch(args)
            if changed is None:
                return compiled(*args)
            message = (f"{graph_name}: input {changed} no longer holds the value its attention was compiled "
                       "for (a causal mask buffer); running eager PyTorch for such calls")
            if config.strict():
                raise FlashmlirError(f"{message} (FLASHMLIR_STRICT=1)")
            warn_once(message)
            logger.info("%s: %s changed since compile: running eagerly", graph_name, changed)
            return eager(*args)

        return run
