"""Driving IREE's compiler in-process: one Session per compile, phases, captured diagnostics.

We keep the module in memory from import to .vmfb (the FX importer writes into the Session's own
MLIR context). IREE runs as a sequence of phases; normally one invocation goes from the input to
the VM module, and with IR dumps requested it stops after each phase worth reading
(`IREE_DUMP_PHASES`), exports the module, and resumes from there. The Python `Invocation` class
of iree-base-compiler 3.13 has no phase setters, so they are called through its C API.
"""

from __future__ import annotations

import ctypes
import shlex
from collections.abc import Callable
from pathlib import Path

from iree.compiler import ir
from iree.compiler.api import Invocation, Output, Session, ctypes_dl

from flashmlir.errors import CompileError

# Phases (iree-compile --compile-to) whose IR a person reads when debugging our lowering:
# after input conversion (our dispatch next to IREE's ops), after dispatch formation, and with the
# codegen configuration each dispatch got (the lowering configs our passes chose).
IREE_DUMP_PHASES = ("input", "flow", "executable-sources", "executable-configurations")

_dylib = ctypes_dl._dylib
_dylib.ireeCompilerInvocationSetCompileToPhase.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
_dylib.ireeCompilerInvocationSetCompileFromPhase.argtypes = [ctypes.c_void_p, ctypes.c_char_p]


def new_session(flags: tuple[str, ...]) -> Session:
    session = Session()
    session.set_flags("--iree-input-type=auto", *flags)
    return session


def _set_phases(invocation: Invocation, from_phase: str | None, to_phase: str | None) -> None:
    if from_phase:
        _dylib.ireeCompilerInvocationSetCompileFromPhase(invocation._inv_p, from_phase.encode())
    if to_phase:
        _dylib.ireeCompilerInvocationSetCompileToPhase(invocation._inv_p, to_phase.encode())


_SEVERITY = {0: "note", 1: "warning", 2: "error", 3: "remark"}
_DIAGNOSTIC_CALLBACK = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
_dylib.ireeCompilerInvocationEnableCallbackDiagnostics.argtypes = [
    ctypes.c_void_p, ctypes.c_int, _DIAGNOSTIC_CALLBACK, ctypes.c_void_p]


class _Diagnostics:
    """Collects an invocation's diagnostics through IREE's callback API.

    `Invocation.execute()` runs with the GIL released, so a Python handler attached to the MLIR
    context would be called without it and abort the process on the first error. A ctypes
    callback takes the GIL itself.
    """

    def __init__(self, invocation: Invocation):
        self.messages: list[str] = []

        def collect(severity: int, message: int, size: int, _user: int) -> None:
            text = ctypes.string_at(message, size).decode(errors="replace")
            if severity in (1, 2):
                self.messages.append(f"{_SEVERITY[severity]}: {text}")

        self._callback = _DIAGNOSTIC_CALLBACK(collect)  # kept alive as long as the invocation
        _dylib.ireeCompilerInvocationEnableCallbackDiagnostics(invocation._inv_p, 0, self._callback, None)


def reproducer_command(flags: tuple[str, ...], repro: Path) -> str:
    return " ".join(["iree-compile", "--iree-input-type=auto", *map(shlex.quote, flags),
                     shlex.quote(str(repro)), "-o", "out.vmfb"])


def compile_to_vmfb(
    session: Session,
    module: ir.Module,
    flags: tuple[str, ...],
    *,
    dump: Callable[[str, str], None] | None = None,
    save_reproducer: Callable[[str, str], Path] | None = None,
) -> bytes:
    """Compile `module` (in `session.context`) to a .vmfb.

    `dump(stage, ir_text)` receives the IR after each phase in IREE_DUMP_PHASES when given.
    On failure, `save_reproducer(name, ir_text)` stores the input of the failing invocation and the
    raised CompileError carries the command that reproduces it.
    """
    phases = list(IREE_DUMP_PHASES) if dump is not None else []
    current, previous = module, None
    for phase in [*phases, None]:
        text_before = str(current) if save_reproducer is not None else ""
        invocation = session.invocation()
        diags = _Diagnostics(invocation)
        invocation.import_module(current.operation)
        _set_phases(invocation, previous, phase)
        ok = invocation.execute()
        stage = f"iree-{phase or 'vm'}"
        if not ok:
            repro = save_reproducer(stage, text_before) if save_reproducer else None
            command = reproducer_command(flags, repro) if repro else None
            if command and previous:
                command += f" --compile-from={previous}"
            raise CompileError(stage, diags.messages or ["IREE reported failure without diagnostics"], command)
        if phase is None:
            output = Output.open_membuffer()
            invocation.output_vm_bytecode(output)
            return bytes(output.map_memory())
        current = invocation.export_module()
        if dump is not None:
            dump(stage, str(current))
        previous = phase
    raise AssertionError("unreachable")
