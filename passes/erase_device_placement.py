"""flashmlir-erase-device-placement: torch device arguments become "cpu".

    %d = torch.constant.device "cuda:0"   ⇒   %d = torch.constant.device "cpu"

Inside an IREE module every tensor lives on the one HAL device the module is compiled for, so a
graph traced on CUDA tensors says nothing with its `device=cuda:0` arguments; but IREE's torch
frontend folds only moves to "cpu" (it decomposes `scalar_tensor(..., device=cuda:0)` into a literal
and an `aten.to.device` it then cannot lower). Erasing placement makes a graph traced on any device
compile like one traced on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.passes.framework import PassResult, PassSpec
from flashmlir.passes.ir_utils import walk_ops


@dataclass(frozen=True)
class Options:
    pass


def run(module: ir.Operation, options: Options) -> PassResult:
    result = PassResult(PASS.name)
    for op in walk_ops(module, "torch.constant.device"):
        if ir.StringAttr(op.attributes["value"]).value != "cpu":
            op.attributes["value"] = ir.StringAttr.get("cpu", op.context)
            result.rewritten += 1
    return result


PASS = PassSpec(
    name="flashmlir-erase-device-placement",
    summary="Make torch device arguments 'cpu': an IREE module runs on the one device it targets",
    options_type=Options,
    run=run,
)
