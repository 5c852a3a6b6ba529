"""A compiled module loaded on an IREE device, called with torch tensors.

Tensors cross by DLPack without copies: inputs (and, for modules compiled with
flashmlir-bind-result-storage, the output storage the caller allocated with torch) are wrapped as
IREE buffer views over torch's memory (`HalDevice.from_dlpack_capsule`). Plain results, if a
module returns any, are handed to torch as views of IREE's buffers. Only non-contiguous inputs
are copied (IREE takes dense row-major buffers).

CUDA ordering. IREE 3.13's CUDA HAL runs on its own stream and cannot wait on or signal CUDA
events (its timepoint import/export is unimplemented), so a call synchronizes instead:
1. before IREE starts, torch's current stream on the device is synchronized, so every torch
   kernel that writes an input (or still reads memory IREE is about to reuse) has finished;
2. the module's synchronous entry point returns only after IREE's work completed, so torch
   kernels queued afterwards see the results.
Outputs written into torch-allocated storage stay under torch's stream-ordered allocator, so
their lifetime needs nothing more.

CPU waits. A call on local-task wakes the calling thread from IREE's last worker, and the waiter
then spins until that worker has finished its hand-off. With as many workers as cores, Linux lets
the freshly woken caller preempt the very worker it waits for, and the spin lasts a scheduler time
slice: on the 2-core CI machine ~5 ms of burnt CPU on ~1 in 2 calls (a 3 ms attention took 8 ms).
Under SCHED_BATCH a woken thread does not preempt, so the caller runs its invoke in that policy and
goes back to its own after it (three syscalls, a few µs; only from the default policy).

CUDA contexts. IREE's CUDA HAL uses the device's primary context, as torch does, but loads
executables and launches in whichever context is current on the calling thread. aot_autograd
compiles and runs backward graphs in autograd's own worker thread, where nothing has made a
context current yet; a torch runtime call on the device first makes the primary context current.
"""

from __future__ import annotations

import contextlib
import functools
import os

import iree.runtime as rt
import torch

from flashmlir.log import logger

# DLPack device type codes (dlpack.h).
_DLPACK_DEVICE = {"local-task": 1, "local-sync": 1, "cuda": 2}


@functools.cache
def _config(driver: str, device_index: int) -> rt.Config:
    """One IREE instance and device per (driver, device) per process."""
    if driver != "cuda":
        return rt.Config(driver)
    hal_driver = rt.get_driver("cuda")
    infos = hal_driver.query_available_devices()
    uuid = str(torch.cuda.get_device_properties(device_index).uuid).lower()
    chosen = next((info for info in infos if uuid and uuid in str(info).lower()), None)
    if chosen is None:
        # No UUID in IREE's device list: both enumerate CUDA devices in the driver's order.
        chosen = infos[device_index]
        logger.info("IREE CUDA device matched to torch cuda:%d by index (%s)", device_index, chosen)
    return rt.Config(device=hal_driver.create_device(chosen))


class _WakeWithoutPreemption:
    """Runs the calling thread under SCHED_BATCH inside the block (Linux, from SCHED_OTHER only)."""

    available = hasattr(os, "SCHED_BATCH")
    _param = os.sched_param(0) if available else None

    def __enter__(self) -> bool:
        if not self.available or os.sched_getscheduler(0) != os.SCHED_OTHER:
            self.switched = False
            return False
        try:
            os.sched_setscheduler(0, os.SCHED_BATCH, self._param)
        except OSError as e:  # a sandbox that forbids it: call as before
            type(self).available = False
            logger.info("cannot switch the calling thread to SCHED_BATCH around IREE calls (%s)", e)
            self.switched = False
            return False
        self.switched = True
        return True

    def __exit__(self, *exc) -> None:
        if self.switched:
            os.sched_setscheduler(0, os.SCHED_OTHER, self._param)


def _make_context_current(driver: str, device_index: int) -> None:
    if driver == "cuda":
        torch.cuda.synchronize(device_index)


class IreeModule:
    """One .vmfb on one device; `module(*tensors)` runs its function and returns its results."""

    # Tests turn this off to show that they catch a missing synchronization.
    synchronize_torch_stream = True

    def __init__(self, vmfb: bytes, driver: str = "local-task", function: str = "main", device_index: int = 0):
        if driver not in _DLPACK_DEVICE:
            raise ValueError(f"no torch interop for IREE driver '{driver}' yet")
        _make_context_current(driver, device_index)
        config = _config(driver, device_index)
        self._driver, self._device_index = driver, device_index
        self._device = config.device
        self._dlpack_device = _DLPACK_DEVICE[driver]
        self._vm_module = rt.VmModule.copy_buffer(config.vm_instance, vmfb)
        self._context = rt.VmContext(config.vm_instance, modules=[*config.default_vm_modules, self._vm_module])
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
        if self._driver == "cuda":
            if self.synchronize_torch_stream:
                torch.cuda.current_stream(self._device_index).synchronize()
            else:  # (tests only) still the thread's context, just without waiting for torch
                torch.cuda.set_device(self._device_index)
        results = rt.VmVariantList(4)
        with _WakeWithoutPreemption() if self._driver == "local-task" else contextlib.nullcontext():
            self._context.invoke(self._function, args, results)
        if results.size and self._driver == "cuda":
            raise RuntimeError(
                "IREE 3.13's CUDA HAL cannot export its buffers to torch; compile the module with "
                "flashmlir-bind-result-storage and pass output tensors in")
        return [
            torch.from_dlpack(self._device.create_dlpack_capsule(
                results.get_as_object(i, rt.HalBufferView), self._dlpack_device, self._device_index))
            for i in range(results.size)
        ]
