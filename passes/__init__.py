"""flashmlir's MLIR passes, written in Python on IREE's MLIR bindings. One pass per module.

    flashmlir-erase-device-placement  torch device arguments become "cpu" (one module, one device)
    flashmlir-match-attention   torch IR: SDPA and softmax(Q·Kᵀ·s + M)·V ⇒ torch.flashmlir.attention
    flashmlir-lower-attention   torch.flashmlir.attention ⇒ iree_linalg_ext.attention (GQA, causal kept)
    flashmlir-dispatch-attention-microkernel  (CUDA) iree_linalg_ext.attention ⇒ our kernel, hal.dispatch.extern
    flashmlir-dispatch-attention-training  (CUDA) forward-with-lse and backward ops ⇒ our kernels
    flashmlir-tile-attention    iree_linalg_ext.attention ⇒ flash loop nest in one dispatch (per target)
    flashmlir-bind-result-storage  results written into caller-provided tensors (torch interop)

`flashmlir.passes.pass_manager` runs them, mixed with any MLIR/IREE pass, from a textual pipeline.
"""

from __future__ import annotations

from flashmlir.passes import (
    bind_result_storage,
    dispatch_attention_microkernel,
    dispatch_attention_training,
    erase_device_placement,
    lower_attention,
    match_attention,
    tile_attention,
)
from flashmlir.passes.framework import Decline, PassResult, PassSpec

REGISTRY: dict[str, PassSpec] = {
    p.name: p
    for p in (erase_device_placement.PASS, match_attention.PASS, lower_attention.PASS,
              dispatch_attention_microkernel.PASS, dispatch_attention_training.PASS, tile_attention.PASS, bind_result_storage.PASS)
}

__all__ = ["REGISTRY", "Decline", "PassResult", "PassSpec"]
