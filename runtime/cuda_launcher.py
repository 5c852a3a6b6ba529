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
import struct

import torch

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
        if shared_bytes > self._shared_limit:
            _check(_driver().cuFuncSetAttribute(self._function, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                                                shared_bytes), "cuFuncSetAttribute(max dynamic shared memory)")
            self._shared_limit = shared_bytes
        # Every argument as a 64-bit slot (a u32 reads the low half: little-endian hosts), one ctypes
        # array for the values and one for the pointers to them. A ctypes object and a cast per
        # argument were about half of a small launch's host time (cProfile).
        words = []
        for a in args:
            if isinstance(a, torch.Tensor):
                if not a.is_cuda or not a.is_contiguous():
                    raise ValueError(f"{self.name}: tensor arguments must be contiguous CUDA tensors")
                words.append(a.data_ptr())
            else:
                words.append(a & 0xFFFFFFFF)
        values = (ctypes.c_uint64 * len(words))(*words)
        base = ctypes.addressof(values)
        params = (ctypes.c_void_p * len(words))(*range(base, base + 8 * len(words), 8))
        stream = ctypes.c_void_p(torch._C._cuda_getCurrentRawStream(self.device))
        _check(_driver().cuLaunchKernel(self._function, *grid, *block, shared_bytes, stream, params, None),
               f"cuLaunchKernel({self.name})")


@functools.cache
def multiprocessors(device: int) -> int:
    """The device's SM count (a persistent kernel's grid)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@functools.cache
def _loaded(object_path: str, name: str, device: int) -> CudaKernel:
    with open(object_path, "rb") as f:
        return CudaKernel(f.read(), name, device)


def attention_forward(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, causal: bool,
                      scale: float | None = None, with_lse: bool = False):
    """Run a library attention kernel (a `flashmlir.compiler.microkernels.CudaAttentionKernel`) on
    [B, H, S, D] tensors as the IREE dispatch would: same image, grid, block, shared memory and
    constants. Returns O, or (O, lse) with lse [B, Hq, Sq] in float32."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    o = torch.empty_like(q)
    name = kernel.name + ("_lse" if with_lse else "")
    device = q.device.index or 0
    fn = _loaded(str(kernel.object_path), name, device)
    outputs = (o, torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)) if with_lse else (o,)
    fn(kernel.grid(sq, b * hq, multiprocessors(device), causal), (kernel.threads, 1, 1), kernel.shared_bytes, q, k, v,
       *outputs, hq // hkv, sq, sk, f32_bits(scale), int(causal), b * hq)
    return outputs if with_lse else o


def attention_backward(kernel, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       d_o: torch.Tensor, lse: torch.Tensor, *, causal: bool, scale: float | None = None):
    """Run a library backward kernel set (a `CudaAttentionBackwardKernel`) on [B, H, S, D] tensors as
    the IREE dispatches would, its `parts` in order: sm_80 dq (which also writes Δ) then dkdv; sm_90
    prep (Δ, lse₂, the zeroed dQ accumulator), dkdv (adding into it), dq. lse is the forward's,
    float32 [B, Hq, Sq]. Returns dq, dk, dv."""
    b, hq, sq, d = q.shape
    hkv, sk = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    device = q.device.index or 0
    constants = (hq // hkv, sq, sk, f32_bits(scale), int(causal), b * hq)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)

    def launch(part: str, seq: int, batch_heads: int, *tensors: torch.Tensor) -> None:
        fn = _loaded(str(kernel.object_path), kernel.name(part), device)
        fn(kernel.grid(part, seq, batch_heads), (kernel.threads(part), 1, 1), kernel.shared_bytes(part), *tensors,
           *constants)

    if kernel.accumulates_dq:
        rows = kernel.padded_rows(sq)
        lse2 = torch.empty(b * hq, rows, device=q.device, dtype=torch.float32)
        delta = torch.empty_like(lse2)
        dq_accum = torch.empty(b * hq, rows, d, device=q.device, dtype=torch.float32)
        launch("prep", sq, b * hq, o, d_o, lse, lse2, delta, dq_accum)
        launch("dkdv", sk, b * hkv, q, k, v, d_o, lse2, delta, dq_accum, dk, dv)
        launch("dq", sq, b * hq, dq_accum, dq)
        return dq, dk, dv
    delta = torch.empty(b, hq, sq, device=q.device, dtype=torch.float32)
    launch("dq", sq, b * hq, q, k, v, o, d_o, lse, dq, delta)
    launch("dkdv", sk, b * hkv, q, k, v, d_o, lse, delta, dk, dv)
    return dq, dk, dv
