"""The library's CPU kernels as the implementations of our ops on CPU tensors, inside PyTorch.

Where Inductor compiles the rest of a CPU graph (`rest="inductor"`, the default for training
graphs on the CPU), our ops stay in it as opaque kernels and run here: the same functions IREE
links into its executables (runtime/microkernels/attention/fwd_cpu.c, bwd_cpu.c), from the
instruction set's shared library (`libflashmlir_attention_cpu_<isa>.so`) through ctypes. A call
splits its work the way IREE's workgroups do: `workgroups` calls, each taking its share of the
items, run on a pool of torch.get_num_threads() threads (ctypes lets go of the GIL for the call).
A key-padding mask (one value per key, as BERT-style padding masks are) or a decoder's
causal-and-padding mask goes to the kernels' key-bias entries (`mask_route`), in the forward and in
the masked training pair; a problem the kernels do not serve (not float32, a head dim the library
lacks, any other mask, dropout outside the training pair) runs torch's SDPA where that means the
same and the op's reference implementation otherwise (attention_op.sdpa_attention). The training
pair with dropout calls the functions' dropout twins, which every CPU object has (cpu_dropout.h:
the seeded hash of attention_op.dropout_keep).
"""

from __future__ import annotations

import ctypes
import functools
import math
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from flashmlir import config
from flashmlir.compiler import microkernels
from flashmlir.compiler.microkernels import dropout_constants
from flashmlir.compiler.targets import get_target
from flashmlir.frontend import masked_training_ops
from flashmlir.frontend.attention_op import (
    NEVER,
    additive_mask,
    check_arguments,
    reference_attention,
    sdpa_attention,
    sdpa_mask,
    textbook_gradients,
)
from flashmlir.frontend.training_ops import reference_backward, reference_forward

_P, _S = ctypes.c_void_p, ctypes.c_size_t
_MEMREF = [_P, _P, _S, _S, _S]  # MLIR's 1-d memref descriptor: allocated, aligned, offset, size, stride
_CONSTANTS = [_S, _S, _S, _S, ctypes.c_float, _S, _S, _S]  # group, B·Hq, Sq, Sk, scale, causal, wg, wgs
# The dropout twins: ⌈p · 2¹⁶⌉ and 1 / (1 − p) between causal and wg.
_DROPOUT_CONSTANTS = _CONSTANTS[:6] + [_S, ctypes.c_float] + _CONSTANTS[6:]


def kernel_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool,
                   library: bool = False) -> str | None:
    """Why the CPU library's kernels (the forward, and the backward if `backward`) cannot take these
    operands on this host, else None. `library`: also needs the shared library (the torch path)."""
    if not config.microkernels_enabled():
        return "microkernels are off (FLASHMLIR_MICROKERNELS=0)"
    if not q.dtype == k.dtype == v.dtype == torch.float32:
        return f"dtypes {q.dtype}/{k.dtype}/{v.dtype} (the CPU kernels take float32)"
    if q.dim() < 3 or v.shape[-1] != q.shape[-1]:
        return f"value head dim {v.shape[-1]} differs from the query head dim {q.shape[-1]}"
    if q.numel() == 0 or k.numel() == 0:
        return "empty operands"
    try:
        kernels = _kernels(q.shape[-1], backward)
    except microkernels.NoKernel as why:
        return str(why)
    if library and not _built(kernels[0].shared_library):
        return f"the CPU kernels' shared library {kernels[0].shared_library} was not built"
    return None


@functools.cache
def _built(path) -> bool:
    """Looked up once: every call of our ops asks."""
    return path.is_file()


@functools.cache
def _kernels(head_dim: int, backward: bool):
    features = get_target("cpu").cpu_features
    forward = microkernels.select_cpu_attention_forward(features, "f32", head_dim)
    return forward, (microkernels.select_cpu_attention_backward(features, "f32", head_dim) if backward else None)


@functools.cache
def _function(path: str, name: str, bindings: int, dropout: bool = False):
    function = getattr(ctypes.CDLL(path), name)
    function.argtypes = _MEMREF * bindings + (_DROPOUT_CONSTANTS if dropout else _CONSTANTS)
    function.restype = None
    return function


_pool_lock = threading.Lock()
_pools: dict[int, ThreadPoolExecutor] = {}


def _run(function, tensors: tuple[torch.Tensor, ...], constants: tuple, workgroups: int) -> None:
    """Call `function` once per workgroup, spread over torch's intra-op thread count."""
    memrefs = [x for t in tensors for x in (t.data_ptr(), t.data_ptr(), 0, t.numel(), 1)]
    threads = max(1, min(torch.get_num_threads(), workgroups))
    if threads == 1:
        for wg in range(workgroups):
            function(*memrefs, *constants, wg, workgroups)
        return
    with _pool_lock:
        pool = _pools.get(threads) or _pools.setdefault(threads, ThreadPoolExecutor(threads, "flashmlir-cpu"))
    for future in [pool.submit(function, *memrefs, *constants, wg, workgroups) for wg in range(workgroups)]:
        future.result()


def _constants(q: torch.Tensor, k: torch.Tensor, is_causal: bool, scale: float | None) -> tuple:
    return (q.shape[-3] // k.shape[-3], math.prod(q.shape[:-2]), q.shape[-2], k.shape[-2],
            q.shape[-1] ** -0.5 if scale is None else scale, int(is_causal))


def _forward(q, k, v, is_causal, scale, with_lse, dropout_p=0.0, dropout_seed=None, bias=None):
    forward, _ = _kernels(q.shape[-1], False)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[:-1], dtype=torch.float32) if with_lse else None
    name = forward.name(q.shape[-1]) + ("_lse" if with_lse else "")
    workgroups = forward.workgroups(q.shape[-2], math.prod(q.shape[:-2]), torch.get_num_threads())
    if bias is not None:  # the key-bias entry: the bias after v
        function = _function(str(forward.shared_library), name + "_key_bias", 6 if with_lse else 5)
        _run(function, (q, k, v, bias, out, lse) if with_lse else (q, k, v, bias, out),
             _constants(q, k, is_causal, scale), workgroups)
        return out, lse
    if dropout_p:  # the dropout twin: the seed after v, two more constants
        function = _function(str(forward.shared_library), name + "_dropout", 6, dropout=True)
        _run(function, (q, k, v, _seed(dropout_seed), out, lse),
             _constants(q, k, is_causal, scale) + dropout_constants(dropout_p), workgroups)
        return out, lse
    function = _function(str(forward.shared_library), name, 5 if with_lse else 4)
    _run(function, (q, k, v, out, lse) if with_lse else (q, k, v, out), _constants(q, k, is_causal, scale), workgroups)
    return out, lse


def _seed(seed: torch.Tensor | None) -> torch.Tensor:
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device.type != "cpu":
        raise ValueError(f"dropout needs its seed as one int64 on the CPU, got {seed!r}")
    return seed.reshape(1).contiguous()


def key_bias(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """A key-padding mask (one value per key for every query row: the mask's query dim is 1 or
    broadcast) as the kernels' `_key_bias` entries take it, float32 [B·Hq, Sk] in the exp2 domain:
    a bool mask as 0 / -inf, a float one as `attention_op.sdpa_mask` puts it (finite values below
    -1e30 raised to it) times log2 e. None for any other mask."""
    if not _key_only(attn_mask):
        return None
    rows = attn_mask.expand(*q.shape[:-1], k.shape[-2])[..., 0, :]
    if rows.dtype == torch.bool:
        bias = additive_mask(rows, torch.float32)
    else:
        bias = sdpa_mask(rows.float(), q) * _LOG2E
    return bias.reshape(-1, k.shape[-2]).contiguous()


def _key_only(attn_mask: torch.Tensor) -> bool:
    """Whether a mask holds one value per key for every query row (its query dim is 1 or broadcast)."""
    return attn_mask.dim() < 2 or attn_mask.shape[-2] == 1 or attn_mask.stride(-2) == 0


_LOG2E = 1.4426950408889634


@functools.lru_cache(maxsize=1)
def _causal(size: int) -> torch.Tensor:
    """Top-left causal keep mask [size, size] (a bool tril), kept for the last length only: a
    model's layers share one length, and at 16k tokens the mask is 256 MB."""
    index = torch.arange(size)
    return index[:, None] >= index


def causal_key_bias(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor | None:
    """If a square mask is exactly top-left causal masking combined with a key-padding mask (what
    decoder models build from causality and their attention_mask), its key-padding part as
    `key_bias` gives it, for the kernel's causal masking to do the rest; else None. Checked on the
    mask's values, a few passes over it (a fraction of attention's time on the CPU; a GPU would need
    a host sync). A bool mask's query rows with no key are zeros either way; a float one qualifies
    only if its attended values are 0, its masked ones at or below -1e30 (finfo.min, -inf), and
    every row attends some key: a row with none is plain arithmetic over *every* key in the op,
    which causal masking cannot give."""
    sq, sk = q.shape[-2], k.shape[-2]
    if attn_mask.dim() < 2 or sq != sk or attn_mask.shape[-2:] != (sq, sk):
        return None
    if attn_mask.dtype == torch.bool:
        keys = attn_mask[..., -1:, :]  # the last query row sees every key causality allows
        return key_bias(keys, q, k) if torch.equal(attn_mask, keys & _causal(sq)) else None
    attended = attn_mask > NEVER
    keys = attended[..., -1:, :]
    if not (torch.equal(attended, keys & _causal(sq)) and torch.equal(attended, attn_mask == 0)):
        return None
    if not keys[..., 0].all():  # query 0 sees only key 0: with it masked, that row attends nothing
        return None
    return key_bias(keys, q, k)


def mask_route(attn_mask: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               is_causal: bool) -> tuple[torch.Tensor, bool] | None:
    """How the kernels' key-bias entries take a mask: (its key bias, whether to mask causally), or None."""
    bias = key_bias(attn_mask, q, k)
    if bias is not None:
        return bias, is_causal
    if not is_causal:  # a decoder's causal-and-padding mask
        bias = causal_key_bias(attn_mask, q, k)
        if bias is not None:
            return bias, True
    return None


def takes_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor, dropout_p: float) -> bool:
    """Whether the forward's `_key_bias` entry serves a masked site (fake tensors do): a key-padding
    mask, no dropout, operands the kernels take."""
    return _key_only(attn_mask) and not dropout_p and kernel_problem(q, k, v, backward=False, library=True) is None


def _attention_cpu(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, dropout_seed=None):
    check_arguments(q, k, v, attn_mask)
    if dropout_p > 0.0 or kernel_problem(q, k, v, backward=False, library=True):
        return sdpa_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)
    if attn_mask is not None:
        route = mask_route(attn_mask, q, k, is_causal)
        if route is None:  # the kernels take one value per key: torch's SDPA, where it means the same
            return sdpa_attention(q, k, v, attn_mask, dropout_p, is_causal, scale, dropout_seed)
        return _forward_key_bias(q, k, v, *route, scale)
    return _forward(q, k, v, is_causal, scale, with_lse=False)[0]


def _forward_key_bias(q, k, v, bias, is_causal, scale):
    """The forward with a key-padding mask's bias (`key_bias`), the `_key_bias` entry."""
    return _forward(q, k, v, is_causal, scale, with_lse=False, bias=bias)[0]


def _attention_forward_cpu(q, k, v, is_causal=False, scale=None):
    check_arguments(q, k, v, None)
    if kernel_problem(q, k, v, backward=False, library=True):
        return reference_forward(q, k, v, is_causal, scale)
    return _forward(q, k, v, is_causal, scale, with_lse=True)


def _attention_forward_dropout_cpu(q, k, v, dropout_p, dropout_seed, is_causal=False, scale=None):
    check_arguments(q, k, v, None)
    if kernel_problem(q, k, v, backward=False, library=True):
        return reference_forward(q, k, v, is_causal, scale, dropout_p, dropout_seed)
    return _forward(q, k, v, is_causal, scale, True, dropout_p, dropout_seed)


def _attention_backward_cpu(grad_out, q, k, v, out, lse, is_causal=False, scale=None, dropout_p=0.0,
                            dropout_seed=None, bias=None):
    if (kernel_problem(q, k, v, backward=True, library=True) or grad_out.dtype != q.dtype
            or out.dtype != q.dtype or lse.dtype != torch.float32):
        return reference_backward(grad_out, q, k, v, out, lse, is_causal, scale, dropout_p, dropout_seed)
    _, backward = _kernels(q.shape[-1], True)
    q, k, v, out, grad_out, lse = (x.contiguous() for x in (q, k, v, out, grad_out, lse))
    dq, dk, dv, delta = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(lse)
    constants = _constants(q, k, is_causal, scale)
    library, name = str(backward.shared_library), backward.name(q.shape[-1])
    # With dropout, each function's twin: the seed after the inputs, two more constants; with a key
    # bias (the masked pair), the key-bias twin: the bias after the inputs.
    suffix, seed = ("_dropout", [_seed(dropout_seed)]) if dropout_p else ("", [])
    if bias is not None:
        suffix, seed = "_key_bias", [bias]
    if dropout_p:
        constants += dropout_constants(dropout_p)

    def function(part: str, bindings: int):
        return _function(library, f"{name}_{part}{suffix}", bindings + len(seed), bool(dropout_p))

    bh, bh_kv, threads = math.prod(q.shape[:-2]), math.prod(k.shape[:-2]), torch.get_num_threads()
    if backward.fuses_backward(bh_kv, threads):
        _run(function("fused", 10), (q, k, v, out, grad_out, lse, *seed, dq, delta, dk, dv), constants,
             backward.fused_workgroups(bh_kv, threads))
    else:
        _run(function("dq", 8), (q, k, v, out, grad_out, lse, *seed, dq, delta), constants,
             backward.workgroups(q.shape[-2], bh, threads))
        _run(function("dkdv", 8), (q, k, v, grad_out, lse, delta, *seed, dk, dv), constants,
             backward.workgroups(k.shape[-2], bh_kv, threads))
    return dq, dk, dv


def _attention_backward_dropout_cpu(grad_out, q, k, v, out, lse, dropout_p, dropout_seed, is_causal=False,
                                    scale=None):
    return _attention_backward_cpu(grad_out, q, k, v, out, lse, is_causal, scale, dropout_p, dropout_seed)


def _masked_pair_route(q, k, v, attn_mask) -> tuple[torch.Tensor, bool] | str:
    """How the masked training pair takes a call, decided from the mask alone so that a backward
    takes its forward's route: (key bias, causal) for our kernels' key-bias entries (`mask_route`,
    where the forward-with-lse and backward kernels take the operands); "textbook" for a float mask
    with a query row at finfo.min everywhere, whose gradients every fused backward gets wrong
    (masked_training_ops.sdpa_misses_rows: a pass over the mask, which the CPU affords on every
    call); else "aten", ATen's CPU flash attention."""
    if attn_mask.dtype != torch.bool and bool(masked_training_ops.sdpa_misses_rows(attn_mask)):
        return "textbook"
    if kernel_problem(q, k, v, backward=True, library=True) is None:
        route = mask_route(attn_mask, q, k, False)
        if route is not None:
            return route
    return "aten"


def _attention_forward_masked_cpu(q, k, v, attn_mask, scale=None):
    route = _masked_pair_route(q, k, v, attn_mask)
    if route == "aten":
        return masked_training_ops.aten_forward(q, k, v, attn_mask, scale)
    if route == "textbook":
        out = reference_attention(q, k, v, attn_mask, 0.0, False, scale).contiguous()
        return out, torch.zeros(q.shape[:-1], dtype=torch.float32)  # the textbook backward needs no lse
    bias, causal = route
    return _forward(q, k, v, causal, scale, with_lse=True, bias=bias)


def _attention_backward_masked_cpu(grad_out, q, k, v, attn_mask, out, lse, scale=None):
    route = _masked_pair_route(q, k, v, attn_mask)
    if route == "aten":
        return masked_training_ops.aten_backward(grad_out, q, k, v, attn_mask, out, lse, scale)
    if route == "textbook":
        return textbook_gradients(grad_out, q, k, v, attn_mask, False, scale)[:3]
    bias, causal = route
    return _attention_backward_cpu(grad_out, q, k, v, out, lse, causal, scale, bias=bias)


def register(library: torch.library.Library) -> None:
    """Make the CPU kernels our ops' implementation on CPU tensors, in `library` (an IMPL one)."""
    library.impl("attention", _attention_cpu, "CPU")
    library.impl("attention_forward", _attention_forward_cpu, "CPU")
    library.impl("attention_backward", _attention_backward_cpu, "CPU")
    library.impl("attention_forward_dropout", _attention_forward_dropout_cpu, "CPU")
    library.impl("attention_backward_dropout", _attention_backward_dropout_cpu, "CPU")
    library.impl("attention_forward_masked", _attention_forward_masked_cpu, "CPU")
    library.impl("attention_backward_masked", _attention_backward_masked_cpu, "CPU")
