"""The report behind `flashmlir.explain(model, *inputs)`: what the backend finds and compiles.

It runs `model(*inputs)` once under `torch.compile(backend="flashmlir")` and records:
- `.sites`: one entry per attention computation executed (a 2-layer model has 2, whether dynamo
  captured one graph or several, or reused one compiled graph for both layers);
- `.rejected`: every near miss (a softmax or SDPA call that is not attention we compile, with the
  reason) and every graph that fell back to eager PyTorch, with the reason;
- `.graphs`: what happened to each graph dynamo captured.
Like `torch._dynamo.explain`, it resets dynamo's caches before and after, so it sees a fresh
compile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from flashmlir.frontend.matcher import AttentionSite, NearMiss


@dataclass(frozen=True)
class Rejection:
    kind: str  # "near-miss" | "graph" | "pass"
    where: str
    reason: str


@dataclass
class GraphOutcome:
    name: str
    compiled: list[str] = field(default_factory=list)  # "graph 3 (inference)", ...
    rejected: list[str] = field(default_factory=list)
    tiled: int = 0  # attention ops our passes made flash attention, over this graph's compiled parts
    microkernels: int = 0  # of those, the ones that run as a microkernel of the library


@dataclass
class ExplainReport:
    sites: list[AttentionSite] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)
    graphs: dict[str, GraphOutcome] = field(default_factory=dict)

    # Recorder protocol (flashmlir.dynamo.backend) -------------------------------------------
    def graph_compiled(self, graph: str, tiled: int, declines: list[str], microkernels: int = 0) -> None:
        base = graph.split(" (")[0]
        outcome = self.graphs.setdefault(base, GraphOutcome(base))
        outcome.compiled.append(graph)
        outcome.tiled += tiled
        outcome.microkernels += microkernels
        self.rejected.extend(Rejection("pass", graph, d) for d in declines)

    def graph_rejected(self, graph: str, reason: str) -> None:
        self.graphs.setdefault(graph, GraphOutcome(graph)).rejected.append(reason)
        self.rejected.append(Rejection("graph", graph, reason))

    def graph_ran(self, graph: str, sites: list[AttentionSite], near_misses: list[NearMiss]) -> None:
        self.graphs.setdefault(graph, GraphOutcome(graph))
        self.sites.extend(sites)
        self.rejected.extend(Rejection("near-miss", f"{m.family} at {m.location}", m.reason)
                             for m in near_misses)

    # Views -----------------------------------------------------------------------------------
    @property
    def compiled(self) -> bool:
        """True if every graph was compiled (none fell back to eager)."""
        return all(g.compiled and not g.rejected for g in self.graphs.values())

    @property
    def tiled(self) -> int:
        """Attention ops our passes made flash attention (tiled loop nests, online forms,
        microkernels), summed over the compiled graphs."""
        return sum(g.tiled for g in self.graphs.values())

    @property
    def microkernels(self) -> int:
        """Of `tiled`, the attention ops that run as microkernels."""
        return sum(g.microkernels for g in self.graphs.values())

    def __str__(self) -> str:
        lines = [f"flashmlir: {len(self.sites)} attention site(s), {len(self.rejected)} rejected, "
                 f"{len(self.graphs)} graph(s)"]
        if self.sites:
            header = ("#", "family", "q", "k", "v", "dtype", "causal", "mask", "scale", "gqa", "dropout", "location")
            rows = [
                (str(i), s.family, _shape(s.q_shape), _shape(s.k_shape), _shape(s.v_shape), s.dtype,
                 "yes" if s.is_causal else "no",
                 s.mask_kind if s.mask_shape is None else f"{s.mask_kind} {_shape(s.mask_shape)}",
                 f"{s.scale:.4g}", str(s.gqa_groups), f"{s.dropout_p:g}", s.location)
                for i, s in enumerate(self.sites)
            ]
            lines += _table(header, rows)
        if self.rejected:
            lines.append("rejected:")
            lines += [f"  {r.kind}: {r.where}: {r.reason}" for r in self.rejected]
        for g in self.graphs.values():
            if g.rejected:
                state = "eager (fallback)"
            elif g.compiled:
                state = f"compiled ({', '.join(c.split(' (')[1].rstrip(')') for c in g.compiled)}), " \
                        f"{g.tiled} attention op(s) as flash attention ({g.microkernels} by microkernel)"
            else:
                state = "not compiled (compile=False)"
            lines.append(f"{g.name}: {state}")
        return "\n".join(lines)


def _shape(shape: tuple[int, ...]) -> str:
    return "x".join(map(str, shape))


def _table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return [fmt.format(*header), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)]


def explain_run(fn_or_module: Any, *example_inputs: Any, compile: bool = True,
                backend_options: dict[str, Any] | None = None, **example_kwargs: Any) -> ExplainReport:
    """Run `fn_or_module(*example_inputs, **example_kwargs)` under the flashmlir backend; report.

    compile=False only matches and rewrites (no IREE compile): fast, and what `.sites` lists is
    the same; graphs are then reported as not compiled. `backend_options`: what torch.compile's
    `options=` would say (e.g. {"rest": "iree"}, to see IREE compile a graph the default routes to
    Inductor).
    """
    import torch

    from flashmlir.dynamo.backend import BackendOptions, GraphCompiler, recording

    report = ExplainReport()
    options = BackendOptions.from_mapping({**(backend_options or {}), "compile": compile})

    def backend(gm, inputs, **_):
        return GraphCompiler(options)(gm, inputs)

    torch._dynamo.reset()
    try:
        with recording(report):
            torch.compile(fn_or_module, backend=backend)(*example_inputs, **example_kwargs)
    finally:
        torch._dynamo.reset()
    return report
