"""The SASS report's reading of cuobjdump output (canned text: no CUDA toolkit needed)."""

import importlib.util
import sys
from pathlib import Path

_spec = importlib.util.spec_from_file_location(
    "sass_report", Path(__file__).parents[2] / "runtime" / "microkernels" / "tools" / "sass_report.py")
sass_report = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = sass_report  # dataclasses look their module up
_spec.loader.exec_module(sass_report)

# A warp-specialized kernel's shape: setmaxnreg, an outer loop holding the inner (tensor-core) loop, a
# spill outside the loops, and an mbarrier retry stub after EXIT that jumps back into the body.
SASS = """
Fatbin elf code:
================
arch = sm_90a
code version = [1,8]

	code for sm_90a
		Function : kernel_a
        /*0000*/                   USETMAXREG.TRY_ALLOC.CTAPOOL UP0, 0xe8 ;
        /*0010*/                   STL [R1], R0 ;
        /*0020*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R2+URZ], R7 ;
        /*0030*/              @!P1 BRA 0x0100 ;
        /*0040*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], RZ ;
        /*0050*/                   MUFU.EX2 R3, R4 ;
        /*0060*/                   MUFU.EX2 R5, R6 ;
        /*0070*/               @P0 BRA 0x0040 ;
        /*0080*/                   HGMMA.64x128x16.F32 R24, gdesc[UR4], R24 ;
        /*0088*/                   LDL R0, [R1] ;
        /*0090*/               @P2 BRA 0x0020 ;
        /*00a0*/                   EXIT ;
        /*00b0*/                   USETMAXREG.DEALLOC.CTAPOOL 0x20 ;
        /*00c0*/                   EXIT ;
        /*0100*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P1, [R2+URZ], R7 ;
        /*0110*/              @!P1 BRA 0x0080 ;
        /*0120*/                   BRA 0x0120 ;
		Function : kernel_b
        /*0000*/                   FFMA R1, R2, R3, R4 ;
        /*0010*/                   EXIT ;
"""
RESOURCES = """
Fatbin elf code:
================
arch = sm_90a

Resource usage:
 Function kernel_a:
  REG:168 STACK:8 SHARED:1024 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
 Function kernel_b:
  REG:24 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:592 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_reads_functions_registers_and_setmaxnreg():
    functions = sass_report.parse_sass(SASS)
    sass_report.add_resources(functions, RESOURCES)
    a, b = functions
    assert (a.name, a.arch, a.registers, a.stack) == ("kernel_a", "sm_90a", 168, 8)
    assert (b.name, b.registers) == ("kernel_b", 24)
    assert a.setmaxnreg == ["alloc 232", "dealloc 32"]
    assert a.count("STL") + a.count("LDL") == 2
    assert a.count("MUFU.EX2") == 2 and a.count("MUFU") == 2 and a.count("HGMMA") == 2


def test_hot_loop_is_the_innermost_with_tensor_instructions_not_a_retry_stub():
    a, b = sass_report.parse_sass(SASS)
    loops = a.hot_loops()
    # 0x40-0x70 (HGMMA, two exponentials), not the outer 0x20-0x90 loop that holds it, nor the
    # wait's retry stub at 0x110 whose jump back to 0x80 spans an HGMMA and the EXITs.
    assert [[i.address for i in loop] for loop in loops] == [[0x40, 0x50, 0x60, 0x70]]
    assert b.hot_loops() == []
