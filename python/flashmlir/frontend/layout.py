"""Seeing through layout ops around Q, K and V: Kᵀ spelled as a transpose, GQA spelled as copies.

    transpose(K, -2, -1) | permute(K, [..., -1, -2])                       ⇒ K
    einsum('…qd,…kd->…qk', Q, K) is Q·Kᵀ, einsum('…qk,…kd->…qd', P, V) is P·V
    reshape(expand(unsqueeze(K, -3), [.., Hkv, n, S, D]), [.., Hkv·n, S, D])  ⇒ (K, n)   (HF repeat_kv)
    repeat_interleave(K, n, dim=-3)                                       ⇒ (K, n)

Peeling `repeat_kv` keeps GQA as GQA: our op reads each K/V head for its n query heads, so the
repeated tensors (n copies of K and V) are never built.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

aten = torch.ops.aten

_VIEWS = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_COPIES = {aten.clone.default, aten.contiguous.default}


def normalize_dim(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(val.shape) if isinstance(val, torch.Tensor) else None


def last_two_transposed(node: Any, rank: int) -> fx.Node | None:
    """If `node` swaps the last two dims of its input, return that input."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target == aten.transpose.int:
        dims = {normalize_dim(node.args[1], rank), normalize_dim(node.args[2], rank)}
        return node.args[0] if dims == {rank - 2, rank - 1} else None
    if node.target == aten.permute.default:
        perm = [normalize_dim(d, rank) for d in node.args[1]]
        swapped = list(range(rank - 2)) + [rank - 1, rank - 2]
        return node.args[0] if perm == swapped else None
    return None


def einsum_role(node: Any) -> str | None:
    """'qk' for einsum('…id,…jd->…ij') (Q·Kᵀ, K untransposed), 'pv' for einsum('…ij,…jd->…id')."""
    if not isinstance(node, fx.Node) or node.target != aten.einsum.default or len(node.args[1]) != 2:
        return None
    equation = node.args[0].replace(" ", "")
    if "->" not in equation or "." in equation:
        return None
    inputs, out = equation.split("->")
    a, b = inputs.split(",")
    if len(a) < 3 or len(a) != len(b) or len(out) != len(a) or a[:-2] != b[:-2] or out[:-2] != a[:-2]:
        return None
    (i, x), (j, y), (o1, o2) = a[-2:], b[-2:], out[-2:]
    if x == y and (o1, o2) == (i, j) and len({i, j, x}) == 3:
        return "qk"
    if x == j and (o1, o2) == (i, y) and len({i, x, y}) == 3:
        return "pv"
    return None


def peel_repeat_kv(node: fx.Node) -> tuple[fx.Node, int]:
    """(the un-repeated K or V, the group size n), or (node, 1) if it is not a head repeat."""
    if node.op != "call_function":
        return node, 1
    if node.target in (aten.repeat_interleave.self_int,):
        x, repeats = node.args[0], node.args[1]
        dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim")
        shape = _shape(x)
        if shape and isinstance(repeats, int) and dim is not None and normalize_dim(dim, len(shape)) == len(shape) - 3:
            return x, repeats
        return node, 1
    if node.target not in _VIEWS:
        return node, 1
    expanded = node.args[0]
    while isinstance(expanded, fx.Node) and expanded.target in _COPIES:
        expanded = expanded.args[0]
    if not isinstance(expanded, fx.Node) or expanded.target != aten.expand.default:
        return node, 1
    unsqueezed = expanded.args[0]
    if not isinstance(unsqueezed, fx.Node) or unsqueezed.target != aten.unsqueeze.default:
        return node, 1
    base = unsqueezed.args[0]
    base_shape, out_shape, wide = _shape(base), _shape(node), _shape(expanded)
    if not base_shape or not out_shape or not wide or len(base_shape) < 3:
        return node, 1
    rank = len(base_shape)
    head = rank - 3
    if normalize_dim(unsqueezed.args[1], rank + 1) != head + 1:
        return node, 1
    groups = wide[head + 1]
    expected_wide = (*base_shape[: head + 1], groups, *base_shape[head + 1:])
    expected_out = (*base_shape[:head], base_shape[head] * groups, *base_shape[head + 1:])
    if tuple(wide) != expected_wide or tuple(out_shape) != expected_out:
        return node, 1
    return base, groups
