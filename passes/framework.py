"""What every flashmlir pass is: a name, a frozen options dataclass, and a run function.

A pass is a thin driver over rewrite functions: it walks the module, asks each candidate op's
rewrite to match, and collects a `Decline` (op + reason) for every candidate it leaves alone.
Those reasons surface in `flashmlir-opt --debug`, in compile logs and in `flashmlir.explain`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from iree.compiler import ir


@dataclass(frozen=True)
class Decline:
    """A candidate op a pass did not rewrite, and why."""

    op: str
    reason: str

    def __str__(self) -> str:
        return f"{self.op}: {self.reason}"


@dataclass
class PassResult:
    pass_name: str
    rewritten: int = 0
    declined: list[Decline] = field(default_factory=list)

    def decline(self, op: ir.Operation, reason: str) -> None:
        self.declined.append(Decline(describe_op(op), reason))


@dataclass(frozen=True)
class PassSpec:
    """A registered pass. `name` is its flag (`--flashmlir-tile-attention`)."""

    name: str
    summary: str
    options_type: type
    run: Callable[[ir.Operation, Any], PassResult]

    def parse_options(self, text: str) -> Any:
        """Options from MLIR's textual form, `key=value key2=value2` (dashes or underscores)."""
        fields = {f.name: f for f in dataclasses.fields(self.options_type)}
        values: dict[str, Any] = {}
        for item in text.split():
            key, sep, raw = item.partition("=")
            name = key.replace("-", "_")
            if not sep or name not in fields:
                known = ", ".join(f.replace("_", "-") for f in fields) or "none"
                raise ValueError(f"{self.name}: unknown option '{item}' (options: {known})")
            values[name] = _convert(raw, fields[name].type, f"{self.name} option {key}")
        return self.options_type(**values)


def _convert(raw: str, annotation: Any, what: str) -> Any:
    kind = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", str(annotation))
    try:
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("bool"):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "1")
        if kind.startswith("float"):
            return float(raw)
    except ValueError as e:
        raise ValueError(f"{what}: cannot read '{raw}' as {kind}") from e
    return raw


def describe_op(op: ir.Operation) -> str:
    """'op.name at file:line:col' — enough for a person to find the op."""
    op = op.operation if hasattr(op, "operation") else op
    loc = str(op.location)
    return f"{op.name} {loc}" if loc and loc != "loc(unknown)" else op.name
