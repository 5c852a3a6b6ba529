"""flashmlir-dispatch-attention-training: the training ops ⇒ calls of the library's kernels.

CUDA:

    %o, %lse = torch.operator "torch.flashmlir.attention_forward"(%q, %k, %v, %causal, %scale)
      ⇒ %o, %lse = hal.dispatch.extern "flashmlir_attention_fwd_<family>_<e>_d<D>_lse"
                       (constants, Q, K, V)                            grid: the forward kernel's

    %dq, %dk, %dv = torch.operator "torch.flashmlir.attention_backward"(%do, %q, %k, %v, %o, %lse, %causal, %scale)
      sm_80 kernels (deterministic):
      ⇒ %dq, %Δ  = hal.dispatch.extern "flashmlir_attention_bwd_sm80_<e>_d<D>_dq"
                       (constants, Q, K, V, O, dO, lse)                grid (⌈Sq / rows⌉, B·Hq)
        %dk, %dv = hal.dispatch.extern "flashmlir_attention_bwd_sm80_<e>_d<D>_dkdv"
                       (constants, Q, K, V, dO, lse, Δ)                grid (⌈Sk / rows⌉, B·Hkv)
      sm_90 kernels (dQ shares added into an fp32 accumulator by the copy engine; rows padded to whole tiles):
      ⇒ %lse2, %Δp, %acc = hal.dispatch.extern "flashmlir_attention_bwd_sm90_<e>_d<D>_prep"
                       (constants, O, dO, lse)                         grid (⌈Sq / block_m⌉, B·Hq)
        %sum, %dk, %dv = hal.dispatch.extern "flashmlir_attention_bwd_sm90_<e>_d<D>_dkdv"
                       (constants, Q, K, V, dO, lse2, Δp, acc) -> (%acc, …)   grid (⌈Sk / block_n⌉, B·Hkv)
        %dq      = hal.dispatch.extern "flashmlir_attention_bwd_sm90_<e>_d<D>_dq"
                       (constants, sum)                                grid (⌈Sq / block_m⌉, B·Hq)
      the dkdv call adds into the accumulator in place: its result is tied to the operand.

CPU (f32):
    %o, %lse       = flow.dispatch @flashmlir_attention_training_cpu_<n>::@forward(Q, K, V)
  the backward in one pass where the B·Hkv heads share out evenly between the CPU's threads
  (CpuAttentionKernel.fuses_backward):
    %dq, %Δ, %dk, %dv = flow.dispatch @…::@backward(Q, K, V, O, dO, lse)
  else split in two (dq's Δ result feeds dkdv):
    %dq, %Δ        = flow.dispatch @…::@dq(Q, K, V, O, dO, lse)
    %dk, %dv       = flow.dispatch @…::@dkdv(Q, K, V, dO, lse, Δ)
  with one stream.executable linking the library's forward object (its `_lse` function) or
  backward object (`_fused`, or `_dq` and `_dkdv`), a 1-d grid of a few workgroups per thread for
  each (passes/cpu_dispatch.py; runtime/microkernels/attention/bwd_cpu.c).

The constants are (group, Sq, Sk, bits(s), causal, B·Hq) for every kernel; the forward's grid is
as in flashmlir-dispatch-attention-microkernel. Q, K, V, O, dO are dense [*, H, S, D] (what IREE
makes of the torch value tensors), lse and Δ = rowsum(dO ∘ O) float32 [*, Hq, S]: exactly the
kernels' ABI (bwd_sm80_kernels.cu, bwd_cpu.c), so no layout work is needed here. Δ travels
from the first dispatch to the second as a tensor: IREE orders them.

With dropout, `attention_forward_dropout`(q, k, v, p, seed, causal, scale) and
`attention_backward_dropout`(dO, q, k, v, O, lse, p, seed, causal, scale) become the same calls of
the kernels' dropout twins (`_lse_dropout`; CUDA sm_90 `dkdv_dropout`, sm_80 `dq_dropout` and
`dkdv_dropout`; CPU `_dq_dropout`, `_dkdv_dropout`, `_fused_dropout`): the int64 seed is one more input binding (before the
outputs, and before dkdv's tied accumulator), and ⌈p · 2¹⁶⌉ and 1 / (1 − p) follow the constants
(CUDA: two more i32 push constants, the second an f32's bits).

The frontend puts these ops in a graph only where the target's library has both kernels
(flashmlir.frontend.training_ops.rewrite_for_training), and nothing else lowers them: an op this
pass cannot serve is an error naming the reason, never a silent leftover for IREE to trip on.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.compiler.microkernels import (
    NoKernel,
    dropout_constants,
    dropout_threshold,
    select_attention_backward,
    select_attention_forward,
    select_cpu_attention_backward,
    select_cpu_attention_forward,
)
from flashmlir.compiler.targets import Target, get_target
from flashmlir.errors import UnsupportedError
from flashmlir.passes.cpu_dispatch import Binding, CpuCall, cpu_executable, free_symbol, insert_executable
from flashmlir.passes.framework import PassResult, PassSpec, describe_op
from flashmlir.passes.ir_utils import (
    TORCH_TO_BUILTIN_DTYPE,
    TorchTensorType,
    gpu_multiprocessors,
    splice_function,
    torch_constant,
    torch_tensor_type,
    walk_ops,
)

FORWARD_OPERATOR = "torch.flashmlir.attention_forward"
BACKWARD_OPERATOR = "torch.flashmlir.attention_backward"
FORWARD_DROPOUT_OPERATOR = "torch.flashmlir.attention_forward_dropout"
BACKWARD_DROPOUT_OPERATOR = "torch.flashmlir.attention_backward_dropout"
OPERATORS = (FORWARD_OPERATOR, BACKWARD_OPERATOR, FORWARD_DROPOUT_OPERATOR, BACKWARD_DROPOUT_OPERATOR)
CUDA_ELEMENTS = {"f16", "bf16"}
READ_ONLY = "#hal.pipeline.binding<storage_buffer, ReadOnly>"
WRITTEN = "#hal.pipeline.binding<storage_buffer>"


@dataclass(frozen=True)
class Options:
    target: str = ""  # empty: the module's `flashmlir.target` attribute
    # CUDA: the backward kernels that sum dQ in a fixed order only (torch's deterministic mode).
    deterministic: bool = False
    # CPU: the feature flags (as /proc/cpuinfo spells them, comma-separated) of the CPU to compile
    # for, and the worker threads IREE will run on; empty / 0: the host's.
    cpu_features: str = ""
    cpu_threads: int = 0


@dataclass(frozen=True)
class _Cpu:
    features: frozenset[str]
    threads: int


@dataclass(frozen=True)
class _Site:
    q: TorchTensorType
    k: TorchTensorType
    v: TorchTensorType
    causal: bool
    scale: float
    dropout: float = 0.0  # p; the seed is the `seed` operand

    @property
    def element(self) -> str:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def batch_heads(self) -> int:
        return math.prod(self.q.shape[:-2])

    @property
    def group(self) -> int:
        return self.q.shape[-3] // self.k.shape[-3]

    @property
    def constants(self) -> str:
        """The six i32 push constants every CUDA kernel takes, as SSA values (with dropout, and the
        dropout twins' two)."""
        sq, sk = self.q.shape[-2], self.k.shape[-2]
        values = [self.group, sq, sk, _f32_bits(self.scale), int(self.causal), self.batch_heads]
        if self.dropout:
            threshold, keep_scale = dropout_constants(self.dropout)
            values += [_i32(threshold), _f32_bits(keep_scale)]
        return "\n".join(f"  %{n} = arith.constant {v} : i32" for n, v in zip(CONSTANTS, values, strict=False))

    @property
    def dropout_constants(self) -> tuple[tuple[str, int | float], ...]:
        """The CPU dropout twins' two constants (none without dropout)."""
        if not self.dropout:
            return ()
        return tuple(zip(("dropout_threshold", "dropout_scale"), dropout_constants(self.dropout), strict=True))


# The CUDA kernels' push constants, in order; the dropout twins take all eight.
CONSTANTS = ("group", "seq_q", "seq_k", "scale_bits", "causal", "batch_heads", "dropout_threshold", "dropout_scale_bits")


def _i32(x: int) -> int:
    """A u32 as an i32 constant spells it."""
    return struct.unpack("<i", struct.pack("<I", x))[0]


def _f32_bits(x: float) -> int:
    """A float as the kernels take it: the 32 bits of an f32, in an i32 push constant."""
    return struct.unpack("<i", struct.pack("<f", x))[0]


def _site(q: ir.Value, k: ir.Value, v: ir.Value, causal: ir.Value, scale: ir.Value,
          dropout: ir.Value | None = None) -> _Site:
    types = [torch_tensor_type(x.type) for x in (q, k, v)]
    if any(t is None or not t.is_static for t in types):
        raise UnsupportedError("q, k, v must have static shapes")
    qt, kt, vt = types
    if len({qt.dtype, kt.dtype, vt.dtype}) != 1:
        raise UnsupportedError(f"dtypes {qt.dtype}/{kt.dtype}/{vt.dtype}: the kernels take one element type")
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
    p = 0.0
    if dropout is not None:
        constant = torch_constant(dropout)
        if constant is None or constant.value is None:
            raise UnsupportedError("dropout_p must be a constant")
        p = float(constant.value)
        try:
            dropout_threshold(p)
        except ValueError as why:
            raise UnsupportedError(str(why)) from why
    return _Site(qt, kt, vt, bool(c.value), value, p)


def _grid(x: int, y: int) -> str:
    return f"""count(%device: !hal.device) -> (index, index, index) {{
      %x = arith.constant {x} : index
      %y = arith.constant {y} : index
      %z = arith.constant 1 : index
      hal.return %x, %y, %z : index, index, index
    }}"""


def _extern(results: str, name: str, operands: list[tuple[str, str]], outputs: list[str], grid: tuple[int, int],
            object_path: str, threads: int, shared: int, constants: int = 6) -> str:
    """One hal.dispatch.extern: the first `constants` of CONSTANTS, then `operands` (name, type),
    returning `outputs` (types, or an operand's SSA name for a result written in place into that
    operand's buffer)."""
    names = ", ".join(n for n, _ in operands)
    types = ", ".join(t for _, t in operands)
    written = {o for o in outputs if o.startswith("%")}
    bindings = ", ".join([WRITTEN if n in written else READ_ONLY for n, _ in operands]
                         + [WRITTEN] * (len(outputs) - len(written)))
    values = ", ".join(f"%{c}" for c in CONSTANTS[:constants])
    return f"""  {results} = hal.dispatch.extern "{name}"({values},
      {names}) : ({", ".join(["i32"] * constants)}, {types}) -> ({", ".join(outputs)})
    {_grid(*grid)}
    layout(#hal.pipeline.layout<constants = {constants}, bindings = [{bindings}]>)
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


# What each kernel reads and writes, by name, in its ABI's order (CUDA and CPU alike).
FORWARD_IO = (("q", "k", "v"), ("o", "lse"))
DQ_IO = (("q", "k", "v", "o", "do", "lse"), ("dq", "delta"))
DKDV_IO = (("q", "k", "v", "do", "lse", "delta"), ("dk", "dv"))
FUSED_IO = (("q", "k", "v", "o", "do", "lse"), ("dq", "delta", "dk", "dv"))  # the CPU's one-pass backward
# The sm_90 backward (bwd_sm90_kernels.cu); dkdv's "dq_sum" is its "dq_accum" operand, tied.
PREP_IO = (("o", "do", "lse"), ("lse2", "delta_rows", "dq_accum"))
DKDV_ACCUM_IO = (("q", "k", "v", "do", "lse2", "delta_rows", "dq_accum"), ("dq_sum", "dk", "dv"))
DQ_FROM_SUM_IO = (("dq_sum",), ("dq",))
TIED = {"dq_sum": "dq_accum"}
# The backward function's arguments, in the op's operand order (with dropout, and the seed).
FUNCTION_INPUTS = ("do", "q", "k", "v", "o", "lse", "seed")


def _with_seed(io: tuple[tuple[str, ...], tuple[str, ...]]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A kernel's IO for its dropout twin: the seed after the inputs read (before a tied accumulator)."""
    inputs, outputs = io
    at = inputs.index("dq_accum") if "dq_accum" in inputs else len(inputs)
    return (*inputs[:at], "seed", *inputs[at:]), outputs


def _type_of(site: _Site, name: str, padded_rows: int = 0) -> TorchTensorType:
    """The tensor type of a named kernel operand: Q's shape for O, dO, dQ; lse and Δ per query row;
    the sm_90 backward's statistics and fp32 dQ sum over `padded_rows` query rows."""
    if name in ("lse", "delta"):
        return _stats_type(site)
    if name in ("lse2", "delta_rows"):
        return TorchTensorType((*site.q.shape[:-2], padded_rows), "f32")
    if name in ("dq_accum", "dq_sum"):
        return TorchTensorType((*site.q.shape[:-2], padded_rows, site.head_dim), "f32")
    if name == "seed":
        return TorchTensorType((), "si64")
    return {"k": site.k, "dk": site.k, "v": site.v, "dv": site.v}.get(name, site.q)


def _ssa(name: str) -> str:
    """The builtin-tensor SSA name of an operand: the function's arguments are converted (%b…), the
    rest are earlier calls' results."""
    return f"%b{name}" if name in FUNCTION_INPUTS else f"%{name}"


def _forward_function(site: _Site, calls: str) -> str:
    """The function that replaces attention_forward: torch values in, `calls` (binding %o, %lse), out."""
    q, k, v, stats = site.q, site.k, site.v, _stats_type(site)
    args = [("q", q), ("k", k), ("v", v)] + ([("seed", _type_of(site, "seed"))] if site.dropout else [])
    lines = [_to_builtin(n, t) for n, t in args]
    signature = ", ".join(f"%{n}: {t.torch()}" for n, t in args)
    return f"""func.func @forward({signature}) -> ({q.torch()}, {stats.torch()}) {{
{chr(10).join(lines)}
{calls}
{_from_builtin("o", q)}
{_from_builtin("lse", stats)}
  return %to, %tlse : {q.torch()}, {stats.torch()}
}}"""


def _backward_function(site: _Site, calls: str) -> str:
    """The function that replaces attention_backward: `calls` bind %dq, %dk, %dv."""
    q, k, v = site.q, site.k, site.v
    args = [(n, _type_of(site, n)) for n in FUNCTION_INPUTS if n != "seed" or site.dropout]
    lines = [_to_builtin(n, t) for n, t in args]
    signature = ", ".join(f"%{n}: {t.torch()}" for n, t in args)
    return f"""func.func @backward({signature}) -> ({q.torch()}, {k.torch()}, {v.torch()}) {{
{chr(10).join(lines)}
{calls}
{_from_builtin("dq", q)}
{_from_builtin("dk", k)}
{_from_builtin("dv", v)}
  return %tdq, %tdk, %tdv : {q.torch()}, {k.torch()}, {v.torch()}
}}"""


def _cuda_extern(site: _Site, io: tuple[tuple[str, ...], tuple[str, ...]], name: str, grid: tuple[int, int],
                 kernel, threads: int, shared: int, padded_rows: int = 0, workspace: int = 0) -> str:
    """`workspace` bytes: a TMA kernel's tensor maps, one more result after the outputs, never read."""
    inputs, outputs = io
    results = [f"%{n}" for n in outputs] + ([f"%{name}_maps"] if workspace else [])
    types = [_ssa(TIED[n]) if n in TIED else _type_of(site, n, padded_rows).builtin() for n in outputs]
    return _extern(", ".join(results), name, [(_ssa(n), _type_of(site, n, padded_rows).builtin()) for n in inputs],
                   types + ([f"tensor<{workspace}xi8>"] if workspace else []), grid, str(kernel.object_path),
                   threads, shared, 8 if "seed" in inputs else 6)


def _cuda_forward_calls(site: _Site, arch: str, multiprocessors: int) -> str:
    if site.element not in CUDA_ELEMENTS:
        raise UnsupportedError(f"dtype {site.element}: the CUDA kernels take f16 or bf16")
    kernel = select_attention_forward(arch, site.element, site.head_dim, site.q.shape[-2], site.k.shape[-2],
                                      site.causal)
    grid = kernel.grid(site.q.shape[-2], site.batch_heads, multiprocessors, site.causal)
    if site.dropout and not kernel.dropout:
        raise UnsupportedError(f"{kernel.name} has no dropout twin (the sm_90 and sm_80 kernels do)")
    io, name = (_with_seed(FORWARD_IO), kernel.name + "_lse_dropout") if site.dropout else (FORWARD_IO, kernel.name + "_lse")
    extern = _cuda_extern(site, io, name, grid[:2], kernel, kernel.threads, kernel.shared_bytes,
                          workspace=kernel.workspace_bytes(grid))
    return f"{site.constants}\n{extern}"


def _cuda_backward_calls(site: _Site, arch: str, deterministic: bool) -> str:
    kernel = select_attention_backward(arch, site.element, site.head_dim, deterministic)
    if site.dropout and not kernel.dropout:
        raise UnsupportedError(f"the {kernel.family} kernels have no dropout twin (the sm_90 and sm_80 ones do)")
    sq, sk = site.q.shape[-2], site.k.shape[-2]
    bh, bh_kv = site.batch_heads, math.prod(site.k.shape[:-2])
    ios = ({"prep": PREP_IO, "dkdv": DKDV_ACCUM_IO, "dq": DQ_FROM_SUM_IO} if kernel.accumulates_dq
           else {"dq": DQ_IO, "dkdv": DKDV_IO})
    padded = kernel.padded_rows(sq) if kernel.accumulates_dq else 0
    grids = {part: kernel.grid(part, *((sk, bh_kv) if part == "dkdv" else (sq, bh))) for part in kernel.parts}
    twins = kernel.dropout_parts if site.dropout else ()  # the parts that regenerate the mask
    ios = {part: _with_seed(io) if part in twins else io for part, io in ios.items()}
    names = {part: kernel.name(part) + ("_dropout" if part in twins else "") for part in kernel.parts}
    calls = [_cuda_extern(site, ios[part], names[part], grids[part][:2], kernel, kernel.threads(part),
                          kernel.shared_bytes(part), padded, kernel.workspace_bytes(part, grids[part]))
             for part in kernel.parts]
    return "\n".join([site.constants, *calls])


def _cpu_calls(site: _Site, cpu: _Cpu, forward: bool) -> tuple[str, list[tuple[CpuCall, tuple]]]:
    """(object path, [(call, its IO)]) of the CPU training kernels for `site`: the forward with lse,
    or the backward in one pass, or dq then dkdv."""
    select = select_cpu_attention_forward if forward else select_cpu_attention_backward
    kernel = select(cpu.features, site.element, site.head_dim)
    sq, sk = site.q.shape[-2], site.k.shape[-2]
    bh, bh_kv = math.prod(site.q.shape[:-2]), math.prod(site.k.shape[:-2])
    constants = (("group", site.group), ("batch_heads", bh), ("seq_q", sq), ("seq_k", sk),
                 ("scale", float(site.scale)), ("causal", int(site.causal)), *site.dropout_constants)

    def call(export: str, function: str, io: tuple[tuple[str, ...], tuple[str, ...]], workgroups: int) -> CpuCall:
        bindings = tuple(Binding(n, math.prod(_type_of(site, n).shape), TORCH_TO_BUILTIN_DTYPE[_type_of(site, n).dtype])
                         for n in (*io[0], *io[1]))
        return CpuCall(export, function, bindings, constants, workgroups)

    fn = kernel.name(site.head_dim)
    if forward:
        calls = [(FORWARD_IO, "forward", "_lse", kernel.workgroups(sq, bh, cpu.threads))]
    elif kernel.fuses_backward(bh_kv, cpu.threads):
        calls = [(FUSED_IO, "backward", "_fused", kernel.fused_workgroups(bh_kv, cpu.threads))]
    else:
        calls = [(DQ_IO, "dq", "_dq", kernel.workgroups(sq, bh, cpu.threads)),
                 (DKDV_IO, "dkdv", "_dkdv", kernel.workgroups(sk, bh_kv, cpu.threads))]
    if site.dropout:  # every function's dropout twin
        calls = [(_with_seed(io), export, suffix + "_dropout", workgroups) for io, export, suffix, workgroups in calls]
    return str(kernel.object_path), [(call(export, fn + suffix, io, workgroups), io)
                                     for io, export, suffix, workgroups in calls]


def _cpu_dispatch(site: _Site, symbol: str, export: str, io: tuple[tuple[str, ...], tuple[str, ...]]) -> str:
    inputs, outputs = io
    names = ", ".join(_ssa(n) for n in inputs)
    types = ", ".join(_type_of(site, n).builtin() for n in inputs)
    results = ", ".join(_type_of(site, n).builtin() for n in outputs)
    return (f"  {', '.join(f'%{n}' for n in outputs)} = flow.dispatch @{symbol}::@{export}({names}) : ({types}) "
            f"-> ({results})")


def _rewrite(module: ir.Operation, op: ir.Operation, name: str, target: Target, cpu: _Cpu, taken: set[str],
             deterministic: bool) -> None:
    operands = list(op.operands)
    forward = name in (FORWARD_OPERATOR, FORWARD_DROPOUT_OPERATOR)
    dropout = seed = None
    if name == FORWARD_OPERATOR:
        q, k, v, causal, scale = operands
    elif name == FORWARD_DROPOUT_OPERATOR:
        q, k, v, dropout, seed, causal, scale = operands
    elif name == BACKWARD_OPERATOR:
        d_o, q, k, v, o, lse, causal, scale = operands
    else:
        d_o, q, k, v, o, lse, dropout, seed, causal, scale = operands
    inputs = ([q, k, v] if forward else [d_o, q, k, v, o, lse]) + ([seed] if seed is not None else [])
    site = _site(q, k, v, causal, scale, dropout)
    if target.gpu is not None:
        arch = target.gpu.arch
        calls = (_cuda_forward_calls(site, arch, gpu_multiprocessors(module, target.gpu.multiprocessors)) if forward
                 else _cuda_backward_calls(site, arch, deterministic))
    else:
        path, cpu_calls = _cpu_calls(site, cpu, forward)
        symbol = free_symbol(module, "flashmlir_attention_training_cpu_", taken)
        insert_executable(module, op, cpu_executable(symbol, path, [c for c, _ in cpu_calls]))
        calls = "\n".join(_cpu_dispatch(site, symbol, c.export, io) for c, io in cpu_calls)
    splice_function(op, _forward_function(site, calls) if forward else _backward_function(site, calls), inputs)


def run(module: ir.Operation, options: Options) -> PassResult:
    result = PassResult(PASS.name)
    name = options.target or (ir.StringAttr(module.attributes["flashmlir.target"]).value
                              if "flashmlir.target" in module.attributes else "")
    ops = [(op, ir.StringAttr(op.attributes["name"]).value) for op in walk_ops(module, "torch.operator")]
    ops = [(op, n) for op, n in ops if n in OPERATORS]
    if not ops:
        return result
    target = get_target(name) if name else None
    taken: set[str] = set()
    cpu = None
    if target is not None:
        cpu = _Cpu(frozenset(options.cpu_features.split(",")) if options.cpu_features else target.cpu_features,
                   options.cpu_threads or target.cpu_threads)
    for op, op_name in ops:
        where = describe_op(op)
        if target is None or (target.gpu is None and target.kind != "cpu"):
            raise UnsupportedError(f"{where}: the training ops need a CUDA or CPU target's kernels "
                                   f"(target: {name or 'none'})")
        try:
            _rewrite(module, op, op_name, target, cpu, taken, options.deterministic)
        except (UnsupportedError, NoKernel) as why:
            raise UnsupportedError(f"{where}: {why}") from why
        result.rewritten += 1
    return result


PASS = PassSpec(
    name="flashmlir-dispatch-attention-training",
    summary="Replace the training ops (attention forward with lse, attention backward) with calls of the "
            "microkernel library's kernels (CUDA: hal.dispatch.extern; CPU: an executable linking the objects)",
    options_type=Options,
    run=run,
)
