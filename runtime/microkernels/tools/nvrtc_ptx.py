"""Compile one CUDA source to PTX with NVRTC: the library's route to Volta (sm_70) code.

    python nvrtc_ptx.py --nvrtc .../libnvrtc.so.12 --arch compute_70 -I .../include -D NAME=VALUE src.cu -o out.ptx

nvcc 13 dropped sm_70, and the CUDA 12 nvcc on the package index (nvidia-cuda-nvcc-cu12) ships only
ptxas and the NVVM library, not the nvcc driver; NVRTC from nvidia-cuda-nvrtc-cu12 compiles CUDA
C++ for compute_70 (`pip install '.[volta]'`). The PTX goes into the library as is: the driver
JIT-compiles it for the GPU it runs on (a V100, or any newer GPU). CMake calls this with the
build's Python; it needs nothing but the NVRTC shared library (ctypes).
"""

from __future__ import annotations

import argparse
import ctypes
import sys
from pathlib import Path


def _check(nvrtc, result: int, what: str, program=None) -> None:
    if result == 0:
        return
    nvrtc.nvrtcGetErrorString.restype = ctypes.c_char_p
    message = nvrtc.nvrtcGetErrorString(result).decode()
    log = ""
    if program is not None:
        size = ctypes.c_size_t()
        nvrtc.nvrtcGetProgramLogSize(program, ctypes.byref(size))
        buffer = ctypes.create_string_buffer(size.value)
        nvrtc.nvrtcGetProgramLog(program, buffer)
        log = buffer.value.decode(errors="replace")
    sys.exit(f"nvrtc_ptx: {what} failed: {message}\n{log}")


def compile_ptx(nvrtc_path: Path, source: Path, options: list[str]) -> bytes:
    nvrtc = ctypes.CDLL(str(nvrtc_path))
    program = ctypes.c_void_p()
    _check(nvrtc, nvrtc.nvrtcCreateProgram(ctypes.byref(program), source.read_bytes(), source.name.encode(), 0,
                                           None, None), "nvrtcCreateProgram")
    encoded = [o.encode() for o in options]
    argv = (ctypes.c_char_p * len(encoded))(*encoded)
    _check(nvrtc, nvrtc.nvrtcCompileProgram(program, len(encoded), argv), "compiling " + str(source), program)
    size = ctypes.c_size_t()
    _check(nvrtc, nvrtc.nvrtcGetPTXSize(program, ctypes.byref(size)), "nvrtcGetPTXSize")
    ptx = ctypes.create_string_buffer(size.value)
    _check(nvrtc, nvrtc.nvrtcGetPTX(program, ptx), "nvrtcGetPTX")
    nvrtc.nvrtcDestroyProgram(ctypes.byref(program))
    return ptx.raw  # NUL-terminated, as cuModuleLoadDataEx wants PTX


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("source", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--nvrtc", type=Path, required=True, help="libnvrtc.so of a CUDA 12 toolkit")
    p.add_argument("--arch", default="compute_70")
    p.add_argument("-I", dest="includes", action="append", default=[])
    p.add_argument("-D", dest="defines", action="append", default=[])
    args = p.parse_args()
    options = [f"--gpu-architecture={args.arch}", "--std=c++17", "-default-device", "--use_fast_math",
               *(f"-I{i}" for i in args.includes), *(f"-D{d}" for d in args.defines)]
    args.output.write_bytes(compile_ptx(args.nvrtc, args.source, options))


if __name__ == "__main__":
    main()
