"""flashmlir-dispatch-attention-microkernel: attention ⇒ a call of our microkernel, per target.

CUDA:
    O = iree_linalg_ext.attention(Q, K, V, s [, causal mask])
      ⇒ O = hal.dispatch.extern "flashmlir_attention_fwd_sm80_f16_d128"
               (group, Sq, Sk, bits(s), causal, B·Hq, Q, K, V)
               count → sm_80/sm_70: (⌈Sq / block_m⌉, B·Hq, 1); sm_90: one workgroup per (head, query
                       block) tile, or up to 4k rows at most one per SM, taking the tiles in turn
               workgroup_size = [32·warps], shared memory
               objects → the kernel's fatbin from the microkernel library
  IREE outlines the extern op into its own executable whose only code is our kernel, binds Q, K,
  V and O as the kernel's pointer arguments, and passes the six i32 constants after them (IREE's
  CUDA ABI, runtime/microkernels/attention/fwd_sm80_kernels.cu). A kernel that loads through TMA
  (the catalog's `tma`) returns a second result, an i8 workspace where its workgroups make their
  tensor maps (IREE passes pointers, not maps): a transient nothing reads. The SM count is the module's
  `flashmlir.gpu_multiprocessors` (the device torch.compile compiles for), else the arch's
  flagship part's (compiler/targets.py).

CPU:
    O = flow.dispatch @flashmlir_attention_cpu_<n>::@attention(Q, K, V)
      with stream.executable @flashmlir_attention_cpu_<n>: workgroups (a few per thread, 1, 1),
           objects → the library's object for the host's instruction set, and a shim that calls
           flashmlir_attention_fwd_cpu_f32_d<D>(Q, K, V, O as 1-d memrefs, group, B·Hq, Sq, Sk, s,
           causal, workgroup, workgroups): each workgroup takes an equal share of the work
  The memrefs go as MLIR's full descriptors (pointer, offset, size, stride): IREE packs tensors into
  shared buffers, and only the descriptor's offset says where each starts (the bare-pointer form
  of IREE's samples loses a binding's offset).
  IREE compiles the shim for the host and links our object into its embedded ELF executable; its
  task system runs the workgroups on its threads (runtime/microkernels/attention/fwd_cpu.c).
  bf16 and f16 attention runs the f32 kernel: Q, K, V are widened to f32 (exactly) by elementwise
  linalg ops before the dispatch and O is rounded once after it, so the only rounding is the
  output's (these CPUs have no f16 arithmetic, and a bf16 dot-product kernel is not written yet).

The kernel, its tile sizes and hence the launch geometry come from the library's catalog
(flashmlir.compiler.microkernels). Taken: the canonical layout flashmlir-lower-attention writes, an
element type and head dim the library has for the target, no mask or the causal one (recognized
from its producer, which becomes dead), GQA as the 7-d form (K/V lack the trailing query-head
batch dims: `group` query heads share one K/V head), a constant scale (positive on CUDA, where
the running max is taken before scaling). Everything else is declined with the reason and left to
the passes after this one (flashmlir-tile-attention, IREE's codegen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.compiler.microkernels import (
    CpuAttentionKernel,
    CudaAttentionKernel,
    NoKernel,
    select_attention_forward,
    select_cpu_attention_forward,
)
from flashmlir.compiler.targets import get_target
from flashmlir.passes.attention_ir import Attention, NotCanonical, analyze, float_constant, replaced_inputs
from flashmlir.passes.cpu_dispatch import Binding, CpuCall, cpu_executable, free_symbol, insert_executable
from flashmlir.passes.framework import PassResult, PassSpec
from flashmlir.passes.ir_utils import (
    erase_unused,
    gpu_multiprocessors,
    parallel_iterators,
    splice_function,
    tensor_type,
    walk_ops,
)

MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, which carries batch × query heads


@dataclass(frozen=True)
class Options:
    target: str = ""  # empty: the module's `flashmlir.target` attribute
    # CPU: the feature flags (as /proc/cpuinfo spells them, comma-separated) of the CPU to compile
    # for; empty: the host's. For tests and for compiling on one machine for another.
    cpu_features: str = ""
    # CPU: the worker threads IREE will run the workgroups on; 0: the host's CPUs.
    cpu_threads: int = 0


@dataclass(frozen=True)
class _Site:
    """What every kernel needs to know of an attention op it can take."""

    element: str
    head_dim: int
    group: int  # query heads per K/V head
    causal: bool
    scale: float
    batch_heads: int  # product of Q's batch dims


def _site(attn: Attention) -> _Site:
    """The op as a microkernel sees it, or NotCanonical saying why no kernel takes it."""
    if attn.mask is not None:
        raise NotCanonical("an explicit mask (the attention microkernels take no mask or the causal one)")
    elements = {attn.q.elem, attn.k.elem, attn.v.elem, attn.out.elem}
    if len(elements) != 1:
        raise NotCanonical(f"mixed element types {sorted(elements)}")
    head_dim = attn.q.shape[-1]
    if attn.dv != head_dim:
        raise NotCanonical(f"value head dim {attn.dv} differs from the query/key head dim {head_dim}")
    nb = len(attn.batch_sizes)
    k_batch = attn.k.roles[:-2]
    if k_batch != [f"b{i}" for i in range(len(k_batch))]:
        raise NotCanonical(f"K/V batch dims {k_batch} are not a prefix of Q's (GQA must share leading dims)")
    scale = float_constant(attn.scale)
    if scale is None or not math.isfinite(scale):
        raise NotCanonical(f"scale {scale if scale is not None else '(not a constant)'}: the kernels need a "
                           "constant finite scale")
    return _Site(attn.q.elem, head_dim, math.prod(attn.batch_sizes[len(k_batch):nb]), attn.causal, scale,
                 math.prod(attn.batch_sizes))


@dataclass(frozen=True)
class _Launch:
    kernel: CudaAttentionKernel
    group: int
    causal: bool
    batch_heads: int
    grid: tuple[int, int, int]


def _plan_cuda(attn: Attention, site: _Site, arch: str, multiprocessors: int) -> _Launch:
    """The CUDA launch for `attn`, or NotCanonical / NoKernel saying why there is none."""
    if site.scale <= 0:
        raise NotCanonical(f"scale {site.scale}: the CUDA kernel needs a positive scale")
    kernel = select_attention_forward(arch, site.element, site.head_dim, attn.sq, attn.sk, site.causal)
    grid = kernel.grid(attn.sq, site.batch_heads, multiprocessors, site.causal)
    if grid[1] > MAX_GRID_Y:
        raise NotCanonical(f"batch × heads = {grid[1]} exceeds the grid's y limit {MAX_GRID_Y}")
    return _Launch(kernel, site.group, site.causal, site.batch_heads, grid)


def _cuda_function(attn: Attention, launch: _Launch) -> str:
    k = launch.kernel
    qt, kt, vt, ot = attn.q.type(), attn.k.type(), attn.v.type(), attn.out.type()
    gx, gy, gz = launch.grid
    binding = "#hal.pipeline.binding<storage_buffer, ReadOnly>"
    written = "#hal.pipeline.binding<storage_buffer>"
    # A TMA kernel also writes its tensor maps to a workspace, a result nothing reads.
    workspace = k.workspace_bytes(launch.grid)
    results, result_types, bindings = "%o", ot, f"{binding}, {binding}, {binding}, {written}"
    if workspace:
        results, result_types = "%o, %maps", f"{ot}, tensor<{workspace}xi8>"
        bindings += f", {written}"
    return f"""func.func @microkernel(%q: {qt}, %k: {kt}, %v: {vt}, %scale: f32) -> {ot} {{
  %group = arith.constant {launch.group} : i32
  %seq_q = arith.constant {attn.sq} : i32
  %seq_k = arith.constant {attn.sk} : i32
  %scale_bits = arith.bitcast %scale : f32 to i32
  %causal = arith.constant {int(launch.causal)} : i32
  %batch_heads = arith.constant {launch.batch_heads} : i32
  {results} = hal.dispatch.extern "{k.name}"(%group, %seq_q, %seq_k, %scale_bits, %causal, %batch_heads, %q, %k, %v)
      : (i32, i32, i32, i32, i32, i32, {qt}, {kt}, {vt}) -> ({result_types})
    count(%device: !hal.device) -> (index, index, index) {{
      %x = arith.constant {gx} : index
      %y = arith.constant {gy} : index
      %z = arith.constant {gz} : index
      hal.return %x, %y, %z : index, index, index
    }}
    layout(#hal.pipeline.layout<constants = 6, bindings = [{bindings}]>)
    objects({{
      #hal.executable.target<"cuda", "cuda-nvptx-fb"> ordinal(0) = [
        #hal.executable.object<{{path = "{k.object_path}"}}>
      ]
    }})
    <workgroup_size = [{k.threads} : index, 1 : index, 1 : index], workgroup_local_memory = {k.shared_bytes}>
  return %o : {ot}
}}"""


# Element types the CPU runs on its f32 kernel, widened before and rounded after (module docstring).
CPU_WIDENED_ELEMENTS = ("bf16", "f16")


def _cpu_executable(symbol: str, attn: Attention, site: _Site, kernel: CpuAttentionKernel, threads: int) -> str:
    """The stream.executable whose one export calls the kernel for this op's shapes."""
    bindings = tuple(Binding(n, math.prod(t.shape), kernel.element)
                     for n, t in (("q", attn.q), ("k", attn.k), ("v", attn.v), ("o", attn.out)))
    constants = (("group", site.group), ("batch_heads", site.batch_heads), ("seq_q", attn.sq), ("seq_k", attn.sk),
                 ("scale", float(site.scale)), ("causal", int(site.causal)))
    call = CpuCall("attention", kernel.name(site.head_dim), bindings, constants,
                   kernel.workgroups(attn.sq, site.batch_heads, threads))
    return cpu_executable(symbol, str(kernel.object_path), [call])


def _convert(name: str, value: str, shape: list[int], source: str, to: str, op: str) -> str:
    """`%name`: tensor `%value` (of `shape`, elements `source`) converted elementwise to `to` by arith.`op`."""
    dims = ", ".join(f"d{i}" for i in range(len(shape)))
    identity = f"affine_map<({dims}) -> ({dims})>"
    source_type, result_type = tensor_type(shape, source), tensor_type(shape, to)
    return f"""  %{name}_init = tensor.empty() : {result_type}
  %{name} = linalg.generic {{indexing_maps = [{identity}, {identity}], iterator_types = {parallel_iterators(len(shape))}}}
      ins(%{value} : {source_type}) outs(%{name}_init : {result_type}) {{
  ^bb0(%x: {source}, %unused: {to}):
    %y = arith.{op} %x : {source} to {to}
    linalg.yield %y : {to}
  }} -> {result_type}"""


def _cpu_call(symbol: str, attn: Attention, kernel_element: str) -> str:
    qt, kt, vt, ot = attn.q.type(), attn.k.type(), attn.v.type(), attn.out.type()
    if attn.q.elem == kernel_element:
        return f"""func.func @microkernel(%q: {qt}, %k: {kt}, %v: {vt}) -> {ot} {{
  %o = flow.dispatch @{symbol}::@attention(%q, %k, %v) : ({qt}, {kt}, {vt}) -> {ot}
  return %o : {ot}
}}"""
    q, k, v, o = (tensor_type(x.shape, kernel_element) for x in (attn.q, attn.k, attn.v, attn.out))
    widened = "\n".join(_convert(f"{n}w", n, x.shape, x.elem, kernel_element, "extf")
                         for n, x in (("q", attn.q), ("k", attn.k), ("v", attn.v)))
    rounded = _convert("o", "ow", attn.out.shape, kernel_element, attn.out.elem, "truncf")
    return f"""func.func @microkernel(%q: {qt}, %k: {kt}, %v: {vt}) -> {ot} {{
{widened}
  %ow = flow.dispatch @{symbol}::@attention(%qw, %kw, %vw) : ({q}, {k}, {v}) -> {o}
{rounded}
  return %o : {ot}
}}"""


def _rewrite_cpu(module: ir.Operation, attn: Attention, site: _Site, features: frozenset[str], threads: int,
                 taken: set[str]) -> None:
    element = "f32" if site.element in CPU_WIDENED_ELEMENTS else site.element
    kernel = select_cpu_attention_forward(features, element, site.head_dim)
    symbol = free_symbol(module, "flashmlir_attention_cpu_", taken)
    insert_executable(module, attn.op, _cpu_executable(symbol, attn, site, kernel, threads))
    splice_function(attn.op, _cpu_call(symbol, attn, kernel.element), [attn.q.value, attn.k.value, attn.v.value])


def run(module: ir.Operation, options: Options) -> PassResult:
    result = PassResult(PASS.name)
    name = options.target or (ir.StringAttr(module.attributes["flashmlir.target"]).value
                              if "flashmlir.target" in module.attributes else "")
    if not name:
        return result
    target = get_target(name)
    taken: set[str] = set()
    for op in walk_ops(module, "iree_linalg_ext.attention"):
        try:
            attn = analyze(op)
            site = _site(attn)
            leftovers = replaced_inputs(attn)
            if target.gpu is not None:
                launch = _plan_cuda(attn, site, target.gpu.arch,
                                    gpu_multiprocessors(module, target.gpu.multiprocessors))
                splice_function(op, _cuda_function(attn, launch), [attn.q.value, attn.k.value, attn.v.value,
                                                                   attn.scale])
            elif target.kind == "cpu":
                features = frozenset(options.cpu_features.split(",")) if options.cpu_features else target.cpu_features
                _rewrite_cpu(module, attn, site, features, options.cpu_threads or target.cpu_threads, taken)
            else:
                raise NoKernel(f"no attention microkernels for {target.name}")
        except (NotCanonical, NoKernel) as why:
            result.decline(op, str(why))
            continue
        erase_unused(leftovers)
        result.rewritten += 1
    return result


PASS = PassSpec(
    name="flashmlir-dispatch-attention-microkernel",
    summary="Replace attention with a call of the target's microkernel (CUDA: hal.dispatch.extern; CPU: an "
            "executable linking the library object)",
    options_type=Options,
    run=run,
)
