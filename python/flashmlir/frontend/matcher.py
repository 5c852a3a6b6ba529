"""Find attention in a pre-dispatch ATen FX graph and replace it with `flashmlir::attention`.

The matcher is semantic, not a library of templates: it anchors on each softmax, walks up the
single-use "score expression" to the Q·Kᵀ matmul, classifying every op on the way (scale, mask,
cast), and walks down the "probability expression" to the P·V matmul. SDPA calls are matched
directly. Every site becomes an `AttentionSite` (what `flashmlir.explain` lists); every softmax
that is not attention we can compile becomes a `NearMiss` with the reason, never a silent skip.

Families (docs/MATCHER.md has examples and the tests that cover them):
  sdpa                  F.scaled_dot_product_attention(q, k, v, attn_mask=?, is_causal=?, scale=?)
  matmul-softmax-matmul softmax(q @ k.transpose(-2, -1) {* s | / s} [+ biases | masked_fill]) @ v

Around both: K and V repeated per query head (`repeat_kv`) are peeled back to GQA
(`frontend/layout.py`), and masks built from constants that are exactly causal become
`is_causal` (`frontend/masks.py`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from flashmlir.frontend.attention_op import attention_overload, default_scale
from flashmlir.frontend.layout import einsum_role, last_two_transposed, normalize_dim, peel_repeat_kv
from flashmlir.frontend.masks import Mask, combine, describe, recover_causal, static_value

aten = torch.ops.aten
Known = Mapping[fx.Node, torch.Tensor]

SOFTMAX_OPS = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
MATMUL_OPS = {aten.matmul.default, aten.bmm.default}
SDPA_OPS = {aten.scaled_dot_product_attention.default}
# Ops on the score/probability path that change nothing but precision or aliasing.
PASSTHROUGH_OPS = {
    aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.alias.default,
    aten.contiguous.default,
}
SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_SCALE_OPS = {aten.mul.Tensor, aten.mul.Scalar, aten.div.Tensor, aten.div.Scalar}
# A fill value this low is "never attend" (HF uses finfo(dtype).min, nanoGPT -inf).
_MASKED_FILL_MAX = -1e4


@dataclass
class AttentionSite:
    """One attention computation found in a graph: what explain() shows, and what to rewrite."""

    family: str
    q_shape: tuple[int, ...]
    k_shape: tuple[int, ...]
    v_shape: tuple[int, ...]
    dtype: str
    is_causal: bool
    mask_kind: str  # "none", "additive", "boolean", or several joined by "+"
    mask_shape: tuple[int, ...] | None  # the shape the masks broadcast to together
    scale: float
    gqa_groups: int
    dropout_p: float
    location: str
    # How to rewrite the graph (not part of the report).
    q: fx.Node = field(repr=False, compare=False, default=None)
    k: fx.Node = field(repr=False, compare=False, default=None)
    v: fx.Node = field(repr=False, compare=False, default=None)
    masks: list[Mask] = field(repr=False, compare=False, default_factory=list)
    output: fx.Node = field(repr=False, compare=False, default=None)
    # Graph inputs whose values the rewrite relies on (a causal mask buffer folded into is_causal).
    assumes: tuple[fx.Node, ...] = field(repr=False, compare=False, default=())


@dataclass
class NearMiss:
    """A softmax or SDPA call that looked like attention but is not compiled, and why."""

    family: str
    location: str
    reason: str


@dataclass
class MatchResult:
    sites: list[AttentionSite] = field(default_factory=list)
    near_misses: list[NearMiss] = field(default_factory=list)

    def assumed_inputs(self) -> list[fx.Node]:
        """The graph inputs whose values some site's rewrite relies on, in graph order."""
        return list(dict.fromkeys(n for site in self.sites for n in site.assumes))


class _Decline(Exception):
    """Raised inside a match to stop it with a reason (becomes a NearMiss)."""


def _val(node: Any) -> torch.Tensor | None:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _shape(node: fx.Node) -> tuple[int, ...]:
    val = _val(node)
    if not isinstance(val, torch.Tensor):
        raise _Decline(f"no tensor metadata on {node.name}")
    try:
        return tuple(int(d) for d in val.shape)
    except (TypeError, ValueError) as e:
        raise _Decline(f"dynamic shape {tuple(val.shape)} on {node.name}") from e


def location_of(node: fx.Node) -> str:
    """'file.py:LINE in fn (node NAME)' from the node's stack trace, or just the node name."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip().startswith("File ")]
    if lines:
        # 'File "/path/model.py", line 12, in forward'
        parts = lines[-1].split(",")
        path = parts[0].split('"')[1] if '"' in parts[0] else parts[0]
        where = f"{path.rsplit('/', 1)[-1]}:{parts[1].strip().removeprefix('line ')}"
        fn = parts[2].strip().removeprefix("in ") if len(parts) > 2 else ""
        return f"{where} in {fn} ({node.name})" if fn else f"{where} ({node.name})"
    return node.name


def _arg(node: fx.Node, index: int, name: str, default: Any) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_dtypes(*nodes: fx.Node) -> str:
    dtypes = {_val(n).dtype for n in nodes}
    if len(dtypes) != 1:
        raise _Decline(f"q, k, v have different dtypes {sorted(str(d) for d in dtypes)}")
    (dtype,) = dtypes
    if dtype not in SUPPORTED_DTYPES:
        raise _Decline(f"dtype {dtype} is not supported (float32, float16, bfloat16)")
    return str(dtype).removeprefix("torch.")


def _check_masks(masks: list[Mask], scores: tuple[int, ...]) -> tuple[str, tuple[int, ...] | None]:
    if not masks:
        return "none", None
    shapes = [_shape(m.node) for m in masks]
    try:
        joint = tuple(torch.broadcast_shapes(*shapes))
        if torch.broadcast_shapes(joint, scores) != torch.Size(scores):
            raise RuntimeError
    except RuntimeError as e:
        raise _Decline(f"mask {shapes} does not broadcast to the scores {scores}") from e
    for m in masks:
        if m.kind != "additive" and _val(m.node).dtype != torch.bool:
            raise _Decline(f"a boolean mask of dtype {_val(m.node).dtype}")
    return describe(masks), joint


def _gqa_operands(k: fx.Node, v: fx.Node) -> tuple[fx.Node, fx.Node, int]:
    """K and V with any per-query-head repeat peeled off, and the group size."""
    k_base, k_groups = peel_repeat_kv(k)
    v_base, v_groups = peel_repeat_kv(v)
    if k_groups != v_groups:
        return k, v, 1
    return k_base, v_base, k_groups


def _check_qkv(q: fx.Node, k: fx.Node, v: fx.Node) -> int:
    """Check the shapes fit flashmlir::attention; return the GQA group size."""
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if len(qs) < 3 or len(ks) != len(qs) or len(vs) != len(qs):
        raise _Decline(f"q, k, v must have the same rank >= 3, got {qs}, {ks}, {vs}")
    if qs[:-3] != ks[:-3] or ks[:-1] != vs[:-1] or qs[-1] != ks[-1]:
        raise _Decline(f"q {qs}, k {ks}, v {vs} do not line up as [.., H, S, D]")
    if qs[-3] % ks[-3] != 0:
        raise _Decline(f"{qs[-3]} query heads is not a multiple of {ks[-3]} key/value heads")
    return qs[-3] // ks[-3]


def _match_sdpa(gm: fx.GraphModule, node: fx.Node, known: Known) -> AttentionSite:
    q, k, v = node.args[:3]
    mask = _arg(node, 3, "attn_mask", None)
    dropout_p = float(_arg(node, 4, "dropout_p", 0.0))
    is_causal = bool(_arg(node, 5, "is_causal", False))
    scale = node.kwargs.get("scale")
    if scale is not None and not _is_number(scale):
        raise _Decline("scale is not a constant number")
    if is_causal and mask is not None:
        raise _Decline("is_causal together with attn_mask is rejected by SDPA itself")
    k, v, _ = _gqa_operands(k, v)
    dtype = _check_dtypes(q, k, v)
    groups = _check_qkv(q, k, v)
    masks = [] if mask is None else [Mask(mask, "keep" if _val(mask).dtype == torch.bool else "additive")]
    recovered, masks, assumes = recover_causal(gm, masks, known)
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    mask_kind, mask_shape = _check_masks(masks, (*qs[:-1], ks[-2]))
    return AttentionSite(
        family="sdpa", q_shape=qs, k_shape=ks, v_shape=vs, dtype=dtype, is_causal=is_causal or recovered,
        mask_kind=mask_kind, mask_shape=mask_shape,
        scale=default_scale(qs[-1]) if scale is None else float(scale),
        gqa_groups=groups, dropout_p=dropout_p, location=location_of(node),
        q=q, k=k, v=v, masks=masks, output=node, assumes=assumes,
    )


def _single_user(node: fx.Node, what: str) -> fx.Node:
    users = list(node.users)
    if len(users) != 1:
        names = ", ".join(u.name for u in users)
        raise _Decline(f"{what} ({node.name}) has {len(users)} users ({names}), expected 1")
    return users[0]


def _constant_number(gm: fx.GraphModule, x: Any) -> float | None:
    """x as a number if it is one, or a 0-d tensor computed from constants (torch.full([], c))."""
    if _is_number(x):
        return float(x)
    if isinstance(x, fx.Node) and isinstance(_val(x), torch.Tensor) and _val(x).dim() == 0:
        value = static_value(gm, x)
        if value is not None and value.is_floating_point():
            return float(value)
    return None


def _walk_scores(gm: fx.GraphModule, softmax_in: fx.Node) -> tuple[fx.Node, float, list[Mask]]:
    """Walk from the softmax input up to the Q·Kᵀ matmul.

    Returns (matmul, scale, masks): the scale is the product of every constant multiplier on
    the way; the masks are the tensors added to the scores and the conditions of
    masked_fill(-inf).
    """
    scale = 1.0
    masks: list[Mask] = []
    node = softmax_in
    while True:
        if not isinstance(node, fx.Node) or node.op != "call_function":
            raise _Decline(f"scores come from {node}, not from a Q·Kᵀ matmul")
        if node.target in MATMUL_OPS or einsum_role(node) == "qk":
            return node, scale, masks
        _single_user(node, "a score op")
        target, args = node.target, node.args
        numbers = [_constant_number(gm, a) for a in args[:2]] if target in _SCALE_OPS else []
        if target in (aten.mul.Tensor, aten.mul.Scalar) and any(n is not None for n in numbers):
            i = 0 if numbers[0] is not None else 1
            scale *= numbers[i]
            node = args[1 - i]
        elif target in (aten.div.Tensor, aten.div.Scalar) and numbers[1] is not None:
            scale /= numbers[1]
            node = args[0]
        elif target in (aten.mul.Tensor, aten.div.Tensor):
            raise _Decline("the scores are scaled by a tensor, not a constant")
        elif target in (aten.where.self, aten.where.ScalarOther) and _leads_to_matmul(args[1]):
            fill = _constant_number(gm, args[2])
            if fill is None or fill > _MASKED_FILL_MAX:
                raise _Decline(f"where(cond, scores, {args[2]}) does not mask with a very negative value")
            masks.append(Mask(args[0], "keep"))
            node = args[1]
        elif target == aten.add.Tensor and node.kwargs.get("alpha", 1) == 1:
            a, b = args
            chain, other = (a, b) if _leads_to_matmul(a) else (b, a)
            if not isinstance(other, fx.Node):
                raise _Decline("a constant is added to the scores")
            masks.append(Mask(other, "additive"))
            node = chain
        elif target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor):
            value = args[2]
            if not (_is_number(value) and value <= _MASKED_FILL_MAX):
                raise _Decline(f"masked_fill with {value!r}, expected -inf or a very negative value")
            masks.append(Mask(args[1], "drop"))
            node = args[0]
        elif target in PASSTHROUGH_OPS:
            node = args[0]
        else:
            raise _Decline(f"{_op_name(node)} between Q·Kᵀ and softmax is not understood")


def _leads_to_matmul(node: Any, depth: int = 16) -> bool:
    """Whether `node` is on the score side: score ops above it reach the Q·Kᵀ matmul."""
    if depth == 0 or not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    if node.target in MATMUL_OPS or einsum_role(node) == "qk":
        return True
    if node.target in (aten.where.self, aten.where.ScalarOther):
        return _leads_to_matmul(node.args[1], depth - 1)
    if node.target in (aten.masked_fill.Scalar, aten.masked_fill.Tensor) or node.target in PASSTHROUGH_OPS:
        return _leads_to_matmul(node.args[0], depth - 1)
    if node.target in _SCALE_OPS or node.target == aten.add.Tensor:
        return any(_leads_to_matmul(a, depth - 1) for a in node.args[:2])
    return False


def _walk_probabilities(softmax: fx.Node) -> tuple[fx.Node, float]:
    """Walk from softmax down to the P·V matmul through casts and dropout; (matmul, dropout p)."""
    node, dropout_p = softmax, 0.0
    while True:
        user = _single_user(node, "the softmax output" if node is softmax else "a probability op")
        if user.target in MATMUL_OPS or einsum_role(user) == "pv":
            operands = user.args[1] if user.target == aten.einsum.default else user.args
            if operands[0] is not node:
                raise _Decline("the probabilities are the right operand of the matmul (P·V expected)")
            return user, dropout_p
        if user.target == aten.dropout.default:
            p, train = float(user.args[1]), bool(user.args[2])
            if train and p > 0.0:
                if dropout_p:
                    raise _Decline("dropout applied twice to the probabilities")
                dropout_p = p
        elif user.target not in PASSTHROUGH_OPS:
            raise _Decline(f"softmax output feeds {_op_name(user)}, not a P·V matmul")
        node = user


def _op_name(node: fx.Node) -> str:
    target = node.target
    return getattr(target, "__name__", None) or str(target)


def _match_softmax(gm: fx.GraphModule, softmax: fx.Node, known: Known) -> AttentionSite:
    x = softmax.args[0]
    rank = len(_shape(x))
    dim = normalize_dim(int(softmax.args[1]), rank)
    if dim != rank - 1:
        raise _Decline(f"softmax on dim {dim}, expected the last (key) axis {rank - 1}")
    qk, scale, masks = _walk_scores(gm, x)
    pv, dropout_p = _walk_probabilities(softmax)
    if qk.target == aten.einsum.default:
        q, k = qk.args[1]
    else:
        q, kt = qk.args
        k = last_two_transposed(kt, rank)
        if k is None:
            raise _Decline("the right operand of Q·Kᵀ is not K with its last two dims swapped")
    v = pv.args[1][1] if pv.target == aten.einsum.default else pv.args[1]
    k, v, _ = _gqa_operands(k, v)
    dtype = _check_dtypes(q, k, v)
    groups = _check_qkv(q, k, v)
    qs, ks, vs = _shape(q), _shape(k), _shape(v)
    if _val(pv).dtype != _val(q).dtype:
        raise _Decline(f"output dtype {_val(pv).dtype} differs from q's {_val(q).dtype}")
    is_causal, masks, assumes = recover_causal(gm, masks, known)
    mask_kind, mask_shape = _check_masks(masks, (*qs[:-1], ks[-2]))
    return AttentionSite(
        family="matmul-softmax-matmul", q_shape=qs, k_shape=ks, v_shape=vs, dtype=dtype,
        is_causal=is_causal, mask_kind=mask_kind, mask_shape=mask_shape, scale=scale,
        gqa_groups=groups, dropout_p=dropout_p, location=location_of(softmax),
        q=q, k=k, v=v, masks=masks, output=pv, assumes=assumes,
    )


_MATCHERS: list[tuple[set, str, Callable[[fx.GraphModule, fx.Node, Known], AttentionSite]]] = [
    (SDPA_OPS, "sdpa", _match_sdpa),
    (SOFTMAX_OPS, "matmul-softmax-matmul", _match_softmax),
]


def find_attention(gm: fx.GraphModule, known: Known | None = None) -> MatchResult:
    """Every attention site and near miss in `gm`, in graph order. Does not change the graph.

    `known`: placeholders whose values (given) a mask may be evaluated from; a site that relies
    on one lists it in `assumes`, and the caller must check it on every call.
    """
    known = known or {}
    result = MatchResult()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        for targets, family, match in _MATCHERS:
            if node.target in targets:
                try:
                    result.sites.append(match(gm, node, known))
                except _Decline as why:
                    result.near_misses.append(NearMiss(family, location_of(node), str(why)))
    return result


def replace_attention(gm: fx.GraphModule, sites: list[AttentionSite]) -> None:
    """Put one `flashmlir::attention` call in place of each site's output; drop what is dead."""
    graph = gm.graph
    op = attention_overload()
    for site in sites:
        with graph.inserting_before(site.output):
            mask = combine(graph, site.masks)
            seed = None
            if site.dropout_p > 0.0:  # a fresh seed per call; the backward replays its mask
                seed = graph.call_function(aten.randint.low, (0, 2**31 - 1, []),
                                           {"dtype": torch.int64, "device": _val(site.q).device})
            node = graph.call_function(
                op, (site.q, site.k, site.v, mask, site.dropout_p, site.is_causal, site.scale, seed)
            )
            node.meta.update({k: site.output.meta[k] for k in ("stack_trace",) if k in site.output.meta})
            node = _with_layout_of(graph, node, _val(site.output))
        site.output.replace_all_uses_with(node)
    graph.eliminate_dead_code()
    graph.lint()
    gm.recompile()


def _with_layout_of(graph: fx.Graph, node: fx.Node, original: torch.Tensor | None) -> fx.Node:
    """`node`, laid out in memory like `original` (the output of the op it replaces).

    The graph after the replaced op was traced against that op's strides: CPU SDPA, for one,
    returns [B, S, H, D] memory order, so a later `.transpose(1, 2).contiguous().view(...)` was
    traced without the (then no-op) copy. Our op returns row-major [B, H, S, D]; reproduce the
    original order with permute → contiguous clone → inverse permute (free in value semantics).
    """
    if not isinstance(original, torch.Tensor) or original.is_contiguous():
        return node
    strides = [int(s) for s in original.stride()]
    order = sorted(range(original.dim()), key=lambda d: -strides[d])  # outermost dim first
    inverse = sorted(range(original.dim()), key=lambda d: order[d])
    permuted = graph.call_function(aten.permute.default, (node, order))
    dense = graph.call_function(aten.clone.default, (permuted,), {"memory_format": torch.contiguous_format})
    return graph.call_function(aten.permute.default, (dense, inverse))


def count_by_family(sites: list[AttentionSite]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for s in sites:
        counts[s.family] = counts.get(s.family, 0) + 1
    return counts


__all__ = [
    "AttentionSite", "MatchResult", "NearMiss", "count_by_family", "find_attention",
    "location_of", "replace_attention",
]
