"""Small helpers our passes share: reading torch types and constants, walking, splicing IR.

The MLIR Python bindings have no op classes for the torch or iree_linalg_ext dialects, so ops are
matched by name and their types read from their printed form (`!torch.vtensor<[2,8,64],f32>`).
New IR is written as an MLIR function (readable, verified by the parser) and spliced in place of
the op it replaces with `splice_function`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from iree.compiler import ir

_VTENSOR = re.compile(r"^!torch\.vtensor<\[([^\]]*)\],([a-z0-9]+)>$")

# torch element type spelling → builtin MLIR element type.
TORCH_TO_BUILTIN_DTYPE = {"f32": "f32", "f16": "f16", "bf16": "bf16", "f64": "f64", "i1": "i1", "si64": "i64"}


@dataclass(frozen=True)
class TorchTensorType:
    shape: tuple[int | None, ...]  # None for a dynamic dim
    dtype: str  # torch spelling: f32, f16, bf16, i1, si64, ...

    @property
    def is_static(self) -> bool:
        return all(d is not None for d in self.shape)

    @property
    def rank(self) -> int:
        return len(self.shape)

    def builtin(self) -> str:
        """The builtin tensor type, e.g. tensor<2x8x64xf32>."""
        dims = "x".join("?" if d is None else str(d) for d in self.shape)
        elem = TORCH_TO_BUILTIN_DTYPE[self.dtype]
        return f"tensor<{dims}x{elem}>" if dims else f"tensor<{elem}>"

    def torch(self) -> str:
        dims = ",".join("?" if d is None else str(d) for d in self.shape)
        return f"!torch.vtensor<[{dims}],{self.dtype}>"


def torch_tensor_type(t: ir.Type) -> TorchTensorType | None:
    """Parse a `!torch.vtensor` type; None for anything else (unranked, non-tensor)."""
    m = _VTENSOR.match(str(t))
    if not m:
        return None
    dims = tuple(None if d.strip() == "?" else int(d) for d in m.group(1).split(",") if d.strip())
    return TorchTensorType(dims, m.group(2))


@dataclass(frozen=True)
class Constant:
    """The value of a torch constant op (`torch.constant.int/float/bool/none`)."""

    value: int | float | bool | None


def torch_constant(value: ir.Value) -> Constant | None:
    """The Python value of a torch constant, or None if `value` is not a constant."""
    owner = value.owner
    if not isinstance(owner, ir.Operation | ir.OpView):
        return None
    op = owner.operation if hasattr(owner, "operation") else owner
    name = op.name
    if name == "torch.constant.none":
        return Constant(None)
    if name not in ("torch.constant.int", "torch.constant.float", "torch.constant.bool"):
        return None
    attr = op.attributes["value"]
    if name == "torch.constant.bool":
        return Constant(ir.BoolAttr(attr).value)
    if name == "torch.constant.int":
        return Constant(ir.IntegerAttr(attr).value)
    return Constant(ir.FloatAttr(attr).value)


def defining_op(value: ir.Value) -> ir.Operation | None:
    owner = value.owner
    if isinstance(owner, ir.Block):
        return None
    return owner.operation if hasattr(owner, "operation") else owner


def walk_ops(root: ir.Operation, name: str) -> list[ir.Operation]:
    """All ops called `name` under `root`, in pre-order (collected before any rewrite)."""
    found: list[ir.Operation] = []

    def visit(op: ir.Operation) -> ir.WalkResult:
        if op.name == name:
            found.append(op.operation if hasattr(op, "operation") else op)
        return ir.WalkResult.ADVANCE

    root.walk(visit, ir.WalkOrder.PRE_ORDER)
    return found


def uses(value: ir.Value) -> Iterator[ir.Operation]:
    for use in value.uses:
        yield use.owner


def tensor_type(shape: list[int], elem: str) -> str:
    """`tensor<2x8x64xf32>` (or `tensor<f32>` for rank 0)."""
    return f"tensor<{'x'.join(map(str, shape))}x{elem}>" if shape else f"tensor<{elem}>"


def parallel_iterators(n: int) -> str:
    """The iterator_types list of an n-d all-parallel linalg.generic."""
    return "[" + ", ".join(['"parallel"'] * n) + "]"


NEG_INF_LITERAL = {"f32": "0xFF800000", "f16": "0xFC00", "bf16": "0xFF80"}  # -inf, by element type


def f32_literal(x: float) -> str:
    """An f32 attribute literal MLIR parses back exactly (hex for infinities)."""
    if x == float("-inf"):
        return "0xFF800000"
    if x == float("inf"):
        return "0x7F800000"
    return repr(float(x))


def producers_closure(ops: list[ir.Operation], follow: Callable[[ir.Operation], bool]) -> list[ir.Operation]:
    """`ops` and, transitively, the producers of their operands for which `follow` holds.

    Collect before erasing anything: a Python handle to an erased op must never be touched.
    """
    seen: list[ir.Operation] = []
    stack = list(ops)
    while stack:
        op = stack.pop()
        if any(op == s for s in seen):
            continue
        seen.append(op)
        stack += [p for p in map(defining_op, op.operands) if p is not None and follow(p)]
    return seen


def erase_unused(candidates: list[ir.Operation]) -> None:
    """Erase, until nothing changes, every op of `candidates` whose results have no uses."""
    pending = list(candidates)
    changed = True
    while changed:
        changed = False
        for op in list(pending):
            if any(list(r.uses) for r in op.results):
                continue
            pending.remove(op)
            op.erase()
            changed = True


def splice_function(target: ir.Operation, function_text: str, operands: list[ir.Value]) -> list[ir.Value]:
    """Replace `target` by the body of a `func.func` written in MLIR, with `operands` as arguments.

    The function is parsed in `target`'s context (so it is verified), its body ops are moved in
    front of `target`, its arguments are replaced by `operands`, and `target`'s results by the
    values it returns. Returns those values. `target` is erased.
    """
    with target.context, target.location:
        parsed = ir.Module.parse(function_text)
        func = parsed.body.operations[0]
        body = func.regions[0].blocks[0]
        if len(body.arguments) != len(operands):
            raise ValueError(f"template takes {len(body.arguments)} arguments, given {len(operands)}")
        for arg, value in zip(body.arguments, operands, strict=True):
            arg.replace_all_uses_with(value)
        ops = list(body.operations)
        terminator = ops[-1]
        results = list(terminator.operands)
        for op in ops[:-1]:
            op.move_before(target)
        if len(results) != len(target.results):
            raise ValueError(f"template returns {len(results)} values, op has {len(target.results)}")
        for old, new in zip(target.results, results, strict=True):
            old.replace_all_uses_with(new)
        target.erase()
        return results


# The module attribute saying how many SMs the GPU it is compiled for has (compiler/pipeline.py
# sets it from the target, which knows the device when torch.compile compiles for one).
GPU_MULTIPROCESSORS = "flashmlir.gpu_multiprocessors"


def gpu_multiprocessors(module: ir.Operation, default: int) -> int:
    """The module's GPU_MULTIPROCESSORS attribute, else `default` (the target arch's flagship part)."""
    if GPU_MULTIPROCESSORS in module.attributes:
        return ir.IntegerAttr(module.attributes[GPU_MULTIPROCESSORS]).value
    return default
