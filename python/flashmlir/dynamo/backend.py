"""`torch.compile(model, backend="flashmlir")`: the backend dynamo calls for each graph it captures.

    dynamo graph ─ re-trace ─▶ pre-dispatch ATen ─ matcher ─▶ flashmlir::attention nodes
        ─ aot_autograd ─▶ forward / backward / inference graphs ─ compile_fx_graph ─▶ IREE modules

Whatever cannot be compiled runs in eager PyTorch instead, with the reason logged once per process
(FLASHMLIR_STRICT=1 raises instead). Attention sites the matcher replaced still run as our op's
reference implementation in that case, so a fallback is slower, never wrong.
"""

from __future__ import annotations

import contextlib
import contextvars
import itertools
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch
import torch.fx as fx

from flashmlir import config
from flashmlir.compiler.targets import Target, check_runs_on, get_target, target_for_device, with_device
from flashmlir.errors import FlashmlirError, UnsupportedError
from flashmlir.frontend.matcher import AttentionSite, MatchResult, NearMiss
from flashmlir.frontend.training_ops import needs_gradients, rewrite_for_training
from flashmlir.log import logger, warn_once


class Recorder(Protocol):
    """What `flashmlir.explain` collects from the backend."""

    def graph_compiled(self, graph: str, tiled: int, declines: list[str], microkernels: int = 0) -> None: ...
    def graph_rejected(self, graph: str, reason: str) -> None: ...
    def graph_ran(self, graph: str, sites: list[AttentionSite], near_misses: list[NearMiss]) -> None: ...


_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar("flashmlir_recorder", default=None)
_GRAPH_IDS = itertools.count()


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    token = _RECORDER.set(recorder)
    try:
        yield
    finally:
        _RECORDER.reset(token)


@dataclass(frozen=True)
class BackendOptions:
    """`torch.compile(..., options={...})` keys the backend understands."""

    target: str = "auto"  # "auto" (from the tensors' device) or a name from the target table
    compile: bool = True  # False: match and rewrite only, run the rewritten graph eagerly
    # What compiles the graph around attention: "iree" (the whole graph, attention by our passes),
    # "inductor" (attention as the library's kernels for the device, called from the graph Inductor
    # compiles), or "auto", the measured default: inductor on CUDA
    # (benchmarks/results/h100-2026-11-25-train-gpt2.md); on the CPU inductor for training graphs
    # and iree for inference ones (a small GPT on 2 cores: a training step 1.4x faster with
    # Inductor's rest, inference 1.05x faster with IREE's: cpu-2026-12-01-train-small.md,
    # cpu-2026-12-01-inference-small.md). A target
    # named explicitly means IREE code for that target: auto is then "iree".
    rest: str = "auto"

    @classmethod
    def from_mapping(cls, options: dict[str, Any] | None) -> BackendOptions:
        options = dict(options or {})
        unknown = set(options) - {"target", "compile", "rest"}
        if unknown:
            raise FlashmlirError(f"unknown flashmlir backend options {sorted(unknown)} (known: target, compile, rest)")
        if options.get("rest", "auto") not in ("auto", "iree", "inductor"):
            raise FlashmlirError(f"backend option rest={options['rest']!r}: expected 'auto', 'iree' or 'inductor'")
        return cls(**options)

    def rest_for(self, target: Target, training: bool) -> str:
        """What compiles the rest of a graph for `target` (`training`: it needs gradients)."""
        if self.rest == "auto":
            if self.target != "auto":
                return "iree"
            return "inductor" if target.kind == "cuda" or (target.kind == "cpu" and training) else "iree"
        if self.rest == "inductor" and target.kind not in ("cuda", "cpu"):
            raise UnsupportedError(f"rest='inductor' needs a CUDA or CPU target (the graph's is {target.name})")
        return self.rest


def _target_for(options: BackendOptions, example_inputs: Sequence[Any]) -> Target:
    devices = {x.device for x in example_inputs if isinstance(x, torch.Tensor)}
    if len(devices) > 1:
        raise UnsupportedError(f"graph inputs live on several devices {sorted(map(str, devices))}")
    device = next(iter(devices), torch.device("cpu"))
    capability = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
    if options.target == "auto":
        target = target_for_device(device.type, capability)
    else:
        target = get_target(options.target)
        expected = "cuda" if target.kind == "cuda" else "cpu"
        if device.type != expected:
            raise UnsupportedError(f"target {target.name} compiles for {expected} tensors, the graph's are on {device}")
    if capability is not None:
        check_runs_on(target, capability)
        target = with_device(target, torch.cuda.get_device_properties(device).multi_processor_count)
    return target


def _squeeze_dims(x: torch.Tensor, dims: list[int]) -> torch.Tensor:
    """squeeze(x, dims) as a view (dropping size-1 dims never needs a copy)."""
    drop = {d % x.dim() for d in dims if x.shape[d] == 1}
    return torch.ops.aten.view.default(x, [n for i, n in enumerate(x.shape) if i not in drop])


def _aot_decompositions() -> dict:
    """Core ATen for IREE's torch frontend; our attention op has no decomposition and stays whole.

    Plus decompositions of core ops IREE 3.13's torch frontend cannot lower (`squeeze.dims`, which
    nn.MultiheadAttention's in-projection produces), into ops it can, and of attention sites with
    dropout that no kernel takes (inference graphs; sm_70) into plain math with the seeded mask.
    """
    from torch._decomp import core_aten_decompositions

    from flashmlir.frontend.attention_op import attention_overload, decompose_with_dropout

    table = core_aten_decompositions()
    table[torch.ops.aten.squeeze.dims] = _squeeze_dims
    table[attention_overload()] = decompose_with_dropout  # no-op without dropout
    return table


class GraphCompiler:
    """Compiles one dynamo graph; a new instance per graph keeps its name and sites together."""

    def __init__(self, options: BackendOptions):
        self.options = options
        self.name = f"graph {next(_GRAPH_IDS)}"
        self.recorder = _RECORDER.get()
        self.match = MatchResult()

    def _fallback(self, reason: str, eager: Callable) -> Callable:
        message = f"{self.name}: running in eager PyTorch: {reason}"
        if config.strict():
            raise FlashmlirError(f"{message} (FLASHMLIR_STRICT=1)")
        warn_once(f"falling back to eager PyTorch: {reason}")
        logger.info(message)
        if self.recorder is not None:
            self.recorder.graph_rejected(self.name, reason)
        return eager

    def _count_runs(self, fn: Callable) -> Callable:
        """Record this graph's sites each time it runs (explain counts per computation)."""
        recorder, sites, misses, name = self.recorder, self.match.sites, self.match.near_misses, self.name
        if recorder is None:
            return fn

        def run(*args):
            recorder.graph_ran(name, sites, misses)
            return fn(*args)

        return run

    def __call__(self, gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        from flashmlir.dynamo.assumed_inputs import AssumedInputs, module_buffers
        from flashmlir.frontend.capture import trace_pre_dispatch
        from flashmlir.frontend.matcher import find_attention, replace_attention

        try:
            aten = trace_pre_dispatch(gm, example_inputs)
            self.match = find_attention(aten, module_buffers(gm, aten, example_inputs))
            assumed = AssumedInputs(gm, aten, self.match.assumed_inputs(), example_inputs)
            replace_attention(aten, self.match.sites)
        except Exception as e:  # noqa: BLE001 - any failure here means: not ours to compile
            return self._count_runs(self._fallback(f"could not trace the graph: {type(e).__name__}: {e}",
                                                   gm.forward))
        for miss in self.match.near_misses:
            logger.info("%s: not attention we compile at %s: %s", self.name, miss.location, miss.reason)
        return self._count_runs(assumed.guard(self._compile(aten, example_inputs), gm.forward, self.name))

    def _compile(self, aten: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable:
        """What runs the rewritten graph: compiled as the options say, or it run eagerly."""
        if not self.options.compile:
            return aten.forward
        try:
            target = _target_for(self.options, example_inputs)
            training = needs_gradients(example_inputs)
            rest = self.options.rest_for(target, training)
        except FlashmlirError as e:
            return self._fallback(str(e), aten.forward)
        if rest == "iree" and self._masked_cpu_inference(target, training):
            masked = _masked_sites(aten)
            if masked:
                logger.info("%s: %d attention site(s) with an explicit mask: Inductor compiles the graph, and the "
                            "CPU kernels' key-padding entry or torch's SDPA runs them (rest='iree' keeps IREE's "
                            "code for them)", self.name, masked)
                rest = "inductor"
        if training and self.match.sites:
            rewritten, reasons = rewrite_for_training(aten, _training_check(target, torch_path=rest == "inductor"))
            logger.info("%s: %d attention site(s) get flash backward kernels%s", self.name, rewritten,
                        "".join(f"; not {r}" for r in reasons))
            if rest == "inductor" and target.kind in ("cpu", "cuda"):
                from flashmlir.frontend.masked_training_ops import (
                    gradient_inputs,
                    rewrite_masked_for_training,
                )

                masked = rewrite_masked_for_training(aten, gradient_inputs(aten, example_inputs))
                if masked:
                    logger.info("%s: %d masked attention site(s) train through fused kernels (the CPU kernels' "
                                "key-bias entries for key-padding and decoder masks, else torch's SDPA)",
                                self.name, masked)
        if rest == "inductor":
            return self._inductor(aten, example_inputs, target)
        return self._aot(aten, example_inputs, target)

    def _masked_cpu_inference(self, target: Target, training: bool) -> bool:
        """Whether the measured default may move a CPU inference graph from IREE to the torch path
        for its masked attention sites: IREE compiles those as our flash loop nest without the
        microkernels, 3.4x slower than torch's SDPA at 1k tokens with a padding mask (and 4.7x for
        the op's float32 reference): benchmarks/results/cpu-2026-12-02-masked-inference.md."""
        return (not training and target.kind == "cpu" and self.options.rest == "auto"
                and self.options.target == "auto")

    def _inductor(self, aten: fx.GraphModule, example_inputs: Sequence[Any], target: Target) -> Callable:
        """Inductor compiles the graph; our ops in it run the library's kernels (runtime.torch_kernels,
        runtime.cpu_kernels)."""
        from torch._inductor.compile_fx import compile_fx

        from flashmlir.runtime import torch_kernels

        torch_kernels.register()

        logger.info("%s: Inductor compiles the graph around %d attention site(s)", self.name, len(self.match.sites))
        served = _kernel_sites(aten, target)
        try:
            compiled = compile_fx(aten, list(example_inputs))
        except Exception as e:  # noqa: BLE001 - fall back on anything, say why
            return self._fallback(f"Inductor could not compile the graph: {type(e).__name__}: {e}", aten.forward)
        if self.recorder is not None:
            self.recorder.graph_compiled(f"{self.name} (inductor)", served, [], served)
        return compiled

    def _aot(self, aten: fx.GraphModule, example_inputs: Sequence[Any], target: Target) -> Callable:
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        from flashmlir.compiler.fx_compile import compile_fx_graph

        def compiler(kind: str):
            def compile_graph(graph: fx.GraphModule, inputs: Sequence[Any]):
                try:
                    compiled = compile_fx_graph(graph, inputs, target, what=f"{self.name} ({kind})")
                except Exception as e:  # noqa: BLE001 - fall back on anything, say why
                    return make_boxed_func(self._fallback(_reason(e), graph.forward))
                if self.recorder is not None:
                    report = compiled.report
                    self.recorder.graph_compiled(f"{self.name} ({kind})", report.attention_tiled, report.declines(),
                                                 report.attention_microkernels)
                return make_boxed_func(compiled)

            return compile_graph

        backend = aot_autograd(
            fw_compiler=compiler("forward"),
            bw_compiler=compiler("backward"),
            inference_compiler=compiler("inference"),
            decompositions=_aot_decompositions(),
        )
        return backend(aten, example_inputs)


def _library_problem(target: Target, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backward: bool,
                     torch_path: bool) -> str | None:
    """Why `target`'s microkernel library cannot take these operands (its forward, and with
    `backward` the forward-with-lse and backward kernels), else None. `torch_path`: called from
    torch, which on the CPU needs the shared library too."""
    from flashmlir.runtime import cpu_kernels
    from flashmlir.runtime.torch_kernels import kernel_problem

    if target.gpu is not None:
        return kernel_problem(target.gpu.arch, q, k, v, backward=backward)
    if target.kind == "cpu":
        return cpu_kernels.kernel_problem(q, k, v, backward=backward, library=torch_path)
    if backward:
        return f"no backward kernels for {target.name} (the op's textbook backward runs instead)"
    return f"no microkernels for {target.name}"


def _training_check(target: Target, torch_path: bool) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, bool,
                                                                    bool], str | None]:
    """Whether `target`'s microkernel library has the forward-with-lse and backward kernels for a
    site; with dropout, the twins that drop P (the sm_90, sm_80 and CPU kernels)."""

    def check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, is_causal: bool, dropout: bool) -> str | None:
        problem = _library_problem(target, q, k, v, backward=True, torch_path=torch_path)
        if problem is None and dropout:  # the same twins serve the torch path and IREE's dispatches
            from flashmlir.runtime import torch_kernels

            if target.gpu is not None:
                return torch_kernels.dropout_problem(target.gpu.arch, q, k, v)
            if target.kind == "cpu":
                return None  # every CPU object has the twins (fwd_cpu.c, bwd_cpu.c)
            return f"dropout (no {target.name} kernels take it)"
        return problem

    return check


def _masked_sites(gm: fx.GraphModule) -> int:
    """Attention ops in a graph with an explicit mask, if the torch path serves every one of them
    fast, else 0: the CPU forward's `_key_bias` entry (a key-padding mask, `cpu_kernels.takes_mask`)
    or torch's SDPA where it computes the site as the op means it (`attention_op.sdpa_means_the_same`).
    A masked site neither takes runs the op's float32 reference on the torch path, slower than
    IREE's loop nest."""
    from flashmlir.frontend.masked_training_ops import masked_sites, sdpa_takes

    sites = masked_sites(gm)
    served = all(_cpu_kernels_take_mask(args, values) or sdpa_takes(args, values) for _, args, values in sites)
    return len(sites) if served else 0


def _kernel_sites(gm: fx.GraphModule, target: Target) -> int:
    """Our ops in a graph for the torch path that the library's kernels run: the training forwards
    (put there only where the kernels serve them), attention ops without a mask or dropout whose
    operands the kernels take, and on the CPU those with a key-padding mask."""
    from flashmlir.frontend.attention_op import attention_overload
    from flashmlir.frontend.masked_training_ops import site_operands
    from flashmlir.frontend.training_ops import (
        dropout_of,
        forward_dropout_overload,
        forward_overload,
        kernel_site,
    )

    count = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in (forward_overload(), forward_dropout_overload()):
            count += 1
        elif node.target == attention_overload():
            site = kernel_site(node)
            if isinstance(site, str) and target.kind == "cpu":  # a mask: the key-padding entry may take it
                count += _cpu_kernels_take_mask(*site_operands(node))
                continue
            if isinstance(site, str) or dropout_of(node):  # dropout: the op's plain math
                continue
            operands, _ = site
            count += _library_problem(target, *operands, backward=False, torch_path=True) is None
    return count


def _cpu_kernels_take_mask(args: dict, values: tuple[torch.Tensor, ...] | None) -> bool:
    """Whether the CPU forward's key-padding entry serves a masked site (its `site_operands`)."""
    from flashmlir.runtime.cpu_kernels import takes_mask

    return values is not None and takes_mask(*values, float(args["dropout_p"]))


def _reason(error: Exception) -> str:
    if isinstance(error, FlashmlirError):
        return str(error)
    return f"internal error {type(error).__name__}: {error}"


def flashmlir_backend(gm: fx.GraphModule, example_inputs: Sequence[Any], **kwargs: Any) -> Callable:
    """The `torch_dynamo_backends` entry point. `options=` from torch.compile is read here."""
    options = BackendOptions.from_mapping(kwargs.get("options"))
    return GraphCompiler(options)(gm, example_inputs)
