"""flashmlir-lower-attention: torch.flashmlir.attention ⇒ iree_linalg_ext.attention on tensors.

    torch.operator "torch.flashmlir.attention"(Q[*,Hq,Sq,D], K[*,Hkv,Sk,D], V[*,Hkv,Sk,Dv], M, 0, c, s)
        ⇒ iree_linalg_ext.attention over (*, Hkv, G, m, n, k1, k2) with Q viewed as [*,Hkv,G,Sq,D]

The result is IR every IREE target can compile as it stands, and the input of our target passes:
- GQA stays GQA: Q and the output get a free `expand_shape` of the head dim into (Hkv, G) and K/V
  are indexed without the group dim, so no repeated K/V tensor ever exists.
- Broadcast dims of the mask are dropped (not materialized); a boolean mask becomes additive.
- Causality becomes the mask operand's producer, a `linalg.generic` computing
  `select(k2 <= m, M or 0, -inf)` from loop indices. It is correct on its own (stock IREE would
  materialize it), and flashmlir-tile-attention recognizes it to skip masked blocks instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.passes.framework import PassResult, PassSpec
from flashmlir.passes.ir_utils import (
    NEG_INF_LITERAL,
    TorchTensorType,
    f32_literal,
    parallel_iterators,
    splice_function,
    tensor_type,
    torch_constant,
    torch_tensor_type,
    walk_ops,
)

ATTENTION_OPERATOR = "torch.flashmlir.attention"
SUPPORTED_DTYPES = ("f32", "f16", "bf16")
NEG_INF = float("-inf")


@dataclass(frozen=True)
class Options:
    pass


class _Decline(Exception):
    pass


def _dims(names: list[str]) -> str:
    return ", ".join(names)


def _map(all_dims: list[str], results: list[str]) -> str:
    return f"affine_map<({_dims(all_dims)}) -> ({_dims(results)})>"


@dataclass
class _Plan:
    """Everything the template needs, worked out from the op's operand types."""

    q: TorchTensorType
    k: TorchTensorType
    v: TorchTensorType
    mask: TorchTensorType | None
    out: TorchTensorType
    is_causal: bool
    scale: float

    @property
    def lead(self) -> list[int]:
        return list(self.q.shape[:-3])

    @property
    def groups(self) -> int:
        return self.q.shape[-3] // self.k.shape[-3]


def _plan(op: ir.Operation) -> _Plan:
    operands = list(op.operands)
    if len(operands) not in (7, 8):  # (..., scale[, dropout_seed])
        raise _Decline(f"expected 7 or 8 operands, got {len(operands)}")
    q, k, v, mask, dropout, causal, scale = operands[:7]
    types = [torch_tensor_type(x.type) for x in (q, k, v)]
    if any(t is None or not t.is_static for t in types):
        raise _Decline("dynamic shapes are not supported yet (q, k, v must be static)")
    qt, kt, vt = types
    if qt.dtype not in SUPPORTED_DTYPES or kt.dtype != qt.dtype or vt.dtype != qt.dtype:
        raise _Decline(f"dtypes {qt.dtype}/{kt.dtype}/{vt.dtype}: supported are {', '.join(SUPPORTED_DTYPES)}")
    consts = {name: torch_constant(x) for name, x in (("dropout_p", dropout), ("is_causal", causal), ("scale", scale))}
    for name, c in consts.items():
        if c is None:
            raise _Decline(f"{name} is not a constant")
    if consts["dropout_p"].value not in (0, 0.0):
        raise _Decline("dropout_p > 0 is not supported yet")
    mt = None
    if torch_constant(mask) is None:
        mt = torch_tensor_type(mask.type)
        if mt is None or not mt.is_static:
            raise _Decline("the mask must have a static shape")
        if mt.dtype not in (*SUPPORTED_DTYPES, "i1"):
            raise _Decline(f"mask dtype {mt.dtype} is not supported (bool or float)")
    out = torch_tensor_type(op.results[0].type)
    scale_value = consts["scale"].value
    if scale_value is None:
        scale_value = qt.shape[-1] ** -0.5
    return _Plan(qt, kt, vt, mt, out, bool(consts["is_causal"].value), float(scale_value))


def _function(plan: _Plan) -> str:
    """The MLIR function that replaces the op: casts, views, mask, attention, casts back."""
    elem = plan.q.builtin().rsplit("x", 1)[1].rstrip(">")
    lead, g = plan.lead, plan.groups
    hkv, sq, d = plan.k.shape[-3], plan.q.shape[-2], plan.q.shape[-1]
    dv = plan.v.shape[-1]

    batch = [f"b{i}" for i in range(len(lead))] + ["h"] + (["g"] if g > 1 else [])
    kv_batch = batch[: len(lead) + 1]
    dims = [*batch, "m", "n", "k1", "k2"]
    batch_sizes = [*lead, hkv] + ([g] if g > 1 else [])
    q5 = [*batch_sizes, sq, d]
    o5 = [*batch_sizes, sq, dv]

    args = [f"%q: {plan.q.torch()}", f"%k: {plan.k.torch()}", f"%v: {plan.v.torch()}"]
    if plan.mask is not None:
        args.append(f"%mask: {plan.mask.torch()}")
    lines = [
        f"%bq = torch_c.to_builtin_tensor %q : {plan.q.torch()} -> {plan.q.builtin()}",
        f"%bk = torch_c.to_builtin_tensor %k : {plan.k.torch()} -> {plan.k.builtin()}",
        f"%bv = torch_c.to_builtin_tensor %v : {plan.v.torch()} -> {plan.v.builtin()}",
    ]
    head = len(lead)  # position of the head dim in q / out
    group_reassoc = [[i] for i in range(head)] + [[head, head + 1], [head + 2], [head + 3]]
    q_value = "%bq"
    if g > 1:
        lines.append(
            f"%q5 = tensor.expand_shape %bq {group_reassoc} output_shape {q5} : "
            f"{plan.q.builtin()} into {tensor_type(q5, elem)}"
        )
        q_value = "%q5"

    maps = [
        _map(dims, [*batch, "m", "k1"]),
        _map(dims, [*kv_batch, "k2", "k1"]),
        _map(dims, [*kv_batch, "k2", "n"]),
        _map(dims, []),
    ]
    ins = [(q_value, tensor_type(q5, elem)), ("%bk", plan.k.builtin()), ("%bv", plan.v.builtin())]
    lines.append(f"%scale = arith.constant {f32_literal(plan.scale)} : f32")
    ins.append(("%scale", "f32"))

    mask_value = _mask(plan, lines, dims, batch, batch_sizes, elem)
    if mask_value is not None:
        value, type_text, mask_dims = mask_value
        maps.append(_map(dims, mask_dims))
        ins.append((value, type_text))
    maps.append(_map(dims, [*batch, "m", "n"]))

    lines += [
        f"%empty = tensor.empty() : {tensor_type(o5, elem)}",
        f"%attn = iree_linalg_ext.attention <indexing_maps = [{', '.join(maps)}]> "
        f"ins({', '.join(v for v, _ in ins)} : {', '.join(t for _, t in ins)}) "
        f"outs(%empty : {tensor_type(o5, elem)}) {{",
        "^bb0(%score: f32):",
        "  iree_linalg_ext.yield %score : f32",
        f"}} -> {tensor_type(o5, elem)}",
    ]
    result = "%attn"
    if g > 1:
        lines.append(
            f"%out = tensor.collapse_shape %attn {group_reassoc} : {tensor_type(o5, elem)} into {plan.out.builtin()}"
        )
        result = "%out"
    lines += [
        f"%t = torch_c.from_builtin_tensor {result} : {plan.out.builtin()} -> {plan.out.torch()}",
        f"return %t : {plan.out.torch()}",
    ]
    body = "\n  ".join(lines)
    return f"func.func @lowered({', '.join(args)}) -> {plan.out.torch()} {{\n  {body}\n}}"


def _mask(plan, lines, dims, batch, batch_sizes, elem):
    """Emit the mask operand; return (value, type, iteration dims it is indexed by) or None."""
    if plan.mask is None and not plan.is_causal:
        return None
    g, lead = plan.groups, plan.lead
    sq, sk = plan.q.shape[-2], plan.k.shape[-2]
    value, kept_dims, kept_sizes = None, [], []
    if plan.mask is not None:
        # Align the mask to the scores [*lead, Hq, Sq, Sk]; keep the dims it really has.
        scores = [*lead, plan.q.shape[-3], sq, sk]
        score_dims = [[f"b{i}"] for i in range(len(lead))] + [["h", "g"] if g > 1 else ["h"], ["m"], ["k2"]]
        offset = len(scores) - plan.mask.rank
        mshape = list(plan.mask.shape)
        keep = [not (mshape[i] == 1 and scores[offset + i] != 1) for i in range(plan.mask.rank)]
        value = "%bmask"
        builtin = plan.mask.builtin()
        lines.append(f"%bmask = torch_c.to_builtin_tensor %mask : {plan.mask.torch()} -> {builtin}")
        value, builtin = _convert_mask(lines, value, mshape, plan.mask.dtype, elem)
        if not all(keep):
            kept_shape = [n for n, k in zip(mshape, keep, strict=True) if k]
            reassoc = _drop_unit_reassociation(keep)
            collapsed = tensor_type(kept_shape, elem)
            lines.append(f"%mdrop = tensor.collapse_shape {value} {reassoc} : {builtin} into {collapsed}")
            value, builtin = "%mdrop", collapsed
        for i, k in enumerate(keep):
            if not k:
                continue
            names = score_dims[offset + i]
            kept_dims += names
            kept_sizes += [plan.k.shape[-3], g] if names == ["h", "g"] else [mshape[i]]
        if g > 1 and "g" in kept_dims:
            hpos = kept_dims.index("h")
            reassoc = [[i] for i in range(hpos)] + [[hpos, hpos + 1]] + [
                [i + 1] for i in range(hpos + 1, len(kept_dims) - 1)
            ]
            expanded = tensor_type(kept_sizes, elem)
            lines.append(
                f"%mgroups = tensor.expand_shape {value} {reassoc} output_shape {kept_sizes} : "
                f"{builtin} into {expanded}"
            )
            value, builtin = "%mgroups", expanded
        if not plan.is_causal:
            return value, builtin, kept_dims
    # Causal: select(k2 <= m, mask or 0, -inf), indexed by the mask's dims plus m and k2.
    out_dims = [d for d in [*batch, "m", "k2"] if d in kept_dims or d in ("m", "k2")]
    sizes = dict(zip([*batch, "m", "k2"], [*batch_sizes, sq, sk], strict=True))
    out_shape = [sizes[d] for d in out_dims]
    gdims = [f"i{i}" for i in range(len(out_dims))]
    out_type = tensor_type(out_shape, elem)
    ins = ""
    if value is not None:
        in_map = _map(gdims, [gdims[out_dims.index(d)] for d in kept_dims])
        ins = f"ins({value} : {builtin}) "
        maps = f"[{in_map}, {_map(gdims, gdims)}]"
        block_args, keep_value = "%in: " + elem + ", %o: " + elem, "%in"
    else:
        maps = f"[{_map(gdims, gdims)}]"
        block_args, keep_value = "%o: " + elem, "%zero"
    lines += [
        f"%cempty = tensor.empty() : {out_type}",
        f"%causal = linalg.generic {{indexing_maps = {maps}, iterator_types = "
        f"{parallel_iterators(len(out_dims))}}} {ins}outs(%cempty : {out_type}) {{",
        f"^bb0({block_args}):",
        f"  %zero = arith.constant 0.0 : {elem}",
        f"  %ninf = arith.constant {NEG_INF_LITERAL[elem]} : {elem}",
        f"  %i = linalg.index {out_dims.index('m')} : index",
        f"  %j = linalg.index {out_dims.index('k2')} : index",
        "  %attend = arith.cmpi ule, %j, %i : index",
        f"  %r = arith.select %attend, {keep_value}, %ninf : {elem}",
        f"  linalg.yield %r : {elem}",
        f"}} -> {out_type}",
    ]
    return "%causal", out_type, out_dims


# The lowest additive mask value kept as is. IREE's attention multiplies scores (and the mask) by
# log2(e) for exp2, which sends finfo(f32).min to -inf and a row of such values to 0/0 = NaN. At
# or below this value a key is "never attended" anyway; flooring keeps eager's arithmetic: a row
# masked everywhere with finfo.min averages V uniformly, as it does in eager PyTorch.
MASK_FLOOR = {"f32": "-1.000000e+30", "bf16": "-1.000000e+30", "f16": "-6.550400e+04"}


def _convert_mask(lines, value, shape, dtype, elem):
    """A boolean mask becomes additive (0 / -inf); a float mask takes the query's dtype and is
    floored at MASK_FLOOR (-inf stays -inf: every-key-masked rows then give 0, as SDPA does)."""
    src = "i1" if dtype == "i1" else dtype
    in_type, out_type = tensor_type(shape, src), tensor_type(shape, elem)
    ids = [f"i{i}" for i in range(len(shape))]
    ident = _map(ids, ids)
    if dtype == "i1":
        body = [
            f"  %zero = arith.constant 0.0 : {elem}",
            f"  %ninf = arith.constant {NEG_INF_LITERAL[elem]} : {elem}",
            f"  %r = arith.select %in, %zero, %ninf : {elem}",
        ]
    else:
        convert = [] if src == elem else [
            f"  %x = {'arith.truncf' if _bits(src) > _bits(elem) else 'arith.extf'} %in : {src} to {elem}"]
        x = "%x" if convert else "%in"
        body = [
            *convert,
            f"  %floor = arith.constant {MASK_FLOOR[elem]} : {elem}",
            f"  %ninf = arith.constant {NEG_INF_LITERAL[elem]} : {elem}",
            f"  %is_ninf = arith.cmpf oeq, {x}, %ninf : {elem}",
            f"  %floored = arith.maximumf {x}, %floor : {elem}",
            f"  %r = arith.select %is_ninf, {x}, %floored : {elem}",
        ]
    lines += [
        f"%mempty = tensor.empty() : {out_type}",
        f"%mconv = linalg.generic {{indexing_maps = [{ident}, {ident}], iterator_types = "
        f"{parallel_iterators(len(shape))}}} ins({value} : {in_type}) outs(%mempty : {out_type}) {{",
        f"^bb0(%in: {src}, %o: {elem}):",
        *body,
        f"  linalg.yield %r : {elem}",
        f"}} -> {out_type}",
    ]
    return "%mconv", out_type


def _bits(elem: str) -> int:
    return {"f32": 32, "f16": 16, "bf16": 16, "f64": 64}[elem]


def _drop_unit_reassociation(keep: list[bool]) -> list[list[int]]:
    """Reassociation that collapses away the dims where keep is False (all of size 1)."""
    groups: list[list[int]] = []
    pending: list[int] = []
    for i, k in enumerate(keep):
        pending.append(i)
        if k:
            groups.append(pending)
            pending = []
    if pending:
        if groups:
            groups[-1] += pending
        # else: every dim is dropped; the collapse to a 0-d tensor takes an empty reassociation
    return groups


def run(module: ir.Operation, options: Options) -> PassResult:
    result = PassResult(PASS.name)
    for op in walk_ops(module, "torch.operator"):
        if ir.StringAttr(op.attributes["name"]).value != ATTENTION_OPERATOR:
            continue
        try:
            plan = _plan(op)
        except _Decline as why:
            result.decline(op, str(why))
            continue
        splice_function(op, _function(plan), list(op.operands)[: 4 if plan.mask is not None else 3])
        result.rewritten += 1
    return result


PASS = PassSpec(
    name="flashmlir-lower-attention",
    summary="Lower torch.flashmlir.attention to iree_linalg_ext.attention (GQA kept, causal as mask producer)",
    options_type=Options,
    run=run,
)
