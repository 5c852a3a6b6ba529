"""The compile pipeline: a flat list of named stages from imported IR to a .vmfb.

    00-input                   the imported (or parsed) module; `flashmlir.target` attribute set
    01-erase-device-placement  flashmlir-erase-device-placement
       bind-result-storage     flashmlir-bind-result-storage (graphs from torch.compile only)
    ..-match-attention         flashmlir-match-attention
    ..-lower-attention         flashmlir-lower-attention
    ..-dispatch-microkernels   flashmlir-dispatch-attention-microkernel (CPU and CUDA targets)
    ..-dispatch-training       flashmlir-dispatch-attention-training (CPU and CUDA; graphs with training ops)
    ..-tile-attention          flashmlir-tile-attention{target=…}, canonicalize, cse
    iree-*               IREE: torch input conversion, dispatch formation, codegen, VM

`print_stages()` lists them; `--dump-ir DIR` / FLASHMLIR_SAVE_TEMPS write the IR after each.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from iree.compiler import ir
from iree.compiler.api import Session

from flashmlir import config
from flashmlir.compiler import iree_driver, microkernels
from flashmlir.compiler.cache import ModuleCache, cache_key
from flashmlir.compiler.targets import Target
from flashmlir.errors import CompileError, UnsupportedError
from flashmlir.log import logger, warn_once
from flashmlir.passes.framework import Decline, PassResult
from flashmlir.passes.ir_utils import GPU_MULTIPROCESSORS
from flashmlir.passes.pass_manager import build_pass_manager, parse_pipeline


@dataclass(frozen=True)
class Stage:
    name: str
    pipeline: str  # textual pass pipeline (our passes and MLIR/IREE ones)


def flashmlir_stages(target: Target, bind_result_storage: bool = False,
                     deterministic: bool = False) -> tuple[Stage, ...]:
    """Our stages. `bind_result_storage`: the caller passes output tensors in (torch interop).
    `deterministic`: gradients the same bit for bit from run to run (torch's deterministic mode):
    on CUDA, backward kernels that sum dQ in a fixed order, slower on sm_90."""
    binding = (Stage("bind-result-storage", "flashmlir-bind-result-storage"),) if bind_result_storage else ()
    use_microkernels = target.kind in ("cpu", "cuda") and config.microkernels_enabled()
    dispatch = (Stage("dispatch-microkernels", "flashmlir-dispatch-attention-microkernel"),) if use_microkernels else ()
    # Training ops have no other lowering: the pass runs wherever they may appear (it says why it
    # cannot serve one); the frontend emits them only where the kernels exist.
    fixed_order = "{deterministic=1}" if deterministic and target.kind == "cuda" else ""
    training = ((Stage("dispatch-training", f"flashmlir-dispatch-attention-training{fixed_order}"),)
                if target.kind in ("cpu", "cuda") else ())
    return (
        Stage("erase-device-placement", "flashmlir-erase-device-placement"),
        *binding,
        Stage("match-attention", "flashmlir-match-attention"),
        Stage("lower-attention", "flashmlir-lower-attention"),
        *dispatch,
        *training,
        Stage("tile-attention", f"flashmlir-tile-attention{{target={target.name}}},canonicalize,cse"),
    )


def print_stages(target: Target) -> str:
    lines = ["00-input"]
    lines += [f"{i:02d}-{s.name:<18} {s.pipeline}" for i, s in enumerate(flashmlir_stages(target), 1)]
    lines += [f"iree-{p:<20} IREE --compile-to={p}" for p in iree_driver.IREE_DUMP_PHASES]
    lines.append("iree-vm               IREE to the VM module (.vmfb)")
    return "\n".join(lines)


@dataclass
class CompileReport:
    target: str
    cache_hit: bool = False
    seconds: dict[str, float] = field(default_factory=dict)
    pass_results: list[PassResult] = field(default_factory=list)
    dump_dir: Path | None = None

    def rewrites(self, pass_name: str) -> int:
        return sum(r.rewritten for r in self.pass_results if r.pass_name == pass_name)

    def declines(self) -> list[str]:
        return [f"[{r.pass_name}] {d}" for r in self.pass_results for d in r.declined]

    @property
    def attention_microkernels(self) -> int:
        """Attention ops that run as our microkernels (training ops included)."""
        return (self.rewrites("flashmlir-dispatch-attention-microkernel")
                + self.rewrites("flashmlir-dispatch-attention-training"))

    @property
    def attention_tiled(self) -> int:
        """Attention ops our passes made flash attention: microkernels, flash loops, online forms
        (the rest went to IREE as is)."""
        return self.attention_microkernels + self.rewrites("flashmlir-tile-attention")

    def summary(self) -> dict:
        return {"target": self.target, "seconds": self.seconds,
                "passes": [{"name": r.pass_name, "rewritten": r.rewritten,
                            "declined": [[d.op, d.reason] for d in r.declined]} for r in self.pass_results]}

    @classmethod
    def from_summary(cls, summary: dict) -> CompileReport:
        report = cls(summary["target"], cache_hit=True, seconds=summary.get("seconds", {}))
        for p in summary.get("passes", []):
            result = PassResult(p["name"], p["rewritten"])
            result.declined = [Decline(op, reason) for op, reason in p["declined"]]
            report.pass_results.append(result)
        return report


class _Dumper:
    """Writes NN-stage.mlir files into a directory (or nowhere)."""

    def __init__(self, directory: Path | None):
        self.directory = directory
        self.count = 0
        if directory is not None:
            directory.mkdir(parents=True, exist_ok=True)

    def __call__(self, stage: str, text: str) -> None:
        if self.directory is None:
            return
        (self.directory / f"{self.count:02d}-{stage}.mlir").write_text(text)
        self.count += 1


def _reproducer_dir() -> Path:
    base = config.save_temps_dir()
    if base is not None:
        base.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="repro-", dir=base))
    return Path(tempfile.mkdtemp(prefix="flashmlir-repro-"))


def _save_reproducer(stage: str, text: str) -> Path:
    path = _reproducer_dir() / f"{stage}.mlir"
    path.write_text(text)
    return path


_ELEMENT_TYPE_NAMES = {"bf16": "bfloat16", "f16": "float16", "f32": "float32", "f64": "float64"}


def check_element_types(module: ir.Module, target: Target) -> None:
    """Refuse float element types the target cannot compute in (bf16 on Volta), naming both."""
    text = str(module.operation.attributes["function_type"]) if "function_type" in module.operation.attributes else ""
    for op in module.body.operations:
        if "function_type" in op.attributes:
            text += str(op.attributes["function_type"])
    for short, name in _ELEMENT_TYPE_NAMES.items():
        if name not in target.dtypes and (f"x{short}>" in text or f",{short}>" in text):
            raise UnsupportedError(
                f"{name} is not supported on {target.name} (supported: {', '.join(target.dtypes)})")


def _run_stage(module: ir.Module, stage: Stage, report: CompileReport) -> None:
    text_before = str(module)
    results: list[PassResult] = []
    pm = build_pass_manager(parse_pipeline(stage.pipeline), results)
    messages: list[str] = []

    def on_diagnostic(d: ir.Diagnostic) -> bool:
        messages.append(f"{d.location}: {d.message}")
        return True

    handle = module.context.attach_diagnostic_handler(on_diagnostic)
    try:
        pm.run(module.operation)
    except Exception as e:
        repro = _save_reproducer(stage.name, text_before)
        command = f"flashmlir-opt --pass-pipeline='builtin.module({stage.pipeline})' {repro}"
        raise CompileError(stage.name, messages or [f"{type(e).__name__}: {e}"], command) from e
    finally:
        handle.detach()
    report.pass_results += results


def compile_module(
    session: Session,
    module: ir.Module,
    target: Target,
    *,
    dump_dir: Path | None = None,
    progress: Callable[[str], None] | None = None,
    bind_result_storage: bool = False,
    deterministic: bool = False,
    source_text: str | None = None,
) -> tuple[bytes, CompileReport]:
    """Run every stage on `module` (created in `session.context`, whose flags are the target's
    `compile_flags`); return the .vmfb and a report.

    Where the target has optional IREE flags (`iree_fast_flags`) and IREE fails with them, the
    module (`source_text`: its text before any stage, else printed here) is compiled again in a
    new session without them, logged (FLASHMLIR_LOG=info) with the flags and IREE's first error: a
    faster build where IREE manages it, the same as before everywhere else. A graph that cannot
    compile at all is tried twice before it falls back to eager PyTorch.
    """
    if target.iree_fast_flags and source_text is None:
        source_text = str(module)
    stages = dict(dump_dir=dump_dir, progress=progress, bind_result_storage=bind_result_storage,
                  deterministic=deterministic)
    try:
        return _compile_module(session, module, target, target.compile_flags, **stages)
    except CompileError as failure:
        if not target.iree_fast_flags or not failure.stage.startswith("iree"):
            raise
        first = next(iter(failure.diagnostics), "no diagnostics").splitlines()[0][:300]
        logger.info("IREE failed with %s (%s); compiling again without %s", " ".join(target.iree_fast_flags),
                    first, "them" if len(target.iree_fast_flags) > 1 else "it")
    session = iree_driver.new_session(target.iree_flags)
    module = ir.Module.parse(source_text, session.context)
    return _compile_module(session, module, target, target.iree_flags, **stages)


def _compile_module(
    session: Session,
    module: ir.Module,
    target: Target,
    flags: tuple[str, ...],
    *,
    dump_dir: Path | None,
    progress: Callable[[str], None] | None,
    bind_result_storage: bool,
    deterministic: bool,
) -> tuple[bytes, CompileReport]:
    report = CompileReport(target.name, dump_dir=dump_dir)
    dump = _Dumper(dump_dir)
    if dump_dir is not None:
        session.set_flags(f"--iree-hal-dump-executable-binaries-to={dump_dir / 'binaries'}")
    with module.context, ir.Location.unknown():
        check_element_types(module, target)
        attributes = module.operation.attributes
        attributes["flashmlir.target"] = ir.StringAttr.get(target.name)
        if target.gpu is not None:
            attributes["hal.device.targets"] = ir.Attribute.parse(target.gpu.device_targets())
            attributes[GPU_MULTIPROCESSORS] = ir.IntegerAttr.get(ir.IntegerType.get_signless(32),
                                                                 target.gpu.multiprocessors)
        dump("input", str(module))
        for stage in flashmlir_stages(target, bind_result_storage, deterministic):
            if progress:
                progress(stage.name)
            start = time.perf_counter()
            _run_stage(module, stage, report)
            report.seconds[stage.name] = time.perf_counter() - start
            dump(stage.name, str(module))
    if progress:
        progress("iree")
    start = time.perf_counter()
    vmfb = iree_driver.compile_to_vmfb(
        session, module, flags,
        dump=dump if dump_dir is not None else None, save_reproducer=_save_reproducer,
    )
    report.seconds["iree"] = time.perf_counter() - start
    return vmfb, report


SLOW_COMPILE_SECONDS = 20.0  # say so when a compile takes longer (the default log level is quiet)

# Compiles that failed in this process, by cache key: the same graph is not compiled again, and
# re-raising the same error keeps its fallback warning from being logged twice.
_FAILED: dict[str, CompileError] = {}


def compile_cached(
    session: Session,
    module: ir.Module,
    target: Target,
    *,
    what: str = "module",
    dump_dir: Path | None = None,
    cache: ModuleCache | None = None,
    bind_result_storage: bool = False,
    deterministic: bool = False,
) -> tuple[bytes, CompileReport]:
    """`compile_module` behind the on-disk cache. Logs each compile (FLASHMLIR_LOG=info)."""
    cache = cache or ModuleCache()
    pipeline = tuple(s.pipeline for s in flashmlir_stages(target, bind_result_storage, deterministic))
    fingerprint = target.fingerprint
    if any(s.name == "dispatch-microkernels" for s in flashmlir_stages(target)):  # modules embed their objects
        fingerprint += f" microkernels:{microkernels.fingerprint()}"
        problem = microkernels.library_problem(target.kind)
        if problem is not None:
            warn_once(f"{problem}: attention on {target.name} goes through IREE's own codegen, several "
                      "times slower (FLASHMLIR_MICROKERNELS=0 silences this)")
    text = str(module)
    key = cache_key(text, f"{target.name} {fingerprint}", target.compile_flags, pipeline)
    if dump_dir is None and config.save_temps_dir() is not None:
        dump_dir = config.save_temps_dir() / key[:16]
    if dump_dir is None:
        cached = cache.load(key)
        if cached is not None:
            logger.info("%s: cache hit %s", what, key[:16])
            vmfb, summary = cached
            return vmfb, CompileReport.from_summary(summary)
    if key in _FAILED:
        raise _FAILED[key]
    logger.info("%s: compiling for %s (key %s) ...", what, target.name, key[:16])
    start = time.perf_counter()
    try:
        vmfb, report = compile_module(
            session, module, target, dump_dir=dump_dir, bind_result_storage=bind_result_storage,
            deterministic=deterministic, progress=(lambda s: logger.debug("%s: stage %s", what, s)) if logger.isEnabledFor(logging.DEBUG) else None,
            source_text=text,
        )
    except CompileError as e:
        _FAILED[key] = e
        raise
    seconds = time.perf_counter() - start
    if seconds > SLOW_COMPILE_SECONDS:
        logger.warning("%s took %.0f s to compile; it is cached in %s for later runs", what, seconds, cache.directory)
    logger.info("%s: compiled in %.2f s (%d attention sites as flash attention, %d of them microkernels)",
                what, seconds, report.attention_tiled, report.attention_microkernels)
    for line in report.declines():
        logger.info("%s: %s", what, line)
    cache.store(key, vmfb, report.summary())
    return vmfb, report
