"""The library's CUDA kernels as the implementations of our ops on CUDA tensors, inside PyTorch.

With `torch.compile(..., options={"rest": "inductor"})` only attention is ours: the graph keeps its
`flashmlir::attention` / `attention_forward` / `attention_backward` nodes and Inductor compiles
everything else, calling these ops as opaque kernels. Each runs the catalog's kernel for the
device (the same image, launch geometry and constants the IREE dispatch uses) on torch's current
stream, so it is ordered with Inductor's kernels without any host synchronization; a call the
kernels cannot serve (a mask, dropout, a dtype or head dim the library lacks) runs the op's
reference implementation instead. `register()` installs the implementations (once);
`kernel_problem` is also what decides, before aot_autograd, which sites get the training ops.
"""

from __future__ import annotations

import functools
import math

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

ELEMENTS = {torch.float16: "f16", torch.bfloat16: "bf16"}
_MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, which carries batch × heads


@functools.cache
def _arch(index: int) -> str:
    return target_for_device("cuda", torch.cuda.get_device_capability(index)).gpu.arch


def _kernels(arch: str, element: str, head_dim: int, backward: bool):
    """The forward kernel and (if asked) the backward kernels: under torch's deterministic mode
    (torch.use_deterministic_algorithms) ones that sum dQ in a fixed order."""
    return _selected(arch, element, head_dim, backward, backward and torch.are_deterministic_algorithms_enabled())


@functools.cache
def _selected(arch: str, element: str, head_dim: int, backward: bool, deterministic: bool):
    """NoKernel says why there is none. Cached: selection reads the catalog and checks the objects
    exist, which a call of the op must not redo."""
    forward = microkernels.select_attention_forward(arch, element, head_dim)
    return forward, (microkernels.select_attention_backward(arch, element, head_dim, deterministic)
                     if backward else None)


def kernel_problem(arch: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool) -> str | None:
    """Why the library's kernels for `arch` cannot take these operands (the forward kernel, and the
    backward pair if `backward`), else None."""
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in ELEMENTS:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (the kernels take float16 or bfloat16)"
    if q.dim() < 3 or v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the query head dim {q.shape[-1]}"
    if q.numel() == 0 or k.numel() == 0:
        return "empty operands"
    if math.prod(q.shape[:-2]) > _MAX_GRID_Y:
        return f"batch × heads = {math.prod(q.shape[:-2])} exceeds the grid's y limit {_MAX_GRID_Y}"
    try:
        _kernels(arch, ELEMENTS[q.dtype], q.shape[-1], backward)
    except microkernels.NoKernel as why:
        return str(why)
    return None


def _served(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool):
    """The kernels for a call on the device, or None where the reference must run."""
    arch = _arch(q.device.index or 0)
    if kernel_problem(arch, q, k, v, backward) is not None:
        return None
    return _kernels(arch, ELEMENTS[q.dtype], q.shape[-1], backward)


def _heads(x: torch.Tensor) -> torch.Tensor:
    """[*, H, S, D] as a dense [B·…, H, S, D] (what the kernels index)."""
    return x.reshape(-1, *x.shape[-3:]).contiguous()


def _forward(forward, q, k, v, is_causal, scale, with_lse):
    result = cuda_launcher.attention_forward(forward, _heads(q), _heads(k), _heads(v), causal=is_causal,
                                             scale=scale, with_lse=with_lse)
    if with_lse:
        out, lse = result
        return out.view(q.shape), lse.view(q.shape[:-1])
    return result.view(q.shape)


def _attention_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, dropout_seed=None):
    check_arguments(q, k, v, attn_mask)
    kernels = None if attn_mask is not None or dropout_p > 0.0 else _served(q, k, v, backward=False)
    if kernels is None:
        return reference_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)
    return _forward(kernels[0], q, k, v, is_causal, scale, with_lse=False)


def _attention_forward_cuda(q, k, v, is_causal=False, scale=None):
    kernels = _served(q, k, v, backward=False)
    if kernels is None:
        return reference_forward(q, k, v, is_causal, scale)
    return _forward(kernels[0], q, k, v, is_causal, scale, with_lse=True)


def _attention_backward_cuda(grad_out, q, k, v, out, lse, is_causal=False, scale=None):
    kernels = _served(q, k, v, backward=True)
    if kernels is None:
        return reference_backward(grad_out, q, k, v, out, lse, is_causal, scale)
    dq, dk, dv = cuda_launcher.attention_backward(
        kernels[1], _heads(q), _heads(k), _heads(v), _heads(out), _heads(grad_out),
        lse.reshape(-1, *lse.shape[-2:]).contiguous(), causal=is_causal, scale=scale)
    return dq.view(q.shape), dk.view(k.shape), dv.view(v.shape)


@functools.cache
def register() -> None:
    """Make the library's kernels our ops' implementation on CUDA tensors (idempotent)."""
    attention.register_kernel("cuda")(_attention_cuda)
    attention_forward.register_kernel("cuda")(_attention_forward_cuda)
    attention_backward.register_kernel("cuda")(_attention_backward_cuda)
