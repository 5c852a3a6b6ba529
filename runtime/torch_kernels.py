"""The library's CUDA kernels as the implementations of our ops on CUDA tensors, inside PyTorch.

With `torch.compile(..., options={"rest": "inductor"})` only attention is ours: the graph keeps its
`flashmlir::attention` / `attention_forward` / `attention_backward` nodes and Inductor compiles
everything else, calling these ops as opaque kernels. Each runs the catalog's kernel for the
device (the same image, launch geometry and constants the IREE dispatch uses) on torch's current
stream, so it is ordered with Inductor's kernels without any host synchronization; a call the
kernels cannot serve (a mask, dropout, a dtype or head dim the library lacks) runs the op's
reference implementation instead. Importing this module registers the implementations.
"""

from __future__ import annotations

import functools

import torch

from flashmlir.compiler import microkernels
from flashmlir.compiler.targets import target_for_device
from flashmlir.frontend.attention_op import attention, check_arguments, reference_attention
from flashmlir.frontend.training_ops import (
    attention_backward,
    attention_forward,
    reference_backward,
    reference_forward,
)
from flashmlir.runtime import cuda_launcher

_ELEMENTS = {torch.float16: "f16", torch.bfloat16: "bf16"}
_MAX_GRID_Y = 65535


@functools.cache
def _arch(index: int) -> str:
    return target_for_device("cuda", torch.cuda.get_device_capability(index)).gpu.arch


def _problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot take these operands, else None."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in _ELEMENTS:
        return f"dtype {q.dtype}"
    if v.shape[-1] != q.shape[-1] or q.dim() < 3:
        return "shape"
    if q.numel() == 0 or k.numel() == 0 or q[..., 0, 0].numel() > _MAX_GRID_Y:
        return "empty or too many heads"
    return None


def _kernels(q: torch.Tensor, backward: bool):
    arch, element, d = _arch(q.device.index or 0), _ELEMENTS[q.dtype], q.shape[-1]
    forward = microkernels.select_attention_forward(arch, element, d)
    return forward, (microkernels.select_attention_backward(arch, element, d) if backward else None)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """[*, H, S, D] as a dense [B·…, H, S, D] (what the kernels index)."""
    return x.reshape(-1, *x.shape[-3:]).contiguous()


def _forward(q, k, v, is_causal, scale, with_lse):
    forward, _ = _kernels(q, backward=False)
    result = cuda_launcher.attention_forward(forward, _heads(q), _heads(k), _heads(v), causal=is_causal,
                                             scale=scale, with_lse=with_lse)
    if with_lse:
        out, lse = result
        return out.view(q.shape), lse.view(q.shape[:-1])
    return result.view(q.shape)


@attention.register_kernel("cuda")
def _attention_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, dropout_seed=None):
    check_arguments(q, k, v, attn_mask)
    if attn_mask is not None or dropout_p > 0.0 or _problem(q, k, v) is not None:
        return reference_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)
    try:
        return _forward(q, k, v, is_causal, scale, with_lse=False)
    except microkernels.NoKernel:
        return reference_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)


@attention_forward.register_kernel("cuda")
def _attention_forward_cuda(q, k, v, is_causal=False, scale=None):
    if _problem(q, k, v) is None:
        try:
            return _forward(q, k, v, is_causal, scale, with_lse=True)
        except microkernels.NoKernel:
            pass
    return reference_forward(q, k, v, is_causal, scale)


@attention_backward.register_kernel("cuda")
def _attention_backward_cuda(grad_out, q, k, v, out, lse, is_causal=False, scale=None):
    if _problem(q, k, v) is None:
        try:
            _, backward = _kernels(q, backward=True)
        except microkernels.NoKernel:
            backward = None
        if backward is not None:
            dq, dk, dv = cuda_launcher.attention_backward(
                backward, _heads(q), _heads(k), _heads(v), _heads(out), _heads(grad_out),
                lse.reshape(-1, *lse.shape[-2:]).contiguous(), causal=is_causal, scale=scale)
            return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)
    return reference_backward(grad_out, q, k, v, out, lse, is_causal, scale)
