"""The library's CUDA kernels as the implementations of our ops on CUDA tensors, inside PyTorch.

With `torch.compile(..., options={"rest": "inductor"})` only attention is ours: the graph keeps its
`flashmlir::attention` / `attention_forward` / `attention_backward` nodes and Inductor compiles
everything else, calling these ops as opaque kernels. Each runs the catalog's kernel for the
device (the same image, launch geometry and constants the IREE dispatch uses) on torch's current
stream, so it is ordered with Inductor's kernels without any host synchronization; a call the
kernels cannot serve (a mask, dropout outside the training pair's sm_90 and sm_80 kernels, a dtype or head
dim the library lacks) runs the op's reference implementation instead. `register()` installs the
implementations (once); `kernel_problem` (and, with dropout, `dropout_problem`) is also what
decides, before aot_autograd, which sites get the training ops.
"""

from __future__ import annotations

import functools
import math

import torch

from flashmlir.compiler import microkernels
from flashmlir.compiler.targets import target_for_device
from flashmlir.frontend.attention_op import check_arguments, reference_attention, sdpa_attention
from flashmlir.frontend.training_ops import reference_backward, reference_forward
from flashmlir.runtime import cpu_kernels, cuda_launcher

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


def dropout_problem(arch: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels for `arch` cannot drop P for these operands (kernel_problem passed), else None."""
    forward, backward = _kernels(arch, ELEMENTS[q.dtype], q.shape[-1], True)
    if not (forward.dropout and backward.dropout):
        return f"dropout (the {forward.family} / {backward.family} kernels do not take it; sm_90's and sm_80's do)"
    return None


# A problem the kernels do not serve (a dtype or head dim the library lacks, …): the reference runs.
_REFERENCE = "reference"
_MAX_LAUNCHES = 256  # problems remembered (dynamic shapes make new ones; past this the memo restarts)
_launches: dict[tuple, object] = {}


def _memo(key: tuple, build):
    """The launch for `key` (a problem's shapes, dtypes, device and options), built once: a call of
    an op in a training step then costs a dict lookup, not the kernel selection and launch setup."""
    launch = _launches.get(key)
    if launch is None:
        if len(_launches) >= _MAX_LAUNCHES:
            _launches.clear()
        launch = _launches[key] = build()
    return launch


def _forward_launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, scale, with_lse: bool,
                    dropout_p: float = 0.0):
    device = q.get_device()

    def build():
        check_arguments(q, k, v, None)
        arch = _arch(device)
        if kernel_problem(arch, q, k, v, backward=False) is not None:
            return _REFERENCE
        # The tiling for these lengths (kernel_problem checked that the library serves the rest).
        forward = microkernels.select_attention_forward(arch, ELEMENTS[q.dtype], q.shape[-1], q.shape[-2], k.shape[-2],
                                                        is_causal)
        if dropout_p and not (forward.dropout and 0.0 < dropout_p < 1.0):
            return _REFERENCE
        return cuda_launcher.AttentionForwardLaunch(forward, q.shape, k.shape, is_causal, scale, with_lse, device,
                                                    dropout_p)

    return _memo((with_lse, q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, device, is_causal, scale,
                  dropout_p), build)


def _attention_cuda(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, dropout_seed=None):
    if attn_mask is not None or dropout_p > 0.0:
        # The kernels take no mask: torch's SDPA where it means the same, else the reference.
        check_arguments(q, k, v, attn_mask)
        return sdpa_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)
    launch = _forward_launch(q, k, v, is_causal, scale, with_lse=False)
    if launch is _REFERENCE:
        return reference_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)
    return launch(q.contiguous(), k.contiguous(), v.contiguous())


def _attention_forward_cuda(q, k, v, is_causal=False, scale=None):
    launch = _forward_launch(q, k, v, is_causal, scale, with_lse=True)
    if launch is _REFERENCE:
        return reference_forward(q, k, v, is_causal, scale)
    return launch(q.contiguous(), k.contiguous(), v.contiguous())


def _attention_forward_dropout_cuda(q, k, v, dropout_p, dropout_seed, is_causal=False, scale=None):
    launch = _forward_launch(q, k, v, is_causal, scale, with_lse=True, dropout_p=dropout_p)
    if launch is _REFERENCE:
        return reference_forward(q, k, v, is_causal, scale, dropout_p, dropout_seed)
    return launch(q.contiguous(), k.contiguous(), v.contiguous(), dropout_seed)


def _attention_backward_cuda(grad_out, q, k, v, out, lse, is_causal=False, scale=None, dropout_p=0.0,
                             dropout_seed=None):
    deterministic, device = torch.are_deterministic_algorithms_enabled(), q.get_device()

    def build():
        arch = _arch(device)
        if (kernel_problem(arch, q, k, v, backward=True) is not None or grad_out.dtype != q.dtype
                or out.dtype != q.dtype or lse.dtype != torch.float32):
            return _REFERENCE
        _, backward = _selected(arch, ELEMENTS[q.dtype], q.shape[-1], True, deterministic)
        if dropout_p and not (backward.dropout and 0.0 < dropout_p < 1.0):
            return _REFERENCE  # kernels without dropout twins
        return cuda_launcher.AttentionBackwardLaunch(backward, q.shape, k.shape, is_causal, scale, device, dropout_p)

    launch = _memo(("backward", q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, grad_out.dtype, out.dtype,
                    lse.dtype, device, is_causal, scale, deterministic, dropout_p), build)
    if launch is _REFERENCE:
        return reference_backward(grad_out, q, k, v, out, lse, is_causal, scale, dropout_p, dropout_seed)
    return launch(q.contiguous(), k.contiguous(), v.contiguous(), out.contiguous(), grad_out.contiguous(),
                  lse.contiguous(), *([dropout_seed] if dropout_p else []))


def _attention_backward_dropout_cuda(grad_out, q, k, v, out, lse, dropout_p, dropout_seed, is_causal=False,
                                     scale=None):
    return _attention_backward_cuda(grad_out, q, k, v, out, lse, is_causal, scale, dropout_p, dropout_seed)


_LIBRARY: list[torch.library.Library] = []  # kept alive: the registrations live as long as it does


@functools.cache
def register() -> None:
    """Make the library's kernels our ops' implementation on CUDA tensors, and on CPU tensors those
    of runtime/cpu_kernels.py (idempotent).

    Registered with the dispatcher directly (torch.library.Library.impl at the CUDA key) rather
    than custom_op's `register_kernel`, whose wrapper (an aliasing check of the outputs and a
    Dynamo-disabling frame) cost more host time per call than the kernels' own launch."""
    library = torch.library.Library("flashmlir", "IMPL")
    library.impl("attention", _attention_cuda, "CUDA")
    library.impl("attention_forward", _attention_forward_cuda, "CUDA")
    library.impl("attention_backward", _attention_backward_cuda, "CUDA")
    library.impl("attention_forward_dropout", _attention_forward_dropout_cuda, "CUDA")
    library.impl("attention_backward_dropout", _attention_backward_dropout_cuda, "CUDA")
    cpu_kernels.register(library)
    _LIBRARY.append(library)
