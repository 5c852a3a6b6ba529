"""Reading and writing MLIR text, with errors a person can act on.

One `ir.Context` from `iree.compiler` has every dialect we meet registered: torch, torch_c,
tm_tensor, iree_linalg_ext, flow, hal, util, linalg, tensor, arith, scf, ... .
"""

from __future__ import annotations

import re
from pathlib import Path

from iree.compiler import ir

from flashmlir.errors import InputError

_LOC = re.compile(r'loc\("-":(\d+):(\d+)\)')


def new_context() -> ir.Context:
    return ir.Context()


def format_diagnostic(diagnostic: ir.DiagnosticInfo | ir.Diagnostic, source_name: str = "-") -> str:
    """'file:line:col: message' from an MLIR diagnostic, whatever name the parser gave the buffer."""
    loc = str(diagnostic.location)
    match = _LOC.search(loc)
    where = f"{source_name}:{match.group(1)}:{match.group(2)}" if match else loc
    return f"{where}: {diagnostic.message}"


def parse_module(text: str, context: ir.Context, source_name: str = "-") -> ir.Module:
    """Parse MLIR assembly; raise InputError naming the file, line and what is wrong."""
    try:
        return ir.Module.parse(text, context)
    except ir.MLIRError as e:
        details = [format_diagnostic(d, source_name) for d in e.error_diagnostics]
        first = details[0] if details else f"{source_name}: {e.message}"
        raise InputError(f"malformed MLIR: {first}") from None


def read_text(path: str | Path) -> str:
    """The file's text; InputError (one line) if it is missing or unreadable."""
    try:
        return Path(path).read_text()
    except FileNotFoundError:
        raise InputError(f"no such file: '{path}'") from None
    except IsADirectoryError:
        raise InputError(f"'{path}' is a directory, expected a file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"cannot read '{path}': {e}") from None


def looks_like_torch(text: str) -> bool:
    """Whether MLIR text is torch-dialect input (it then goes through IREE's torch conversion)."""
    return "!torch." in text or "torch.aten." in text or "torch.operator" in text
