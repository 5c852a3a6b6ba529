"""flashmlir-match-attention: raise attention written in torch-dialect IR to our attention op.

For IR that did not come through the FX matcher (an .mlir file, a torch.export program): the same
semantic walk as the FX matcher, anchored on each softmax. Three rewrites:

    torch.aten.scaled_dot_product_attention(q, k, v, M, 0.0, causal, s, gqa)
        ⇒ torch.operator "torch.flashmlir.attention"(q, k, v, M, 0.0, causal, s, none)

    matmul(softmax(matmul(Q, transpose(K, -2, -1)) · s [+ M | masked_fill(C, -inf)], -1), V)
        ⇒ torch.operator "torch.flashmlir.attention"(Q, K, V, M | not(C), 0.0, false, s, none)

    linalg.batch_matmul(linalg.softmax(s · linalg.batch_matmul(Q, Kᵀ), dim 2), V)     (linalg IR)
        ⇒ iree_linalg_ext.attention(Q, K, V, s)

In torch IR the ops between the two matmuls may be scalar multiplies/divides (folded into s), one
added mask or one masked_fill(-inf), and dtype casts; in linalg IR one elementwise scalar
multiply or divide. Anything else, a softmax over another axis, or an intermediate with a second
user (the weights escape) is declined with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.passes.framework import PassResult, PassSpec
from flashmlir.passes.ir_utils import (
    TorchTensorType,
    defining_op,
    erase_unused,
    f32_literal,
    producers_closure,
    splice_function,
    torch_constant,
    torch_tensor_type,
    walk_ops,
)

ATTENTION_OPERATOR = "torch.flashmlir.attention"
SOFTMAX_OPS = ("torch.aten.softmax.int", "torch.aten._softmax", "torch.aten._safe_softmax")
MATMUL_OPS = ("torch.aten.matmul", "torch.aten.bmm")
CAST_OPS = ("torch.aten.to.dtype", "torch.prims.convert_element_type", "torch.aten._to_copy")
SUPPORTED_DTYPES = ("f32", "f16", "bf16")
_MASKED_FILL_MAX = -1e4


@dataclass(frozen=True)
class Options:
    pass


class _Decline(Exception):
    pass


@dataclass
class _Match:
    q: ir.Value
    k: ir.Value
    v: ir.Value
    mask: ir.Value | None
    mask_is_fill_condition: bool
    is_causal: bool
    scale: float | None
    output: ir.Operation
    dead: list[ir.Operation]  # ops the rewrite makes dead, users before producers


def _type(value: ir.Value) -> TorchTensorType:
    t = torch_tensor_type(value.type)
    if t is None or not t.is_static:
        raise _Decline(f"needs static tensor shapes, got {value.type}")
    return t


def _const(value: ir.Value, what: str) -> int | float | bool | None:
    c = torch_constant(value)
    if c is None:
        raise _Decline(f"{what} is not a constant")
    return c.value


def _single_user(value: ir.Value, what: str) -> ir.Operation:
    users = [u.owner for u in value.uses]
    if len(users) != 1:
        raise _Decline(f"{what} has {len(users)} users, expected 1 (are the weights returned?)")
    return users[0]


def _check_qkv(q: ir.Value, k: ir.Value, v: ir.Value) -> None:
    qt, kt, vt = _type(q), _type(k), _type(v)
    if len({qt.dtype, kt.dtype, vt.dtype}) != 1:
        raise _Decline(f"q, k, v dtypes differ ({qt.dtype}, {kt.dtype}, {vt.dtype})")
    if qt.dtype not in SUPPORTED_DTYPES:
        raise _Decline(f"dtype {qt.dtype} is not supported ({', '.join(SUPPORTED_DTYPES)})")
    if qt.rank < 3 or kt.rank != qt.rank or vt.rank != qt.rank:
        raise _Decline(f"q, k, v must have the same rank >= 3, got {qt.shape}, {kt.shape}, {vt.shape}")
    if qt.shape[:-3] != kt.shape[:-3] or kt.shape[:-1] != vt.shape[:-1] or qt.shape[-1] != kt.shape[-1]:
        raise _Decline(f"q {qt.shape}, k {kt.shape}, v {vt.shape} do not line up as [.., H, S, D]")
    if qt.shape[-3] % kt.shape[-3]:
        raise _Decline(f"{qt.shape[-3]} query heads is not a multiple of {kt.shape[-3]} kv heads")


def _match_sdpa(op: ir.Operation) -> _Match:
    q, k, v, mask, dropout, causal, scale = list(op.operands)[:7]
    if _const(dropout, "dropout_p") != 0.0:
        raise _Decline("dropout_p is not 0 (dropout is not supported yet)")
    is_causal = bool(_const(causal, "is_causal"))
    scale_value = _const(scale, "scale")
    mask_value = None if torch_constant(mask) is not None else mask
    _check_qkv(q, k, v)
    return _Match(q, k, v, mask_value, False, is_causal, scale_value, op, [op])


def _last_two_transposed(value: ir.Value, rank: int) -> ir.Value | None:
    """If `value` is its input with the last two dims swapped, return that input."""
    op = defining_op(value)
    if op is None:
        return None
    if op.name == "torch.aten.transpose.int":
        dims = {_const(op.operands[1], "dim") % rank, _const(op.operands[2], "dim") % rank}
        return op.operands[0] if dims == {rank - 2, rank - 1} else None
    if op.name == "torch.aten.permute":
        perm_op = defining_op(op.operands[1])
        if perm_op is None or perm_op.name != "torch.prim.ListConstruct":
            return None
        perm = [_const(x, "permutation") % rank for x in perm_op.operands]
        return op.operands[0] if perm == [*range(rank - 2), rank - 1, rank - 2] else None
    return None


def _match_softmax(softmax: ir.Operation) -> _Match:
    x = softmax.operands[0]
    rank = _type(x).rank
    dim = _const(softmax.operands[1], "softmax dim") % rank
    if dim != rank - 1:
        raise _Decline(f"softmax on dim {dim}, expected the last (key) axis {rank - 1}")
    dead: list[ir.Operation] = []

    # Down: softmax → (casts) → P·V matmul.
    value = softmax.results[0]
    while True:
        user = _single_user(value, "the softmax output" if not dead else "a probability cast")
        if user.name in MATMUL_OPS:
            if user.operands[0] != value:
                raise _Decline("the probabilities are the right operand of the matmul")
            pv = user
            break
        if user.name not in CAST_OPS:
            raise _Decline(f"softmax output feeds {user.name}, not a P·V matmul")
        dead.append(user)
        value = user.results[0]
    dead = [pv, *reversed(dead), softmax]

    # Up: softmax input → scale / mask / casts → Q·Kᵀ matmul.
    scale, mask, fill = 1.0, None, False
    value = x
    while True:
        op = defining_op(value)
        if op is None:
            raise _Decline("the scores are a function argument, not a Q·Kᵀ matmul")
        if op.name in MATMUL_OPS:
            qk = op
            break
        _single_user(value, f"score op {op.name}")
        dead.append(op)
        if op.name in ("torch.aten.mul.Scalar", "torch.aten.div.Scalar"):
            factor = float(_const(op.operands[1], "the score scale"))
            scale = scale * factor if op.name.endswith("mul.Scalar") else scale / factor
            value = op.operands[0]
        elif op.name == "torch.aten.add.Tensor":
            if mask is not None:
                raise _Decline("more than one mask/bias is added to the scores")
            if _const(op.operands[2], "alpha") != 1:
                raise _Decline("the mask is added with alpha != 1")
            a, b = op.operands[0], op.operands[1]
            value, mask = (a, b) if _reaches_matmul(a) else (b, a)
        elif op.name == "torch.aten.masked_fill.Scalar":
            fill_value = _const(op.operands[2], "the masked_fill value")
            if mask is not None or fill_value is None or fill_value > _MASKED_FILL_MAX:
                raise _Decline(f"masked_fill with {fill_value}, expected -inf or a very negative value")
            value, mask, fill = op.operands[0], op.operands[1], True
        elif op.name in CAST_OPS:
            value = op.operands[0]
        else:
            raise _Decline(f"{op.name} between Q·Kᵀ and softmax is not understood")

    q, kt = qk.operands[0], qk.operands[1]
    k = _last_two_transposed(kt, rank)
    if k is None:
        raise _Decline("the right operand of Q·Kᵀ is not K with its last two dims swapped")
    dead.append(qk)
    kt_op = defining_op(kt)
    if kt_op is not None and len(list(kt.uses)) == 1:
        dead.append(kt_op)
    v = pv.operands[1]
    _check_qkv(q, k, v)
    if _type(q).shape[-3] != _type(k).shape[-3]:
        raise _Decline("q and k head counts differ without repeat_kv")
    if _type(pv.results[0]).dtype != _type(q).dtype:
        raise _Decline("the output dtype differs from q's")
    return _Match(q, k, v, mask, fill, False, scale, pv, dead)


def _reaches_matmul(value: ir.Value) -> bool:
    """Whether walking up first operands from `value` reaches a matmul within a few ops."""
    for _ in range(16):
        op = defining_op(value)
        if op is None or not op.operands:
            return False
        if op.name in MATMUL_OPS:
            return True
        value = op.operands[0]
    return False


def _constant(name: str, type_text: str, value: ir.Attribute | None = None) -> ir.Value:
    attrs = {"value": value} if value is not None else {}
    return ir.Operation.create(name, results=[ir.Type.parse(type_text)], attributes=attrs).result


def _rewrite(match: _Match) -> None:
    out = match.output
    with ir.InsertionPoint(out), out.location:
        mask = match.mask
        if mask is None:
            mask = _constant("torch.constant.none", "!torch.none")
        elif match.mask_is_fill_condition:
            mask = ir.Operation.create(
                "torch.aten.logical_not", results=[mask.type], operands=[mask]
            ).result
        f64 = ir.F64Type.get()
        dropout = _constant("torch.constant.float", "!torch.float", ir.FloatAttr.get(f64, 0.0))
        causal = _constant("torch.constant.bool", "!torch.bool", ir.BoolAttr.get(match.is_causal))
        if match.scale is None:
            scale = _constant("torch.constant.none", "!torch.none")
        else:
            scale = _constant("torch.constant.float", "!torch.float", ir.FloatAttr.get(f64, match.scale))
        seed = _constant("torch.constant.none", "!torch.none")
        attention = ir.Operation.create(
            "torch.operator",
            results=[out.results[0].type],
            operands=[match.q, match.k, match.v, mask, dropout, causal, scale, seed],
            attributes={"name": ir.StringAttr.get(ATTENTION_OPERATOR)},
        )
    out.results[0].replace_all_uses_with(attention.result)
    # Everything the match consumed, plus the constants (and int lists) that only it used.
    erase_unused(producers_closure(match.dead, _is_constant))


def _is_constant(op: ir.Operation) -> bool:
    return op.name.startswith("torch.constant.") or op.name == "torch.prim.ListConstruct"


# --- linalg IR ----------------------------------------------------------------------------------

_BMM_MAPS = ("(d0, d1, d3)", "(d0, d3, d2)", "(d0, d1, d2)")  # A (b,m,k), B (b,k,n), C (b,m,n)
_BMM_MAPS_TRANSPOSED_B = ("(d0, d1, d3)", "(d0, d2, d3)", "(d0, d1, d2)")


@dataclass
class _LinalgMatch:
    q: ir.Value
    k: ir.Value
    v: ir.Value
    scale: float
    output: ir.Operation
    dead: list[ir.Operation]


def _map_results(op: ir.Operation) -> tuple[str, ...]:
    return tuple(str(m).split("->")[1].strip().rstrip(">") for m in op.attributes["indexing_maps"])


def _zero_filled(value: ir.Value, what: str) -> ir.Operation:
    """The linalg.fill of 0 that `value` (a matmul's init) comes from; matmuls accumulate into it."""
    fill = defining_op(value)
    zero = defining_op(fill.operands[0]) if fill is not None and fill.name == "linalg.fill" else None
    if zero is None or zero.name != "arith.constant" or zero.attributes["value"].value != 0.0:
        raise _Decline(f"{what} accumulates into an init that is not a fill of 0")
    return fill


def _scalar_scale(op: ir.Operation) -> tuple[float, ir.Operation] | None:
    """(s, the constant op) if `op` is an elementwise `x * s` or `x / s` with a constant s."""
    if op.name != "linalg.generic" or len(op.operands) != 2 or len(set(_map_results(op))) != 1:
        return None
    body = list(op.regions[0].blocks[0].operations)
    if len(body) != 2 or body[0].name not in ("arith.mulf", "arith.divf") or body[1].name != "linalg.yield":
        return None
    arg = op.regions[0].blocks[0].arguments[0]
    lhs, rhs = body[0].operands
    other = rhs if lhs == arg else lhs if (rhs == arg and body[0].name == "arith.mulf") else None
    constant = defining_op(other) if other is not None else None
    if constant is None or constant.name != "arith.constant":
        return None
    value = constant.attributes["value"].value
    return (value if body[0].name == "arith.mulf" else 1.0 / value), constant


def _match_linalg_softmax(softmax: ir.Operation) -> _LinalgMatch:
    x = softmax.operands[0]
    rank = len(ir.RankedTensorType(x.type).shape)
    if softmax.attributes["dimension"].value != rank - 1:
        raise _Decline(f"softmax on dim {softmax.attributes['dimension'].value}, expected the last (key) axis {rank - 1}")
    pv = _single_user(softmax.results[0], "the softmax output")
    if pv.name != "linalg.batch_matmul" or _map_results(pv) != _BMM_MAPS or pv.operands[0] != softmax.results[0]:
        raise _Decline(f"softmax output feeds {pv.name}, not a P·V batch_matmul")
    dead = [pv, softmax]
    scale = 1.0
    scores = defining_op(x)
    if scores is not None and scores.name == "linalg.generic":
        found = _scalar_scale(scores)
        if found is None:
            raise _Decline("the op between Q·Kᵀ and softmax is not a multiply or divide by a constant")
        _single_user(scores.results[0], "the scaled scores")
        scale, constant = found
        dead = [*dead, scores, constant]
        scores = defining_op(scores.operands[0])
    if scores is None or scores.name != "linalg.batch_matmul":
        raise _Decline("the scores do not come from a batch_matmul")
    _single_user(scores.results[0], "the Q·Kᵀ scores")
    q, b = scores.operands[0], scores.operands[1]
    if _map_results(scores) == _BMM_MAPS_TRANSPOSED_B:
        k = b
    else:
        transpose = defining_op(b)
        if (_map_results(scores) != _BMM_MAPS or transpose is None or transpose.name != "linalg.transpose"
                or list(transpose.attributes["permutation"]) != [0, 2, 1]):
            raise _Decline("the right operand of Q·Kᵀ is not K with its last two dims swapped")
        k = transpose.operands[0]
        if len(list(b.uses)) == 1:
            dead.append(transpose)
    dead += [scores, _zero_filled(pv.operands[2], "P·V"), _zero_filled(scores.operands[2], "Q·Kᵀ")]
    v = pv.operands[1]
    types = [ir.RankedTensorType(t.type) for t in (q, k, v, pv.results[0])]
    if len({str(t.element_type) for t in types}) != 1 or str(types[0].element_type) not in SUPPORTED_DTYPES:
        raise _Decline("q, k, v and the output must share one element type (f32, f16 or bf16)")
    if not all(t.has_static_shape for t in types):
        raise _Decline("needs static shapes")
    return _LinalgMatch(q, k, v, scale, pv, dead)


def _rewrite_linalg(match: _LinalgMatch) -> None:
    qt, kt, vt = (str(x.type) for x in (match.q, match.k, match.v))
    out = str(match.output.results[0].type)
    maps = ", ".join(f"affine_map<(b, m, n, k1, k2) -> ({r})>"
                     for r in ("b, m, k1", "b, k2, k1", "b, k2, n", "", "b, m, n"))
    function = f"""func.func @raised(%q: {qt}, %k: {kt}, %v: {vt}) -> {out} {{
  %scale = arith.constant {f32_literal(match.scale)} : f32
  %init = tensor.empty() : {out}
  %o = iree_linalg_ext.attention <indexing_maps = [{maps}]> ins(%q, %k, %v, %scale : {qt}, {kt}, {vt}, f32)
      outs(%init : {out}) {{
  ^bb0(%score: f32):
    iree_linalg_ext.yield %score : f32
  }} -> {out}
  return %o : {out}
}}"""
    # The rest of the chain and its inits, collected before the splice erases the output op.
    leftovers = producers_closure(
        [*match.dead[1:], *(p for p in map(defining_op, match.output.operands) if p is not None and _is_init(p))],
        _is_init,
    )
    splice_function(match.output, function, [match.q, match.k, match.v])
    erase_unused(leftovers)


def _is_init(op: ir.Operation) -> bool:
    return op.name in ("tensor.empty", "linalg.fill", "arith.constant")


# --- the pass ----------------------------------------------------------------------------------

def run(module: ir.Operation, options: Options) -> PassResult:
    result = PassResult(PASS.name)
    candidates = walk_ops(module, "torch.aten.scaled_dot_product_attention")
    for name in SOFTMAX_OPS:
        candidates += walk_ops(module, name)
    for op in candidates:
        try:
            match = _match_sdpa(op) if op.name.endswith("scaled_dot_product_attention") else _match_softmax(op)
        except _Decline as why:
            result.decline(op, str(why))
            continue
        _rewrite(match)
        result.rewritten += 1
    for op in walk_ops(module, "linalg.softmax"):
        try:
            linalg_match = _match_linalg_softmax(op)
        except _Decline as why:
            result.decline(op, str(why))
            continue
        _rewrite_linalg(linalg_match)
        result.rewritten += 1
    return result


PASS = PassSpec(
    name="flashmlir-match-attention",
    summary="Raise SDPA and softmax(Q·Kᵀ·s + M)·V (torch IR) / batch_matmul-softmax-batch_matmul (linalg IR)",
    options_type=Options,
    run=run,
)
