"""Re-trace a dynamo graph to pre-dispatch ATen, where the matcher works.

Why this level: dynamo graphs spell one computation many ways (`torch.matmul`, `@`,
`Tensor.softmax`, `F.softmax`, method calls), while pre-dispatch ATen is canonical (`aten.matmul`,
`aten.softmax.int`, `aten.transpose.int`, SDPA kept whole) and still comes before autograd, so the
`flashmlir::attention` nodes we insert get their backward from the op's autograd formula when
aot_autograd traces training graphs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.proxy_tensor import make_fx


def trace_pre_dispatch(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> fx.GraphModule:
    """`gm` re-traced to pre-dispatch ATen on fake copies of `example_inputs`.

    Nodes carry `meta["val"]` (fake tensors), which the matcher reads shapes and dtypes from.
    """
    fake_mode = detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [fake_mode.from_tensor(x) if isinstance(x, torch.Tensor) else x for x in example_inputs]
    # Run through an Interpreter so each new node inherits the stack trace of the node it came
    # from (explain() and the logs point at the user's source line).
    with fake_mode, torch.fx.traceback.preserve_node_meta():
        return make_fx(fx.Interpreter(gm).run, pre_dispatch=True)(*fakes)
