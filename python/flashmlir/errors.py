"""The errors flashmlir raises on purpose.

`FlashmlirError` and its subclasses are for things a user can act on: the CLIs print their message
as one line (no traceback) and exit non-zero; the torch.compile backend turns them into a logged
fallback to eager PyTorch (or re-raises them under FLASHMLIR_STRICT=1). Anything else is a bug.
"""

from __future__ import annotations


class FlashmlirError(Exception):
    """Base class: the message names what and why, in one line where possible."""


class InputError(FlashmlirError):
    """A missing or malformed input file, or an argument that makes no sense."""


class UnsupportedError(FlashmlirError):
    """A graph, op, dtype, shape or target that flashmlir does not compile (yet)."""


class CompileError(FlashmlirError):
    """A compile stage failed. Carries the stage, the compiler's diagnostics and a reproducer."""

    def __init__(self, stage: str, diagnostics: list[str], reproducer: str | None = None):
        self.stage = stage
        self.diagnostics = diagnostics
        self.reproducer = reproducer
        lines = [f"compile stage '{stage}' failed"]
        lines += [f"  {d}" for d in diagnostics[:20]]
        if len(diagnostics) > 20:
            lines.append(f"  ... ({len(diagnostics) - 20} more diagnostics)")
        if reproducer:
            lines.append(f"reproduce with: {reproducer}")
        super().__init__("\n".join(lines))
