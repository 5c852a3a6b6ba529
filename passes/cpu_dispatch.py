"""IR for calling a CPU microkernel from IREE: a `stream.executable` linking the library object.

Each export of the executable runs a 1-d grid of workgroups; a workgroup calls one C function of
the object with every binding as a 1-d memref (MLIR passes a memref as its full descriptor:
pointer, offset, size, stride — IREE packs tensors into shared buffers, and only the offset says
where each starts), then the call's constants, the workgroup's id and the grid's size. IREE
compiles these shims for the host and links the object into its embedded ELF executable.
Both CPU dispatch passes (the forward microkernel, the training ops) build their calls here.
"""

from __future__ import annotations

from dataclasses import dataclass

from iree.compiler import ir

from flashmlir.passes.ir_utils import f32_literal


@dataclass(frozen=True)
class Binding:
    name: str
    elements: int  # the tensor's element count: the memref is 1-d
    element: str  # "f32"

    @property
    def memref(self) -> str:
        return f"memref<{self.elements}x{self.element}>"


@dataclass(frozen=True)
class CpuCall:
    """One export: `workgroups` workgroups, each calling `function(bindings…, constants…, id, count)`."""

    export: str
    function: str
    bindings: tuple[Binding, ...]  # in the dispatch's operand order, then its results
    constants: tuple[tuple[str, int | float], ...]  # (name, value): ints as index, floats as f32
    workgroups: int


def _constant(name: str, value: int | float) -> tuple[str, str]:
    if isinstance(value, float):
        return f"      %{name} = arith.constant {f32_literal(value)} : f32", "f32"
    return f"      %{name} = arith.constant {int(value)} : index", "index"


def _export(call: CpuCall) -> str:
    return f"""  stream.executable.export public @{call.export} workgroups() -> (index, index, index) {{
    %x = arith.constant {call.workgroups} : index
    %one = arith.constant 1 : index
    stream.return %x, %one, %one : index, index, index
  }}"""


def _function(call: CpuCall) -> str:
    constants = [_constant(n, v) for n, v in call.constants]
    types = [b.memref for b in call.bindings] + [t for _, t in constants] + ["index", "index"]
    args = [f"%{b.name}m" for b in call.bindings] + [f"%{n}" for n, _ in call.constants] + ["%wg", "%wgs"]
    signature = ", ".join(f"%{b.name}: !stream.binding" for b in call.bindings)
    views = "\n".join(f"      %{b.name}m = stream.binding.subspan %{b.name}[%c0] : !stream.binding -> {b.memref}"
                      for b in call.bindings)
    return f"""    func.func private @{call.function}({", ".join(types)}) attributes {{hal.import.static}}
    func.func @{call.export}({signature}) {{
      %c0 = arith.constant 0 : index
{views}
{chr(10).join(line for line, _ in constants)}
      %wg = hal.interface.workgroup.id[0] : index
      %wgs = arith.constant {call.workgroups} : index
      func.call @{call.function}({", ".join(args)}) : ({", ".join(types)}) -> ()
      return
    }}"""


def cpu_executable(symbol: str, object_path: str, calls: list[CpuCall]) -> str:
    """The stream.executable `symbol` whose exports make `calls` into the object at `object_path`."""
    exports = "\n".join(_export(c) for c in calls)
    functions = "\n".join(_function(c) for c in calls)
    return f"""stream.executable private @{symbol} attributes {{
  hal.executable.objects = #hal.executable.objects<{{
    #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64"> = [#hal.executable.object<{{path = "{object_path}"}}>]
  }}>
}} {{
{exports}
  builtin.module {{
{functions}
  }}
}}"""


def _enclosing_top_level_op(op: ir.Operation, module: ir.Operation) -> ir.Operation:
    """The op of `module`'s body that contains `op` (the function it is in)."""
    while op.parent is not None and op.parent.operation != module:
        op = op.parent.operation
    return op


def free_symbol(module: ir.Operation, prefix: str, taken: set[str]) -> str:
    """`prefix` + the first number no symbol of `module` (nor one in `taken`) has; added to `taken`."""
    names = {ir.StringAttr(o.attributes["sym_name"]).value for o in module.regions[0].blocks[0].operations
             if "sym_name" in o.attributes}
    i = 0
    while f"{prefix}{i}" in names or f"{prefix}{i}" in taken:
        i += 1
    taken.add(f"{prefix}{i}")
    return f"{prefix}{i}"


def insert_executable(module: ir.Operation, before: ir.Operation, text: str) -> None:
    """Parse the executable `text` and put it in `module` ahead of the function holding `before`."""
    with before.context, before.location:
        parsed = ir.Module.parse(text)  # owns the op until moved
        parsed.body.operations[0].move_before(_enclosing_top_level_op(before, module))
