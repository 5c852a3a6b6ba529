"""flashmlir-dispatch-attention-training: the training ops ⇒ calls of the library's CUDA kernels.

    %o, %lse = torch.operator "torch.flashmlir.attention_forward"(%q, %k, %v, %causal, %scale)
      ⇒ %o, %lse = hal.dispatch.extern "flashmlir_attention_fwd_<family>_<e>_d<D>_lse"
                       (group, Sq, Sk, bits(s), causal, Q, K, V)       grid (⌈Sq / block_m⌉, B·Hq)

    %dq, %dk, %dv = torch.operator "torch.flashmlir.attention_backward"(%do, %q, %k, %v, %o, %lse, %causal, %scale)
      ⇒ %dq, %Δ  = hal.dispatch.extern "flashmlir_attention_bwd_sm80_<e>_d<D>_dq"
                       (constants, Q, K, V, O, dO, lse)                grid (⌈Sq / rows⌉, B·Hq)
        %dk, %dv = hal.dispatch.extern "flashmlir_attention_bwd_sm80_<e>_d<D>_dkdv"
                       (constants, Q, K, V, dO, lse, Δ)                grid (⌈Sk / rows⌉, B·Hkv)

Q, K, V, O, dO are dense [*, H, S, D] (what IREE makes of the torch value tensors), lse and
Δ = rowsum(dO ∘ O) float32 [*, Hq, S]: exactly the kernels' ABI (bwd_sm80_kernels.cu), so no layout
work is needed here. Δ travels from the first dispatch to the second as a tensor: IREE orders them.

The frontend puts these ops in a graph only where the target's library has both kernels
(flashmlir.frontend.training_ops.rewrite_for_training), and nothing else lowers them: an op this
pass cannot serve is an error naming the reason, never a silent leftover for IREE to trip on.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.compiler.microkernels import NoKernel, select_attention_backward, select_attention_forward
from flashmlir.compiler.targets import get_target
from flashmlir.errors import UnsupportedError
from flashmlir.passes.framework import PassResult, PassSpec, describe_op
from flashmlir.passes.ir_utils import (
    TorchTensorType,
    splice_function,
    torch_constant,
    torch_tensor_type,
    walk_ops,
)

FORWARD_OPERATOR = "torch.flashmlir.attention_forward"
BACKWARD_OPERATOR = "torch.flashmlir.attention_backward"
ELEMENTS = {"f16", "bf16"}
READ_ONLY = "#hal.pipeline.binding<storage_buffer, ReadOnly>"
WRITTEN = "#hal.pipeline.binding<storage_buffer>"


@dataclass(frozen=True)
class Options:
    target: str = ""  # empty: the module's `flashmlir.target` attribute


@dataclass(frozen=True)
class _Site:
    q: TorchTensorType
    k: TorchTensorType
    v: TorchTensorType
    causal: bool
    scale: float

    @property
    def element(self) -> str:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def group(self) -> int:
        return self.q.shape[-3] // self.k.shape[-3]

    @property
    def constants(self) -> str:
        """The five i32 push constants every kernel of the family takes, as SSA values."""
        sq, sk = self.q.shape[-2], self.k.shape[-2]
        values = (self.group, sq, sk, _f32_bits(self.scale), int(self.causal))
        names = ("group", "seq_q", "seq_k", "scale_bits", "causal")
        return "\n".join(f"  %{n} = arith.constant {v} : i32" for n, v in zip(names, values, strict=True))


def _f32_bits(x: float) -> int:
    """A float as the kernels take it: the 32 bits of an f32, in an i32 push constant."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _site(q: ir.Value, k: ir.Value, v: ir.Value, causal: ir.Value, scale: ir.Value) -> _Site:
    types = [torch_tensor_type(x.type) for x in (q, k, v)]
    if any(t is None or not t.is_static for t in types):
        raise UnsupportedError("q, k, v must have static shapes")
    qt, kt, vt = types
    if {qt.dtype, kt.dtype, vt.dtype} - ELEMENTS or len({qt.dtype, kt.dtype, vt.dtype}) != 1:
        raise UnsupportedError(f"dtypes {qt.dtype}/{kt.dtype}/{vt.dtype}: the kernels take f16 or bf16")
    if qt.rank < 3 or qt.shape[:-3] != kt.shape[:-3] or qt.shape[-3] % kt.shape[-3] or vt.shape != kt.shape:
        raise UnsupportedError(f"shapes q {qt.shape}, k {kt.shape}, v {vt.shape} do not fit together")
    if qt.shape[-1] != kt.shape[-1]:
        raise UnsupportedError(f"query head dim {qt.shape[-1]} differs from the key head dim {kt.shape[-1]}")
    c, s = torch_constant(causal), torch_constant(scale)
    if c is None or s is None:
        raise UnsupportedError("is_causal and scale must be constants")
    value = qt.shape[-1] ** -0.5 if s.value is None else float(s.value)
    if not (math.isfinite(value) and value > 0):
        raise UnsupportedError(f"scale {value}: the kernels need a positive finite scale")
    return _Site(qt, kt, vt, bool(c.value), value)


def _grid(x: int, y: int) -> str:
    return f"""count(%device: !hal.device) -> (index, index, index) {{
      %x = arith.constant {x} : index
      %y = arith.constant {y} : index
      %z = arith.constant 1 : index
      hal.return %x, %y, %z : index, index, index
    }}"""


def _extern(results: str, name: str, operands: list[tuple[str, str]], outputs: list[str], grid: tuple[int, int],
            object_path: str, threads: int, shared: int) -> str:
    """One hal.dispatch.extern: the five constants, then `operands` (name, type), returning `outputs`."""
    names = ", ".join(n for n, _ in operands)
    types = ", ".join(t for _, t in operands)
    bindings = ", ".join([READ_ONLY] * len(operands) + [WRITTEN] * len(outputs))
    return f"""  {results} = hal.dispatch.extern "{name}"(%group, %seq_q, %seq_k, %scale_bits, %causal, {names})
      : (i32, i32, i32, i32, i32, {types}) -> ({", ".join(outputs)})
    {_grid(*grid)}
    layout(#hal.pipeline.layout<constants = 5, bindings = [{bindings}]>)
    objects({{
      #hal.executable.target<"cuda", "cuda-nvptx-fb"> ordinal(0) = [
        #hal.executable.object<{{path = "{object_path}"}}>
      ]
    }})
    <workgroup_size = [{threads} : index, 1 : index, 1 : index], workgroup_local_memory = {shared}>"""


def _to_builtin(name: str, t: TorchTensorType) -> str:
    return f"  %b{name} = torch_c.to_builtin_tensor %{name} : {t.torch()} -> {t.builtin()}"


def _from_builtin(name: str, t: TorchTensorType) -> str:
    return f"  %t{name} = torch_c.from_builtin_tensor %{name} : {t.builtin()} -> {t.torch()}"


def _stats_type(site: _Site) -> TorchTensorType:
    """lse and Δ: float32 [*, Hq, Sq]."""
    return TorchTensorType(tuple(site.q.shape[:-1]), "f32")


def _forward_function(site: _Site, arch: str) -> str:
    kernel = select_attention_forward(arch, site.element, site.head_dim)
    q, k, v, stats = site.q, site.k, site.v, _stats_type(site)
    bh = math.prod(q.shape[:-2])
    extern = _extern("%o, %lse", kernel.name + "_lse", [("%bq", q.builtin()), ("%bk", k.builtin()), ("%bv", v.builtin())],
                     [q.builtin(), stats.builtin()], kernel.grid(q.shape[-2], bh)[:2], str(kernel.object_path),
                     kernel.threads, kernel.shared_bytes)
    lines = [_to_builtin(n, t) for n, t in (("q", q), ("k", k), ("v", v))]
    return f"""func.func @forward(%q: {q.torch()}, %k: {k.torch()}, %v: {v.torch()}) -> ({q.torch()}, {stats.torch()}) {{
{chr(10).join(lines)}
{site.constants}
{extern}
{_from_builtin("o", q)}
{_from_builtin("lse", stats)}
  return %to, %tlse : {q.torch()}, {stats.torch()}
}}"""


def _backward_function(site: _Site, arch: str) -> str:
    kernel = select_attention_backward(arch, site.element, site.head_dim)
    q, k, v, stats = site.q, site.k, site.v, _stats_type(site)
    path = str(kernel.object_path)
    bh, bh_kv = math.prod(q.shape[:-2]), math.prod(k.shape[:-2])
    dq = _extern("%dq, %delta", kernel.name("dq"),
                 [("%bq", q.builtin()), ("%bk", k.builtin()), ("%bv", v.builtin()), ("%bo", q.builtin()),
                  ("%bdo", q.builtin()), ("%blse", stats.builtin())],
                 [q.builtin(), stats.builtin()], kernel.grid("dq", q.shape[-2], bh)[:2], path, kernel.threads,
                 kernel.shared_bytes("dq"))
    dkdv = _extern("%dk, %dv", kernel.name("dkdv"),
                   [("%bq", q.builtin()), ("%bk", k.builtin()), ("%bv", v.builtin()), ("%bdo", q.builtin()),
                    ("%blse", stats.builtin()), ("%delta", stats.builtin())],
                   [k.builtin(), v.builtin()], kernel.grid("dkdv", k.shape[-2], bh_kv)[:2], path, kernel.threads,
                   kernel.shared_bytes("dkdv"))
    args = (("do", q), ("q", q), ("k", k), ("v", v), ("o", q), ("lse", stats))
    lines = [_to_builtin(n, t) for n, t in args]
    signature = ", ".join(f"%{n}: {t.torch()}" for n, t in args)
    return f"""func.func @backward({signature}) -> ({q.torch()}, {k.torch()}, {v.torch()}) {{
{chr(10).join(lines)}
{site.constants}
{dq}
{dkdv}
{_from_builtin("dq", q)}
{_from_builtin("dk", k)}
{_from_builtin("dv", v)}
  return %tdq, %tdk, %tdv : {q.torch()}, {k.torch()}, {v.torch()}
}}"""


def _rewrite(op: ir.Operation, name: str, arch: str) -> None:
    operands = list(op.operands)
    if name == FORWARD_OPERATOR:
        q, k, v, causal, scale = operands
        splice_function(op, _forward_function(_site(q, k, v, causal, scale), arch), [q, k, v])
    else:
        d_o, q, k, v, o, lse, causal, scale = operands
        splice_function(op, _backward_function(_site(q, k, v, causal, scale), arch), [d_o, q, k, v, o, lse])


def run(module: ir.Operation, options: Options) -> PassResult:
    result = PassResult(PASS.name)
    name = options.target or (ir.StringAttr(module.attributes["flashmlir.target"]).value
                              if "flashmlir.target" in module.attributes else "")
    ops = [(op, ir.StringAttr(op.attributes["name"]).value) for op in walk_ops(module, "torch.operator")]
    ops = [(op, n) for op, n in ops if n in (FORWARD_OPERATOR, BACKWARD_OPERATOR)]
    if not ops:
        return result
    target = get_target(name) if name else None
    for op, op_name in ops:
        where = describe_op(op)
        if target is None or target.gpu is None:
            raise UnsupportedError(f"{where}: the training ops need a CUDA target's kernels (target: {name or 'none'})")
        try:
            _rewrite(op, op_name, target.gpu.arch)
        except (UnsupportedError, NoKernel) as why:
            raise UnsupportedError(f"{where}: {why}") from why
        result.rewritten += 1
    return result


PASS = PassSpec(
    name="flashmlir-dispatch-attention-training",
    summary="Replace the training ops (attention forward with lse, attention backward) with calls of the "
            "microkernel library's CUDA kernels (hal.dispatch.extern)",
    options_type=Options,
    run=run,
)
