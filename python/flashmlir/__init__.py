"""flashmlir: exact flash attention for PyTorch models, compiled through MLIR and IREE.

Use it through `torch.compile(model, backend="flashmlir")` (registered by entry point, no import
needed) or inspect what it would do with `flashmlir.explain(model, *inputs)`.

The package is split along the pipeline (docs/ARCHITECTURE.md):
`frontend` (FX matching, custom op, import) → `passes` (our MLIR passes) → `compiler` (targets,
pipeline, IREE, cache) → `runtime` (loading and running modules on torch tensors).
Importing `flashmlir` stays cheap: torch and IREE are imported by the submodules that need them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from flashmlir.report import ExplainReport


def explain(fn_or_module: Any, *example_inputs: Any, compile: bool = True,
            backend_options: dict[str, Any] | None = None, **example_kwargs: Any) -> ExplainReport:
    """Run `fn_or_module(*example_inputs, **example_kwargs)` under torch.compile; report every site.

    `backend_options` are the backend's torch.compile options (e.g. {"rest": "iree"}). See
    `flashmlir.report` for what the report holds.
    """
    from flashmlir.report import explain_run

    return explain_run(fn_or_module, *example_inputs, compile=compile, backend_options=backend_options,
                       **example_kwargs)


__all__ = ["__version__", "explain"]
