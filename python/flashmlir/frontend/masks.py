"""What the masks of an attention site mean, and how they become our op's one mask.

A site may carry several masks (T5 adds a position bias and a padding mask; GPT-2 4.x selects with
a causal buffer and adds a padding mask). Each is one of

    additive   scores + M
    keep       a bool mask, True where a query may attend (SDPA's convention, our op's)
    drop       a masked_fill(-inf) condition, True where it may not

`recover_causal` evaluates every mask that depends on no graph input (built from `arange`,
comparisons and constants, as transformers' masking utilities build the causal mask) or only on
inputs whose values the caller vouches for (`known`: a module's buffers, such as GPT-2's `tril`
mask; the caller must check them on every call, `dynamo/assumed_inputs.py`) and, when it is
exactly the top-left causal pattern, turns it into `is_causal` so kernels skip masked blocks instead
of reading an S×S mask. Only an exact match counts: a mask that mixes causality with padding stays
a mask, since folding it would change rows whose every key is masked.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensor, unset_fake_temporarily

aten = torch.ops.aten

NEVER = -1e30  # an additive value at or below this means "never attend" (finfo.min, -inf)
MAX_EVALUATED_ELEMENTS = 1 << 26  # evaluating larger constant masks costs more than it saves


@dataclass(frozen=True)
class Mask:
    node: fx.Node
    kind: str  # "additive" | "keep" | "drop"


def _constant_ancestors(node: fx.Node, known: Mapping[fx.Node, torch.Tensor]) -> list[fx.Node] | None:
    """`node`'s ancestors in topological order if none is a graph input outside `known`, else None."""
    seen: set[fx.Node] = set()
    order: list[fx.Node] = []

    def visit(n: fx.Node) -> bool:
        if n in seen:
            return True
        seen.add(n)
        if n.op == "placeholder" and n not in known:
            return False
        for arg in n.all_input_nodes:
            if not visit(arg):
                return False
        order.append(n)
        return True

    return order if visit(node) else None


def static_value(gm: fx.GraphModule, node: fx.Node,
                 known: Mapping[fx.Node, torch.Tensor] | None = None) -> torch.Tensor | None:
    """The value of `node` if it is computed from constants and `known` inputs alone (and small
    enough), else None."""
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() > MAX_EVALUATED_ELEMENTS:
        return None
    order = _constant_ancestors(node, known or {})
    if order is None:
        return None
    env: dict[fx.Node, object] = {}
    with unset_fake_temporarily():  # dynamo may be tracing with fake tensors around us
        for n in order:
            if n.op == "placeholder":
                env[n] = known[n]
                continue
            if n.op == "get_attr":
                env[n] = getattr(gm, n.target)
                continue
            if n.op != "call_function":
                return None
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), lambda a: env[a])
            try:
                env[n] = n.target(*args, **kwargs)
            except Exception:  # noqa: BLE001 - an op we cannot run here: not a constant we know
                return None
    result = env[node]
    if not isinstance(result, torch.Tensor) or isinstance(result, FakeTensor):
        return None
    return result


def _allowed(value: torch.Tensor, kind: str) -> torch.Tensor | None:
    """The bool 'may attend' tensor a mask value stands for, or None if it is not all-or-nothing."""
    if kind == "keep":
        return value if value.dtype == torch.bool else None
    if kind == "drop":
        return ~value if value.dtype == torch.bool else None
    if value.is_floating_point():
        zero, never = value == 0, value <= NEVER
        return zero if bool((zero | never).all()) else None
    return None


def is_causal_pattern(value: torch.Tensor, kind: str) -> bool:
    """Whether the mask lets query i attend exactly the keys j <= i, everywhere it broadcasts."""
    allowed = _allowed(value, kind)
    if allowed is None or allowed.dim() < 2:
        return False
    sq, sk = allowed.shape[-2:]
    causal = torch.ones(sq, sk, dtype=torch.bool, device=allowed.device).tril()
    return bool((allowed == causal).all())


def is_no_op(value: torch.Tensor, kind: str) -> bool:
    allowed = _allowed(value, kind)
    return allowed is not None and bool(allowed.all())


def recover_causal(gm: fx.GraphModule, masks: list[Mask], known: Mapping[fx.Node, torch.Tensor] | None = None,
                   ) -> tuple[bool, list[Mask], tuple[fx.Node, ...]]:
    """(is_causal, the masks still needed, the `known` inputs whose values that relies on):
    constant masks that are causal or no-ops go away."""
    known = known or {}
    causal, rest, assumed = False, [], []
    for mask in masks:
        value = static_value(gm, mask.node, known)
        if value is not None and is_causal_pattern(value, mask.kind):
            causal = True
        elif value is None or not is_no_op(value, mask.kind):
            rest.append(mask)
            continue
        assumed += [n for n in _constant_ancestors(mask.node, known) if n.op == "placeholder" and n not in assumed]
    return causal, rest, tuple(assumed)


def combine(graph: fx.Graph, masks: list[Mask]) -> fx.Node | None:
    """One mask for our op (insert at the graph's current insertion point): bool or additive."""
    if not masks:
        return None
    if len(masks) == 1:
        (mask,) = masks
        if mask.kind == "drop":
            return graph.call_function(aten.logical_not.default, (mask.node,))
        return mask.node
    total = None
    for mask in masks:
        node = mask.node
        if mask.kind == "keep":
            node = graph.call_function(aten.where.Scalar, (node, 0.0, float("-inf")))
        elif mask.kind == "drop":
            node = graph.call_function(aten.where.Scalar, (node, float("-inf"), 0.0))
        total = node if total is None else graph.call_function(aten.add.Tensor, (total, node))
    return total


def describe(masks: list[Mask]) -> str:
    names = {"additive": "additive", "keep": "boolean", "drop": "boolean"}
    return "+".join(names[m.kind] for m in masks) or "none"
