"""An iree_linalg_ext.attention op read back into roles, sizes, causality and mask.

flashmlir-lower-attention writes attention in one canonical layout; the passes after it
(flashmlir-tile-attention, flashmlir-dispatch-attention-microkernel) read it with `analyze`, which
names each operand's dims by role (batch "b<i>", query "m", key "k2", head "k1", value "n"),
recognizes the causal mask producer lower-attention emits, and raises `NotCanonical` with a
reason for anything else.
"""

from __future__ import annotations

from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.passes.ir_utils import defining_op, producers_closure, tensor_type

SUPPORTED_ELEMENT_TYPES = ("f32", "f16", "bf16")


class NotCanonical(Exception):
    """The op is not in the layout these passes handle; the message says how."""


@dataclass
class Operand:
    value: ir.Value
    shape: list[int]
    elem: str
    roles: list[str]  # per tensor dim: "b<i>", "m", "n", "k1", "k2"

    def type(self) -> str:
        return tensor_type(self.shape, self.elem)


@dataclass
class Attention:
    """An attention op understood: its operands by role, sizes, causality and explicit mask."""

    op: ir.Operation
    num_dims: int
    pos: dict[str, int]  # role → iteration dim position
    batch_sizes: list[int]
    q: Operand
    k: Operand
    v: Operand
    scale: ir.Value
    mask: Operand | None  # explicit mask, loaded per tile
    causal: bool
    out: Operand
    dead_mask_producer: ir.Operation | None

    @property
    def sq(self) -> int:
        return self.q.shape[self.q.roles.index("m")]

    @property
    def sk(self) -> int:
        return self.k.shape[self.k.roles.index("k2")]

    @property
    def dv(self) -> int:
        return self.v.shape[self.v.roles.index("n")]


def element_type(t: ir.Type) -> str:
    return str(ir.RankedTensorType(t).element_type)


def static_shape(t: ir.Type) -> list[int]:
    rt = ir.RankedTensorType(t)
    if not rt.has_static_shape:
        raise NotCanonical(f"dynamic shape {t} is not supported yet")
    return list(rt.shape)


def map_dims(attr: ir.Attribute) -> list[int]:
    amap = ir.AffineMapAttr(attr).value
    dims = []
    for expr in amap.results:
        if not isinstance(expr, ir.AffineDimExpr):
            raise NotCanonical(f"indexing map {amap} is not a projected permutation")
        dims.append(expr.position)
    return dims


def analyze_layout(op: ir.Operation) -> Attention:
    """The op's operands by role and sizes, without looking at its mask."""
    return analyze(op, look_at_mask=False)



def replaced_inputs(attn: Attention) -> list[ir.Operation]:
    """What replacing `attn` may leave dead: the producer of its recognized causal mask and the
    tensor.empty inits of that mask and of the output. Collect before the rewrite, then
    `erase_unused` after it (a handle to an erased op must never be touched)."""
    roots = [] if attn.dead_mask_producer is None else [attn.dead_mask_producer]
    out_init = defining_op(attn.out.value)
    if out_init is not None and out_init.name == "tensor.empty":
        roots.append(out_init)
    return producers_closure(roots, lambda p: p.name == "tensor.empty")

def analyze(op: ir.Operation, look_at_mask: bool = True) -> Attention:
    maps = list(ir.ArrayAttr(op.attributes["indexing_maps"]))
    operands = list(op.operands)
    num_ins = len(maps) - 1
    if num_ins not in (4, 5):
        raise NotCanonical(f"unexpected operand count {len(operands)}")
    q, k, v, scale = operands[:4]
    mask = operands[4] if num_ins == 5 else None
    out = operands[num_ins]
    qd, kd, vd, sd = (map_dims(m) for m in maps[:4])
    md = map_dims(maps[4]) if mask is not None else None
    od = map_dims(maps[-1])
    num_dims = ir.AffineMapAttr(maps[0]).value.n_dims
    if sd:
        raise NotCanonical("the scale must be a scalar")

    # Canonical layout: Q (batch…, m, k1), K (kbatch…, k2, k1), V (kbatch…, k2, n), O (batch…, m, n).
    if len(qd) < 2 or len(kd) < 2 or len(vd) < 2:
        raise NotCanonical("operands of rank < 2")
    pos = {"m": qd[-2], "k1": qd[-1], "k2": kd[-2], "n": vd[-1]}
    batch = qd[:-2]
    kbatch = [d for d in kd if d in batch]
    if (len(set(pos.values())) != 4 or batch != sorted(batch)
            or set(batch) | set(pos.values()) != set(range(num_dims))
            or kd != [*kbatch, pos["k2"], pos["k1"]] or vd != [*kbatch, pos["k2"], pos["n"]]
            or od != [*batch, pos["m"], pos["n"]]):
        raise NotCanonical("operand layout is not canonical (transposed operands); left to IREE")
    for i, d in enumerate(batch):
        pos[f"b{i}"] = d
    role_of = {d: r for r, d in pos.items()}

    block = op.regions[0].blocks[0]
    body = list(block.operations)
    if len(body) != 1 or list(body[0].operands) != [block.arguments[0]]:
        raise NotCanonical("the score modifier region is not the identity")

    def operand(value: ir.Value, dims: list[int]) -> Operand:
        return Operand(value, static_shape(value.type), element_type(value.type), [role_of[d] for d in dims])

    qo, ko, vo, oo = operand(q, qd), operand(k, kd), operand(v, vd), operand(out, od)
    for x in (qo, ko, vo):
        if x.elem not in SUPPORTED_ELEMENT_TYPES:
            raise NotCanonical(f"element type {x.elem} is not supported ({', '.join(SUPPORTED_ELEMENT_TYPES)})")
    if str(scale.type) != "f32":
        raise NotCanonical(f"scale of type {scale.type}, expected f32")

    causal, explicit, producer = False, None, None
    if mask is not None and look_at_mask:
        explicit = operand(mask, md)
        recognized = recognize_causal(mask, md, pos)
        if recognized is not None:
            causal = True
            producer, explicit = recognized
            if explicit is not None:
                explicit = operand(*explicit)
        if explicit is not None and any(r not in ("m", "k2") and not r.startswith("b") for r in explicit.roles):
            raise NotCanonical("the mask is indexed by a head-dim loop")
    batch_sizes = [qo.shape[i] for i in range(len(batch))]
    return Attention(op, num_dims, pos, batch_sizes, qo, ko, vo, scale, explicit, causal, oo, producer)


def recognize_causal(mask: ir.Value, mask_dims: list[int], pos: dict[str, int]):
    """If `mask` is computed as select(k2 <= m, X or 0, -inf), return (producer, (X, X's dims) | None).

    That is the producer flashmlir-lower-attention emits for a causal mask (and the shape of the
    one torch-mlir emits for SDPA's is_causal). Anything else: None (the mask is loaded as is).
    """
    producer = defining_op(mask)
    if producer is None or producer.name != "linalg.generic" or len(producer.results) != 1:
        return None
    maps = list(ir.ArrayAttr(producer.attributes["indexing_maps"]))
    num_inputs = len(maps) - 1
    if num_inputs > 1 or map_dims(maps[-1]) != list(range(len(mask_dims))):
        return None
    block = producer.regions[0].blocks[0]
    ops = list(block.operations)
    names = [o.name for o in ops]
    expected = ["arith.constant", "arith.constant", "linalg.index", "linalg.index", "arith.cmpi",
                "arith.select", "linalg.yield"]
    if sorted(names) != sorted(expected):
        return None
    index = {o.results[0]: ir.IntegerAttr(o.attributes["dim"]).value for o in ops if o.name == "linalg.index"}
    cmp = next(o for o in ops if o.name == "arith.cmpi")
    select = next(o for o in ops if o.name == "arith.select")
    # arith.cmpi predicate 7 = ule, 3 = sle: attend iff lhs <= rhs.
    if ir.IntegerAttr(cmp.attributes["predicate"]).value not in (3, 7):
        return None
    lhs, rhs = cmp.operands[0], cmp.operands[1]
    if lhs not in index or rhs not in index:
        return None
    j_dim, i_dim = mask_dims[index[lhs]], mask_dims[index[rhs]]
    if (i_dim, j_dim) != (pos["m"], pos["k2"]) or select.operands[0] != cmp.results[0]:
        return None
    if float_constant(select.operands[2]) != float("-inf"):
        return None
    kept = select.operands[1]
    if num_inputs == 0:
        return (producer, None) if float_constant(kept) == 0.0 else None
    if kept != block.arguments[0]:
        return None
    in_dims = [mask_dims[d] for d in map_dims(maps[0])]
    return producer, (producer.operands[0], in_dims)


def float_constant(value: ir.Value) -> float | None:
    op = defining_op(value)
    if op is None or op.name != "arith.constant" or not isinstance(op.attributes["value"], ir.FloatAttr):
        return None
    return op.attributes["value"].value


