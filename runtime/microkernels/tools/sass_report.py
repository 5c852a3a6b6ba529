"""What the library's CUDA kernels compiled to (SASS), function by function: the evidence a kernel
change has to show — registers a thread and per warpgroup role (setmaxnreg), local memory (spills),
and the instruction mix of the innermost loop that issues tensor-core instructions. The mix is
static: blocks behind a branch inside the loop count though a tile may skip them (the sm_90
forward's mask and O's rescale are ~530 of its 1,375 instructions at head dim 128).

    python runtime/microkernels/tools/sass_report.py                       # every installed CUDA object
    python runtime/microkernels/tools/sass_report.py build/x.fatbin ...    # or these cubins/fatbins

It reads what cuobjdump prints, so it needs cuobjdump and nvdisasm: the CUDA toolkit's, or, where
the toolkit has none (this project's workstations), `pip install '.[sass]'`.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# Opcodes counted in a hot loop: tensor-core products, exponentials, local memory (spills), the
# copies and the synchronization the kernels are built from.
WATCHED = ("HGMMA", "HMMA", "MUFU.EX2", "STL", "LDL", "LDGSTS", "STG", "SHFL", "SYNCS", "BAR",
           "WARPGROUP.DEPBAR", "WARPGROUP.ARRIVE")
_ARCH = re.compile(r"^arch = (sm_\w+)")
_FUNCTION = re.compile(r"^\s*Function : (\S+)")
_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_RESOURCE_FUNCTION = re.compile(r"^\s*Function (\S+):")
_RESOURCES = re.compile(r"REG:(\d+) STACK:(\d+)")
_MMA = ("HGMMA", "HMMA")


@dataclass
class Instruction:
    address: int
    opcode: str
    operands: str


@dataclass
class FunctionReport:
    name: str
    arch: str = "?"
    instructions: list[Instruction] = field(default_factory=list)
    registers: int | None = None
    stack: int | None = None

    def count(self, prefix: str, instructions: list[Instruction] | None = None) -> int:
        return sum(1 for i in (self.instructions if instructions is None else instructions)
                   if i.opcode == prefix or i.opcode.startswith(prefix + "."))

    @property
    def setmaxnreg(self) -> list[str]:
        """The register counts warpgroups move to, in code order (`dealloc 32`, `alloc 232`)."""
        moves = []
        for i in self.instructions:
            if i.opcode.startswith("USETMAXREG"):
                kind = "dealloc" if "DEALLOC" in i.opcode else "alloc"
                moves.append(f"{kind} {int(i.operands.split(',')[-1].strip(), 16)}")
        return moves

    def hot_loops(self) -> list[list[Instruction]]:
        """The innermost loops (a backward branch and the code it jumps over) that hold tensor-core
        instructions, one per warp role that has such a loop: where a kernel's time goes. ptxas
        puts the retry branches of mbarrier waits after the function's end, jumping back into its
        body: such a "loop" spans an EXIT and is not one."""
        loops = []
        for i in self.instructions:
            if i.opcode == "BRA" or i.opcode.startswith("BRA."):
                target = re.search(r"0x([0-9a-f]+)", i.operands)
                if target and int(target[1], 16) <= i.address:
                    loops.append((int(target[1], 16), i.address))
        found: list[tuple[int, int, list[Instruction]]] = []
        for start, end in sorted(loops, key=lambda span: span[1] - span[0]):
            body = [i for i in self.instructions if start <= i.address <= end]
            if any(i.opcode == "EXIT" for i in body) or not any(i.opcode.startswith(_MMA) for i in body):
                continue
            if not any(start <= s and e <= end for s, e, _ in found):  # holds no smaller one
                found.append((start, end, body))
        return [body for _, _, body in sorted(found, key=lambda loop: loop[0])]


def parse_sass(text: str) -> list[FunctionReport]:
    """`cuobjdump -sass` output → one report per function (instructions in address order)."""
    functions: list[FunctionReport] = []
    arch = "?"
    for line in text.splitlines():
        if found := _ARCH.match(line):
            arch = found[1]
        elif found := _FUNCTION.match(line):
            functions.append(FunctionReport(found[1], arch))
        elif functions and (found := _INSTRUCTION.search(line)):
            functions[-1].instructions.append(Instruction(int(found[1], 16), found[2], found[3]))
    return functions


def add_resources(functions: list[FunctionReport], text: str) -> None:
    """Registers and stack bytes per function from `cuobjdump -res-usage` output."""
    by_key = {(f.arch, f.name): f for f in functions}
    arch, name = "?", None
    for line in text.splitlines():
        if found := _ARCH.match(line):
            arch = found[1]
        elif found := _RESOURCE_FUNCTION.match(line):
            name = found[1]
        elif (found := _RESOURCES.search(line)) and (arch, name) in by_key:
            f = by_key[arch, name]
            f.registers, f.stack = int(found[1]), int(found[2])


def find_cuobjdump() -> str | None:
    """cuobjdump on PATH, else the one pip's nvidia-cuda-cuobjdump wheel puts in site-packages."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    site = Path(sysconfig.get_paths()["purelib"])
    wheels = sorted(site.glob("nvidia/*/bin/cuobjdump"))
    return str(wheels[-1]) if wheels else None


def _cuobjdump(cuobjdump: str, option: str, path: Path) -> str:
    # cuobjdump runs nvdisasm for -sass: the wheels put both in one folder, not on PATH.
    env = dict(os.environ, PATH=os.pathsep.join((str(Path(cuobjdump).parent), os.environ.get("PATH", ""))))
    done = subprocess.run([cuobjdump, option, str(path)], capture_output=True, text=True, env=env)
    if done.returncode != 0:
        sys.exit(f"sass_report: cuobjdump {option} {path} failed: {done.stderr.strip()[:300]}")
    return done.stdout


def report(path: Path, cuobjdump: str) -> list[str]:
    """Markdown table rows for every function in one object."""
    sass = _cuobjdump(cuobjdump, "-sass", path)
    usage = _cuobjdump(cuobjdump, "-res-usage", path)
    functions = parse_sass(sass)
    add_resources(functions, usage)
    rows = []
    for f in functions:
        loops = "; ".join(
            f"{len(loop)} at {loop[0].address:#x}: "
            + ", ".join(f"{op} {f.count(op, loop)}" for op in WATCHED if f.count(op, loop))
            for loop in f.hot_loops()) or "-"
        spills = f.count("STL") + f.count("LDL")
        rows.append(f"| {f.name} | {f.arch} | {f.registers if f.registers is not None else '?'} | "
                    f"{', '.join(f.setmaxnreg) or '-'} | {spills} | {f.stack if f.stack is not None else '?'} | "
                    f"{loops} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("objects", nargs="*", type=Path, help="cubins or fatbins (default: the installed library's)")
    args = p.parse_args()
    cuobjdump = find_cuobjdump()
    if cuobjdump is None:
        sys.exit("sass_report: no cuobjdump (install the CUDA toolkit, or `pip install '.[sass]'`)")
    objects = args.objects
    if not objects:
        from flashmlir.compiler import microkernels

        library = microkernels.library_dir()
        objects = sorted((library / "cuda").glob("*.fatbin")) if library else []
        if not objects:
            sys.exit("sass_report: no CUDA objects installed (was nvcc there at pip install?)")
    print("| function | arch | registers | setmaxnreg | STL/LDL (spills) | stack bytes | "
          "innermost loops with tensor-core instructions (instructions at address: mix) |")
    print("|---|---|---:|---|---:|---:|---|")
    for path in objects:
        for row in report(path, cuobjdump):
            print(row)


if __name__ == "__main__":
    main()
