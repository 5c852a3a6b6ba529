"""Launch a microkernel from its CUDA image directly, on torch tensors, without IREE.

The kernels reach users through IREE (hal.dispatch.extern); this path exists so that each kernel
can be tested against a float64 reference and tuned on its own, with the same image bytes and
the same ABI IREE uses: device pointers for the bindings, then 32-bit constants. It is the CUDA
driver API through ctypes (torch has no loader for a cubin/fatbin), in torch's primary context,
on torch's current stream.
"""

from __future__ import annotations

import ctypes
import functools
import math
import struct

import torch

from flashmlir.compiler import microkernels

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8


@functools.cache
def _driver() -> ctypes.CDLL:
    lib = ctypes.CDLL("libcuda.so.1")
    lib.cuGetErrorString.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
    return lib


def _check(status: int, what: str) -> None:
    if status != 0:
        message = ctypes.c_char_p()
        _driver().cuGetErrorString(status, ctypes.byref(message))
        raise RuntimeError(f"{what} failed: CUDA error {status} ({(message.value or b'?').decode()})")


def f32_bits(x: float) -> int:
    """A float constant as IREE passes it: the 32 bits of an f32."""
    return struct.unpack("<I", struct.pack("<f", x))[0]


class CudaKernel:
    """One `extern "C"` kernel of a cubin/fatbin/PTX image, loaded on a torch device."""

    def __init__(self, image: bytes, name: str, device: int = 0):
        torch.cuda.synchronize(device)  # initializes torch and makes the primary context current
        self._image = ctypes.create_string_buffer(image, len(image))  # kept alive with the module
        self._module, self._function = ctypes.c_void_p(), ctypes.c_void_p()
        _check(_driver().cuModuleLoadData(ctypes.byref(self._module), self._image), "cuModuleLoadData")
        _check(_driver().cuModuleGetFunction(ctypes.byref(self._function), self._module, name.encode()),
               f"cuModuleGetFunction({name})")
        self.name, self.device, self._shared_limit = name, device, 0

    def registers(self) -> int:
        value = ctypes.c_int()
        _check(_driver().cuFuncGetAttribute(ctypes.byref(value), 4, self._function), "cuFuncGetAttribute")
        return value.value  # CU_FUNC_ATTRIBUTE_NUM_REGS

    def __call__(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int,
                 *args: torch.Tensor | int) -> None:
        """Launch on torch's current stream; tensors pass as device pointers, ints as u32."""
        words = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if not a.is_cuda or not a.is_contiguous():
                    raise ValueError(f"{self.name}: tensor arguments must be contiguous CUDA tensors")
                words.append(a.data_ptr())
            else:
                words.append(a & 0xFFFFFFFF)
        self.launch(grid, block, shared_bytes, words)

    def launch(self, grid: tuple[int, int, int], block: tuple[int, int, int], shared_bytes: int,
               words: list[int]) -> None:
        """Launch with the arguments already as 64-bit words (pointers, and u32 constants, which a
        kernel reads from the low half: little-endian hosts) on torch's current stream."""
        if shared_bytes > self._shared_limit:
            _check(_driver().cuFuncSetAttribute(self._function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                shared_bytes), "cuFuncSetAttribute(max dynamic shared memory)")
            self._shared_limit = shared_bytes
        # One ctypes array for the values and one for the pointers to them: a ctypes object and a
        # cast per argument were about half of a small launch's host time (cProfile).
        values = (ctypes.c_uint64 * len(words))(*words)
        base = ctypes.addressof(values)
        params = (ctypes.c_void_p * len(words))(*range(base, base + 8 * len(words), 8))
        stream = ctypes.c_void_p(torch._C._cuda_getCurrentRawStream(self.device))
        _check(_driver().cuLaunchKernel(self._function, *grid, *block, shared_bytes, stream, params, None),
               f"cuLaunchKernel({self.name})")


def dropout_constants(p: float) -> list[int]:
    """What a dropout entry takes after the constants (microkernels.dropout_constants), the scale as
    f32 bits."""
    threshold, keep_scale = microkernels.dropout_constants(p)
    return [threshold, f32_bits(keep_scale)]


@functools.cache
def multiprocessors(device: int) -> int:
    """The device's SM count (a persistent kernel's grid)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _loaded(object_path: str, name: str, device: int) -> CudaKernel:
    with open(object_path, "rb") as f:
        return CudaKernel(f.read(), name, device)


class AttentionForwardLaunch:
    """A forward kernel's launch for one problem (shapes, causal, scale), worked out once.

    What a call then does is the least the launch needs: outputs allocated, pointers and the
    precomputed constants packed, one cuLaunchKernel. A training step calls the same problem every
    layer, and the launch's Python (grid, constants, kernel lookup) was more host time than a
    GPT-2-sized kernel's GPU time (`benchmarks/host_overhead.py`)."""

    def __init__(self, kernel, q_shape: tuple[int, ...], k_shape: tuple[int, ...], causal: bool,
                 scale: float | None, with_lse: bool, device: int, dropout_p: float = 0.0):
        *lead, hq, sq, d = q_shape
        hkv, sk = k_shape[-3], k_shape[-2]
        batch_heads = math.prod(lead) * hq
        scale = d ** -0.5 if scale is None else scale
        if dropout_p and not (with_lse and kernel.dropout):
            raise ValueError(f"{kernel.name}: dropout needs the lse entry of a kernel with a dropout twin")
        self.kernel = kernel
        entry = kernel.name + ("_lse" if with_lse else "") + ("_dropout" if dropout_p else "")
        self._function = _loaded(str(kernel.object_path), entry, device)
        self._grid = kernel.grid(sq, batch_heads, multiprocessors(device), causal)
        self._block, self._shared = (kernel.threads, 1, 1), kernel.shared_bytes
        self._constants = [hq // hkv, sq, sk, f32_bits(scale), int(causal), batch_heads]
        if dropout_p:
            self._constants += dropout_constants(dropout_p)
        self._dropout = bool(dropout_p)
        self._lse_shape = tuple(q_shape[:-1]) if with_lse else None
        self._workspace = kernel.workspace_bytes(self._grid)

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seed: torch.Tensor | None = None):
        """O (shaped as q), or (O, lse) with lse float32 q.shape[:-1]; q, k, v contiguous. With
        dropout, `seed` is the int64 scalar tensor the mask derives from (read on the device)."""
        o = torch.empty_like(q)
        outputs = [o]
        if self._lse_shape is not None:
            outputs.append(torch.empty(self._lse_shape, device=q.device, dtype=torch.float32))
        # A TMA kernel's tensor maps: per call, as IREE's transient would be (torch's allocator keeps
        # it from another launch's use until this one's stream has passed it).
        workspace = ([torch.empty(self._workspace, device=q.device, dtype=torch.uint8)] if self._workspace else [])
        inputs = (q, k, v, _dropout_seed(seed, q.device)) if self._dropout else (q, k, v)
        self._function.launch(self._grid, self._block, self._shared,
                              [t.data_ptr() for t in (*inputs, *outputs, *workspace)] + self._constants)
        return o if self._lse_shape is None else tuple(outputs)


class AttentionBackwardLaunch:
    """A backward kernel set's launches for one problem, worked out once (as AttentionForwardLaunch).

    The kernels run in `kernel.parts` order on torch's current stream: sm_80 dq (which also writes
    Δ) then dkdv; sm_90 prep (Δ, lse₂, the zeroed dQ accumulator), dkdv (adding into it), dq. The
    sm_90 scratch (lse₂, Δ, accumulator) is one allocation, its pieces addressed by offsets."""

    def __init__(self, kernel, q_shape: tuple[int, ...], k_shape: tuple[int, ...], causal: bool,
                 scale: float | None, device: int, dropout_p: float = 0.0):
        *lead, hq, sq, d = q_shape
        hkv, sk = k_shape[-3], k_shape[-2]
        batch = math.prod(lead)
        scale = d ** -0.5 if scale is None else scale
        if dropout_p and not kernel.dropout:
            raise ValueError(f"{kernel.family}: its backward kernels have no dropout twins")
        self._constants = [hq // hkv, sq, sk, f32_bits(scale), int(causal), batch * hq]
        # A dropout twin takes the seed after its inputs and two more constants.
        self._dropout = dropout_constants(dropout_p) if dropout_p else None
        self._dropout_parts = kernel.dropout_parts if dropout_p else ()
        self._accumulates = kernel.accumulates_dq
        self._launches = {}
        for part in kernel.parts:
            seq, batch_heads = (sk, batch * hkv) if part == "dkdv" else (sq, batch * hq)
            grid = kernel.grid(part, seq, batch_heads)
            entry = kernel.name(part) + ("_dropout" if part in self._dropout_parts else "")
            self._launches[part] = (_loaded(str(kernel.object_path), entry, device), grid,
                                    (kernel.threads(part), 1, 1), kernel.shared_bytes(part))
        self._workspace = kernel.workspace_bytes("dkdv", self._launches["dkdv"][1])
        rows = kernel.padded_rows(sq) if self._accumulates else sq
        self._statistics = batch * hq * rows  # floats in each of lse₂ and Δ (sm_80: Δ only)
        self._scratch = self._statistics * ((2 + d) if self._accumulates else 1)

    def _launch(self, part: str, *words: int) -> None:
        function, grid, block, shared = self._launches[part]
        extra = self._dropout if part in self._dropout_parts else ()
        function.launch(grid, block, shared, [*words, *self._constants, *extra])

    def __call__(self, q, k, v, o, d_o, lse, seed: torch.Tensor | None = None):
        """dq, dk, dv; every operand contiguous, lse the forward's (float32 q.shape[:-1]); with
        dropout, `seed` the forward's."""
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        # Freed when this returns, before the kernels run: safe, as torch's allocator hands the
        # memory out again only in this stream's order.
        scratch_tensor = torch.empty(self._scratch, device=q.device, dtype=torch.float32)
        scratch = scratch_tensor.data_ptr()
        q, k, v, o, d_o, lse = (t.data_ptr() for t in (q, k, v, o, d_o, lse))
        seeds = [_dropout_seed(seed, dq.device).data_ptr()] if self._dropout else []  # the twins' one more input
        if self._accumulates:
            lse2, delta, accumulator = scratch, scratch + 4 * self._statistics, scratch + 8 * self._statistics
            self._launch("prep", o, d_o, lse, lse2, delta, accumulator)
            # A TMA dkdv's tensor maps (see AttentionForwardLaunch), after its outputs.
            workspace = torch.empty(self._workspace, device=dq.device, dtype=torch.uint8) if self._workspace else None
            self._launch("dkdv", q, k, v, d_o, lse2, delta, *seeds, accumulator, dk.data_ptr(), dv.data_ptr(),
                         *([workspace.data_ptr()] if workspace is not None else []))
            self._launch("dq", accumulator, dq.data_ptr())
        else:
            self._launch("dq", q, k, v, o, d_o, lse, *seeds, dq.data_ptr(), scratch)
            self._launch("dkdv", q, k, v, d_o, lse, scratch, *seeds, dk.data_ptr(), dv.data_ptr())
        return dq, dk, dv


def _dropout_seed(seed: torch.Tensor | None, device: torch.device) -> torch.Tensor:
    """The seed as the kernels read it: one int64 in device memory."""
    if seed is None or seed.numel() != 1 or seed.dtype != torch.int64 or seed.device != device:
        raise ValueError(f"dropout needs its seed as one int64 on {device}, got {seed!r}")
    return seed.contiguous()


def _contiguous_cuda(*tensors: torch.Tensor) -> None:
    for t in tensors:
        if not t.is_cuda or not t.is_contiguous():
            raise ValueError("attention kernels take contiguous CUDA tensors")


def attention_forward(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                      scale: float | None = None, with_lse: bool = False, dropout_p: float = 0.0,
                      dropout_seed: torch.Tensor | None = None):
    """Run a library attention kernel (a `flashmlir.compiler.microkernels.CudaAttentionKernel`) on
    [*, H, S, D] tensors as the IREE dispatch would: same image, grid, block, shared memory and
    constants. Returns O, or (O, lse) with lse [*, Hq, Sq] in float32. Dropout (sm_90, sm_80, with lse)
    keeps what `attention_op.dropout_keep(dropout_seed, ...)` keeps."""
    _contiguous_cuda(q, k, v)
    launch = AttentionForwardLaunch(kernel, q.shape, k.shape, causal, scale, with_lse, q.device.index or 0, dropout_p)
    return launch(q, k, v, dropout_seed)


def attention_backward(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       d_o: torch.Tensor, lse: torch.Tensor, *, causal: bool, scale: float | None = None,
                       dropout_p: float = 0.0, dropout_seed: torch.Tensor | None = None):
    """Run a library backward kernel set (a `CudaAttentionBackwardKernel`) on [*, H, S, D] tensors
    as the IREE dispatches would. lse is the forward's, float32 [*, Hq, Sq]; with dropout, the
    forward's p and seed. Returns dq, dk, dv."""
    _contiguous_cuda(q, k, v, o, d_o, lse)
    launch = AttentionBackwardLaunch(kernel, q.shape, k.shape, causal, scale, q.device.index or 0, dropout_p)
    return launch(q, k, v, o, d_o, lse, dropout_seed)
