"""flashmlir-dispatch-attention-microkernel: attention ⇒ a launch of our CUDA microkernel.

    O = iree_linalg_ext.attention(Q, K, V, s [, causal mask])
      ⇒ O = hal.dispatch.extern "flashmlir_attention_fwd_sm80_f16_d128"
               (group, Sq, Sk, bits(s), causal, Q, K, V)
               count → (⌈Sq / block_m⌉, B·Hq, 1), workgroup_size = [32·warps], shared memory
               objects → the kernel's fatbin from the microkernel library

IREE outlines the extern op into its own executable whose only code is our kernel, binds Q, K, V
and O as the kernel's pointer arguments, and passes the five i32 constants after them (IREE's
CUDA ABI, runtime/microkernels/attention/fwd_sm80_kernels.cu). The kernel, its tile sizes and
hence the launch geometry come from the library's catalog (flashmlir.compiler.microkernels).

Taken: the canonical layout flashmlir-lower-attention writes, f16/bf16, a head dim the library
has, no mask or the causal one (recognized from its producer, which becomes dead), GQA as the
7-d form (K/V lack the trailing query-head batch dims: `group` query heads share one K/V head),
a constant positive scale. Everything else is declined with the reason and left to the passes
after this one (flashmlir-tile-attention's online form, IREE's codegen).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.compiler.microkernels import AttentionKernel, NoKernel, select_attention_forward
from flashmlir.compiler.targets import get_target
from flashmlir.passes.attention_ir import Attention, NotCanonical, analyze, float_constant
from flashmlir.passes.framework import PassResult, PassSpec
from flashmlir.passes.ir_utils import defining_op, splice_function, walk_ops

MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y, which carries batch × query heads


@dataclass(frozen=True)
class Options:
    target: str = ""  # empty: the module's `flashmlir.target` attribute


@dataclass(frozen=True)
class _Launch:
    kernel: AttentionKernel
    group: int
    causal: bool
    grid: tuple[int, int, int]


def _plan(attn: Attention, arch: str) -> _Launch:
    """The launch for `attn`, or NotCanonical / NoKernel saying why there is none."""
    if attn.mask is not None:
        raise NotCanonical("an explicit mask (the attention microkernel takes no mask or the causal one)")
    elements = {attn.q.elem, attn.k.elem, attn.v.elem, attn.out.elem}
    if len(elements) != 1:
        raise NotCanonical(f"mixed element types {sorted(elements)}")
    element = attn.q.elem
    head_dim = attn.q.shape[-1]
    if attn.dv != head_dim:
        raise NotCanonical(f"value head dim {attn.dv} differs from the query/key head dim {head_dim}")
    nb = len(attn.batch_sizes)
    k_batch = attn.k.roles[:-2]
    if k_batch != [f"b{i}" for i in range(len(k_batch))]:
        raise NotCanonical(f"K/V batch dims {k_batch} are not a prefix of Q's (GQA must share leading dims)")
    group = math.prod(attn.batch_sizes[len(k_batch):nb])
    scale = float_constant(attn.scale)
    if scale is None or not (scale > 0 and math.isfinite(scale)):
        raise NotCanonical(f"scale {scale if scale is not None else '(not a constant)'}: the kernel needs a "
                           "constant positive scale")
    kernel = select_attention_forward(arch, element, head_dim)
    grid = kernel.grid(attn.sq, math.prod(attn.batch_sizes))
    if grid[1] > MAX_GRID_Y:
        raise NotCanonical(f"batch × heads = {grid[1]} exceeds the grid's y limit {MAX_GRID_Y}")
    return _Launch(kernel, group, attn.causal, grid)


def _function(attn: Attention, launch: _Launch) -> str:
    k = launch.kernel
    qt, kt, vt, ot = attn.q.type(), attn.k.type(), attn.v.type(), attn.out.type()
    gx, gy, gz = launch.grid
    binding = "#hal.pipeline.binding<storage_buffer, ReadOnly>"
    return f"""func.func @microkernel(%q: {qt}, %k: {kt}, %v: {vt}, %scale: f32) -> {ot} {{
  %group = arith.constant {launch.group} : i32
  %seq_q = arith.constant {attn.sq} : i32
  %seq_k = arith.constant {attn.sk} : i32
  %scale_bits = arith.bitcast %scale : f32 to i32
  %causal = arith.constant {int(launch.causal)} : i32
  %o = hal.dispatch.extern "{k.name}"(%group, %seq_q, %seq_k, %scale_bits, %causal, %q, %k, %v)
      : (i32, i32, i32, i32, i32, {qt}, {kt}, {vt}) -> {ot}
    count(%device: !hal.device) -> (index, index, index) {{
      %x = arith.constant {gx} : index
      %y = arith.constant {gy} : index
      %z = arith.constant {gz} : index
      hal.return %x, %y, %z : index, index, index
    }}
    layout(#hal.pipeline.layout<constants = 5, bindings = [{binding}, {binding}, {binding},
                                                           #hal.pipeline.binding<storage_buffer>]>)
    objects({{
      #hal.executable.target<"cuda", "cuda-nvptx-fb"> ordinal(0) = [
        #hal.executable.object<{{path = "{k.object_path}"}}>
      ]
    }})
    <workgroup_size = [{k.threads} : index, 1 : index, 1 : index], workgroup_local_memory = {k.shared_bytes}>
  return %o : {ot}
}}"""


def _erase_if_dead(op: ir.Operation | None) -> None:
    if op is not None and not any(list(r.uses) for r in op.results):
        inputs = [defining_op(v) for v in op.operands]
        op.erase()
        for producer in inputs:
            if producer is not None and producer.name == "tensor.empty":
                _erase_if_dead(producer)


def run(module: ir.Operation, options: Options) -> PassResult:
    result = PassResult(PASS.name)
    name = options.target or (ir.StringAttr(module.attributes["flashmlir.target"]).value
                              if "flashmlir.target" in module.attributes else "")
    if not name:
        return result
    target = get_target(name)
    if target.gpu is None:
        return result
    for op in walk_ops(module, "iree_linalg_ext.attention"):
        try:
            attn = analyze(op)
            launch = _plan(attn, target.gpu.arch)
        except (NotCanonical, NoKernel) as why:
            result.decline(op, str(why))
            continue
        out_init = defining_op(attn.out.value)
        splice_function(op, _function(attn, launch), [attn.q.value, attn.k.value, attn.v.value, attn.scale])
        _erase_if_dead(attn.dead_mask_producer)
        _erase_if_dead(out_init)
        result.rewritten += 1
    return result


PASS = PassSpec(
    name="flashmlir-dispatch-attention-microkernel",
    summary="Replace attention with a hal.dispatch.extern launch of the target's CUDA microkernel",
    options_type=Options,
    run=run,
)
