"""flashmlir-bind-result-storage: results are written into storage the caller passes in.

    func @main(%a: !torch.vtensor<…>) -> !torch.vtensor<…> { … return %r }
      ⇒ func @main(%a: !torch.vtensor<…>, %out0: !torch.tensor<…>) {
           … torch.overwrite.tensor.contents %r overwrites %out0; return }

IREE's torch frontend turns the overwrite into `hal.tensor.alias`: the dispatch that produces %r
writes straight into the caller's buffer. The runtime then allocates every output with torch (on
the tensors' device, through torch's stream-ordered caching allocator) and IREE never hands torch
memory it owns, so no output outlives or races IREE's allocator, and tests can poison outputs to
catch elements nothing wrote. Only functions whose results are all torch tensors are rewritten.
"""

from __future__ import annotations

from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.passes.framework import PassResult, PassSpec
from flashmlir.passes.ir_utils import torch_tensor_type


@dataclass(frozen=True)
class Options:
    function: str = "main"


def _rewrite(func: ir.Operation) -> None:
    function_type = ir.FunctionType(ir.TypeAttr(func.attributes["function_type"]).value)
    body = func.regions[0].blocks[0]
    ret = list(body.operations)[-1]
    storage = []
    for value in function_type.results:
        t = torch_tensor_type(value)
        storage.append(body.add_argument(ir.Type.parse(f"!torch.tensor<[{','.join(map(str, t.shape))}],{t.dtype}>"),
                                         ir.Location.unknown()))
    with ir.InsertionPoint(ret), ret.location:
        for result, out in zip(ret.operands, storage, strict=True):
            ir.Operation.create("torch.overwrite.tensor.contents", operands=[result, out])
        ir.Operation.create("func.return", operands=[])
    ret.erase()
    new_type = ir.FunctionType.get([*function_type.inputs, *(a.type for a in storage)], [])
    func.attributes["function_type"] = ir.TypeAttr.get(new_type)


def run(module: ir.Operation, options: Options) -> PassResult:
    result = PassResult(PASS.name)
    for op in module.regions[0].blocks[0].operations:
        op = op.operation
        if op.name != "func.func" or ir.StringAttr(op.attributes["sym_name"]).value != options.function:
            continue
        results = ir.FunctionType(ir.TypeAttr(op.attributes["function_type"]).value).results
        if not all(torch_tensor_type(t) is not None and torch_tensor_type(t).is_static for t in results):
            result.decline(op, "results must all be static-shaped torch tensors")
            continue
        _rewrite(op)
        result.rewritten += 1
    return result


PASS = PassSpec(
    name="flashmlir-bind-result-storage",
    summary="Make a function write its tensor results into caller-provided arguments (in place)",
    options_type=Options,
    run=run,
)
