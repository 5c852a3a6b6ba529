"""Compiling attention for the CUDA targets on a machine without a GPU.

IREE's own codegen (microkernels off): each target's PTX targets the right architecture and uses
the instructions that architecture has: mma.sync m16n8k16 (tensor cores) for f16/bf16 on sm_80
and sm_90, never on sm_70 (IREE has no Volta MMA lowering; the Volta microkernel brings HMMA).
ptxas, where installed, must accept the PTX.

With the microkernel library (a stand-in one here, so this runs without nvcc): the module's
attention is one extern dispatch whose executable is the library object, byte for byte.
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from flashmlir.compiler import iree_driver
from flashmlir.compiler.mlir_io import parse_module
from flashmlir.compiler.pipeline import compile_module
from flashmlir.compiler.targets import get_target

SDPA = """
func.func @main(%q: !torch.vtensor<[2,8,256,64],{t}>, %k: !torch.vtensor<[2,2,256,64],{t}>, %v: !torch.vtensor<[2,2,256,64],{t}>) -> !torch.vtensor<[2,8,256,64],{t}> {{
  %none = torch.constant.none
  %float0 = torch.constant.float 0.000000e+00
  %true = torch.constant.bool true
  %0 = torch.aten.scaled_dot_product_attention %q, %k, %v, %none, %float0, %true, %none, %true : !torch.vtensor<[2,8,256,64],{t}>, !torch.vtensor<[2,2,256,64],{t}>, !torch.vtensor<[2,2,256,64],{t}>, !torch.none, !torch.float, !torch.bool, !torch.none, !torch.bool -> !torch.vtensor<[2,8,256,64],{t}>
  return %0 : !torch.vtensor<[2,8,256,64],{t}>
}}
"""


def _ptx(tmp_path, target_name: str, dtype: str) -> str:
    target = get_target(target_name)
    session = iree_driver.new_session(target.iree_flags)
    module = parse_module(SDPA.format(t=dtype), session.context)
    vmfb, report = compile_module(session, module, target, dump_dir=tmp_path)
    assert vmfb and report.rewrites("flashmlir-match-attention") == 1
    (ptx,) = (tmp_path / "binaries").glob("*.ptx")
    return ptx.read_text()


@pytest.mark.parametrize("target, dtype, mma", [
    ("sm_70", "f16", None),
    ("sm_80", "f16", "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"),
    ("sm_80", "bf16", "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32"),
    ("sm_90", "f16", "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32"),
])
def test_ptx_targets_the_arch_with_its_instructions(tmp_path, monkeypatch, target, dtype, mma):
    monkeypatch.setenv("FLASHMLIR_MICROKERNELS", "0")
    ptx = _ptx(tmp_path, target, dtype)
    assert re.search(rf"^\.target {target}$", ptx, re.M)
    if mma is None:
        assert "mma.sync" not in ptx and "wmma" not in ptx
        assert "fma.rn.f32" in ptx
    else:
        assert ptx.count(mma) >= 8
    if shutil.which("ptxas") and target != "sm_70":  # CUDA 13's ptxas no longer knows sm_70
        (tmp_path / "k.ptx").write_text(ptx)
        subprocess.run(["ptxas", f"-arch={target}", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                       check=True, capture_output=True)


@pytest.mark.parametrize("target", ["sm_80", "sm_90"])
def test_attention_becomes_the_library_kernel(tmp_path, monkeypatch, target):
    library = tmp_path / "library"
    (library / "cuda").mkdir(parents=True)
    catalog = Path(__file__).parents[2] / "runtime" / "microkernels" / "kernels.json"
    shutil.copy(catalog, library / "kernels.json")
    stand_in = b"flashmlir stand-in fatbin " + os.urandom(64)
    (library / "cuda" / "attention_fwd_sm80_f16_d64.fatbin").write_bytes(stand_in)
    monkeypatch.setenv("FLASHMLIR_MICROKERNEL_DIR", str(library))

    target_ = get_target(target)
    session = iree_driver.new_session(target_.iree_flags)
    module = parse_module(SDPA.format(t="f16"), session.context)
    vmfb, report = compile_module(session, module, target_, dump_dir=tmp_path / "dump")
    assert report.attention_microkernels == 1 and report.attention_tiled == 1
    assert vmfb.count(stand_in) == 1
    flow = next((tmp_path / "dump").glob("*-iree-flow.mlir")).read_text()
    assert flow.count("flow.dispatch @") == 1
    assert "hal.executable.export public @flashmlir_attention_fwd_sm80_f16_d64" in flow


def test_microkernels_off_means_iree_codegen(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMLIR_MICROKERNELS", "0")
    target = get_target("sm_80")
    session = iree_driver.new_session(target.iree_flags)
    vmfb, report = compile_module(session, parse_module(SDPA.format(t="f16"), session.context), target)
    assert report.attention_microkernels == 0 and report.attention_tiled == 1


def test_a_library_built_without_nvcc_is_said_once(tmp_path, monkeypatch, caplog):
    """kernels.json installed but no objects (no nvcc at install): one warning, then IREE codegen."""
    from flashmlir.compiler.cache import ModuleCache
    from flashmlir.compiler.pipeline import compile_cached

    library = tmp_path / "library"
    library.mkdir()
    shutil.copy(Path(__file__).parents[2] / "runtime" / "microkernels" / "kernels.json", library / "kernels.json")
    monkeypatch.setenv("FLASHMLIR_MICROKERNEL_DIR", str(library))
    target = get_target("sm_80")
    cache = ModuleCache(tmp_path / "cache")
    with caplog.at_level("WARNING", logger="flashmlir"):
        for dtype in ("f16", "bf16"):
            session = iree_driver.new_session(target.iree_flags)
            _, report = compile_cached(session, parse_module(SDPA.format(t=dtype), session.context), target,
                                       cache=cache)
            assert report.attention_microkernels == 0 and report.attention_tiled == 1
    said = [r.getMessage() for r in caplog.records if "were not built" in r.getMessage()]
    assert len(said) == 1 and "IREE's own codegen" in said[0]
