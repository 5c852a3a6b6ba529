"""A compiled module loaded on an IREE device, called with torch tensors, returning torch tensors.

Tensors cross by DLPack in both directions without copies: inputs are wrapped as IREE buffer
views over torch's memory (`HalDevice.from_dlpack_capsule`), results are handed to torch as views
of IREE's buffers (`create_dlpack_capsule`). Only non-contiguous inputs are copied (IREE takes
dense row-major buffers). One IREE instance and device per driver per process.
"""

from __future__ import annotations

import functools

import iree.runtime as rt
import torch

# DLPack device type codes (dlpack.h).
_DLPACK_DEVICE = {"local-task": 1, "local-sync": 1}


@functools.cache
def _runtime(driver: str) -> rt.Config:
    return rt.Config(driver)


class IreeModule:
    """One .vmfb on one device; `module(*tensors)` runs its function and returns its results."""

    def __init__(self, vmfb: bytes, driver: str = "local-task", function: str = "main"):
        if driver not in _DLPACK_DEVICE:
            raise ValueError(f"no torch interop for IREE driver '{driver}' yet")
        runtime = _runtime(driver)
        self._device = runtime.device
        self._dlpack_device = _DLPACK_DEVICE[driver]
        self._vm_module = rt.VmModule.copy_buffer(runtime.vm_instance, vmfb)
        self._context = rt.VmContext(runtime.vm_instance, modules=[*runtime.default_vm_modules, self._vm_module])
        self._function = self._vm_module.lookup_function(function)
        if self._function is None:
            names = ", ".join(self._vm_module.function_names)
            raise ValueError(f"module has no function '{function}' (has: {names})")

    def __call__(self, *tensors: torch.Tensor) -> list[torch.Tensor]:
        args = rt.VmVariantList(len(tensors))
        for t in tensors:
            t = t.detach()
            if not t.is_contiguous():
                t = t.contiguous()
            args.push_ref(self._device.from_dlpack_capsule(torch.utils.dlpack.to_dlpack(t)))
        results = rt.VmVariantList(4)
        self._context.invoke(self._function, args, results)
        return [
            torch.from_dlpack(
                self._device.create_dlpack_capsule(results.get_as_object(i, rt.HalBufferView), self._dlpack_device, 0)
            )
            for i in range(results.size)
        ]
