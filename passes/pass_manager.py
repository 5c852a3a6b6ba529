"""Run a textual pass pipeline that mixes flashmlir's Python passes with MLIR/IREE passes.

    builtin.module(flashmlir-match-attention, canonicalize, flashmlir-tile-attention{target=cpu})

Our passes are added to one MLIR PassManager as Python passes (`PassManager.add(callable)`), the
others as textual elements, so they run in order in one pipeline with MLIR's own verification
between passes. Each of our passes reports a `PassResult` (rewrites and declines with reasons).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from iree.compiler import ir, passmanager

from flashmlir.errors import InputError
from flashmlir.passes import REGISTRY
from flashmlir.passes.framework import PassResult, PassSpec


@dataclass(frozen=True)
class PipelineElement:
    text: str  # as written, e.g. "flashmlir-tile-attention{target=cpu}" or "func.func(cse)"
    spec: PassSpec | None  # ours, or None for an MLIR/IREE pass
    options: object | None


def split_top_level(text: str) -> list[str]:
    """Split 'a,b{x=1,y},c(d,e)' at commas outside (), {} and []."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append(text[start:i].strip())
            start = i + 1
    tail = text[start:].strip()
    if tail:
        parts.append(tail)
    return [p for p in parts if p]


def parse_pipeline(text: str) -> list[PipelineElement]:
    """Parse a pipeline; the outer `builtin.module(...)` is optional. Raises InputError."""
    text = text.strip()
    if text.startswith("builtin.module(") and text.endswith(")"):
        text = text[len("builtin.module("):-1]
    elements = []
    for item in split_top_level(text):
        name, _, rest = item.partition("{")
        name = name.strip()
        spec = REGISTRY.get(name)
        if spec is None:
            elements.append(PipelineElement(item, None, None))
            continue
        if rest and not rest.endswith("}"):
            raise InputError(f"malformed options in pipeline element '{item}'")
        try:
            options = spec.parse_options(rest[:-1] if rest else "")
        except ValueError as e:
            raise InputError(str(e)) from e
        elements.append(PipelineElement(item, spec, options))
    return elements


def build_pass_manager(
    elements: list[PipelineElement], results: list[PassResult],
    on_pass: Callable[[PipelineElement], None] | None = None,
) -> passmanager.PassManager:
    """A PassManager running `elements` in order; our passes append their results to `results`."""
    pm = passmanager.PassManager("builtin.module")
    for element in elements:
        if element.spec is None:
            try:
                pm.add(element.text)
            except ValueError as e:
                raise InputError(f"unknown or malformed pass '{element.text}': {e}") from e
            continue

        def run(op, pass_, element=element):
            if on_pass is not None:
                on_pass(element)
            results.append(element.spec.run(op, element.options))

        pm.add(run, name=element.spec.name, argument=element.spec.name, description=element.spec.summary)
    return pm


def run_pipeline(module: ir.Module, text: str) -> list[PassResult]:
    """Parse and run `text` on `module` in place; return our passes' results."""
    results: list[PassResult] = []
    pm = build_pass_manager(parse_pipeline(text), results)
    pm.run(module.operation)
    return results
