"""FX graph → torch-dialect MLIR, through the torch-mlir FX importer that IREE bundles.

We use `iree.compiler.extras.fx_importer` (not a separate torch-mlir install) so that the imported
module lives in the same MLIR context as IREE's dialects and passes: our Python passes, IREE's
input conversion and IREE's codegen then run on one in-memory module, with no text round trip and
no second copy of MLIR in the process.

`flashmlir::attention` nodes import as `torch.operator "torch.flashmlir.attention"(...)`, the op
our MLIR passes lower.
"""

from __future__ import annotations

import torch.fx as fx
from iree.compiler import ir
from iree.compiler.extras.fx_importer import FxImporter

ATTENTION_OPERATOR = "torch.flashmlir.attention"


def import_graph(gm: fx.GraphModule, context: ir.Context, func_name: str = "main") -> ir.Module:
    """Import a stateless (aot_autograd) graph as a module with one public function."""
    importer = FxImporter(context=context)
    importer.import_stateless_graph(gm.graph, func_name=func_name)
    return importer.module


def import_exported_program(program, context: ir.Context, func_name: str = "main") -> ir.Module:
    """Import a `torch.export` program with its parameters and buffers folded in as constants."""
    importer = FxImporter(context=context)
    importer.import_frozen_program(program, func_name=func_name)
    return importer.module
