"""flashmlir-compile and flashmlir-opt: inputs they take, what they write, how they fail."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from flashmlir.runtime.iree_module import IreeModule
from flashmlir.tools import compile as compile_tool
from flashmlir.tools import opt as opt_tool
from tests.helpers import attention64, rel_err

LIT_INPUTS = Path(__file__).parents[1] / "lit" / "passes"
BIN = Path(sys.executable).parent

TORCH_MLIR = """
func.func @main(%q: !torch.vtensor<[2,4,40,16],f32>, %k: !torch.vtensor<[2,2,40,16],f32>, %v: !torch.vtensor<[2,2,40,16],f32>) -> !torch.vtensor<[2,4,40,16],f32> {
  %none = torch.constant.none
  %float0 = torch.constant.float 0.000000e+00
  %true = torch.constant.bool true
  %0 = torch.aten.scaled_dot_product_attention %q, %k, %v, %none, %float0, %true, %none, %true : !torch.vtensor<[2,4,40,16],f32>, !torch.vtensor<[2,2,40,16],f32>, !torch.vtensor<[2,2,40,16],f32>, !torch.none, !torch.float, !torch.bool, !torch.none, !torch.bool -> !torch.vtensor<[2,4,40,16],f32>
  return %0 : !torch.vtensor<[2,4,40,16],f32>
}
"""


def test_torch_mlir_file_compiles_and_runs(tmp_path):
    src = tmp_path / "sdpa.mlir"
    src.write_text(TORCH_MLIR)
    assert compile_tool.main([str(src), "-q"]) == 0
    q = torch.randn(2, 4, 40, 16)
    k, v = torch.randn(2, 2, 40, 16), torch.randn(2, 2, 40, 16)
    (out,) = IreeModule((tmp_path / "sdpa.vmfb").read_bytes())(q, k, v)
    assert rel_err(out, attention64(q, k, v, causal=True)) < 1e-5


def test_linalg_mlir_file_compiles_and_runs(tmp_path):
    chunk = (LIT_INPUTS / "tile-attention.mlir").read_text().split("// -----")[0]
    src = tmp_path / "mha.mlir"
    src.write_text("\n".join(line for line in chunk.splitlines() if not line.startswith("//")))
    out_path = tmp_path / "out" / "mha.vmfb"
    assert compile_tool.main([str(src), "-o", str(out_path), "-q"]) == 0
    q, k, v = (torch.randn(8, 128, 64) for _ in range(3))
    (out,) = IreeModule(out_path.read_bytes(), function="mha_3d")(q, k, v)
    assert rel_err(out, attention64(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale=0.125)[0]) < 1e-5


class Exported(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(16, 16)

    def forward(self, q, k, v):
        scores = (self.proj(q) @ k.transpose(-2, -1)) / 4.0
        return F.softmax(scores, dim=-1) @ v + F.scaled_dot_product_attention(q, k, v, is_causal=True)


def test_torch_export_program_compiles_with_dump_ir(tmp_path):
    model = Exported().eval()
    inputs = tuple(torch.randn(2, 4, 24, 16) for _ in range(3))
    program = torch.export.export(model, inputs)
    torch.export.save(program, tmp_path / "model.pt2")
    dumps = tmp_path / "ir"
    assert compile_tool.main([str(tmp_path / "model.pt2"), "--dump-ir", str(dumps), "-q"]) == 0
    names = sorted(p.name for p in dumps.iterdir())
    assert names[:7] == ["00-input.mlir", "01-erase-device-placement.mlir", "02-match-attention.mlir",
                         "03-lower-attention.mlir", "04-dispatch-microkernels.mlir", "05-dispatch-training.mlir",
                         "06-tile-attention.mlir"]
    assert any("iree-flow" in n for n in names)
    assert (dumps / "02-match-attention.mlir").read_text().count('"torch.flashmlir.attention"') == 2
    (out,) = IreeModule((tmp_path / "model.vmfb").read_bytes())(*inputs)
    with torch.no_grad():
        assert rel_err(out, model(*inputs)) < 1e-5


@pytest.mark.parametrize(
    "args, message",
    [
        (["missing.mlir"], "no such file: 'missing.mlir'"),
        (["bad.mlir"], "malformed MLIR: "),
        (["good.mlir", "--target", "npu"], "target 'npu' (an NPU-like target"),
        (["bf16.mlir", "--target", "sm_70"], "bfloat16 is not supported on sm_70 (supported: float32, float16)"),
        (["notes.txt"], "expected an .mlir file or a torch.export program"),
        (["bad.pt2"], "is not a torch.export program"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bad.mlir").write_text("func.func @f( {\n")
    (tmp_path / "good.mlir").write_text(TORCH_MLIR)
    (tmp_path / "bf16.mlir").write_text(TORCH_MLIR.replace("f32>", "bf16>"))
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    proc = subprocess.run([BIN / "flashmlir-compile", *args], capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.startswith("flashmlir-compile: error: ") and message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.vmfb"))


def test_opt_prints_ir_after_a_mixed_pipeline(tmp_path, capsys):
    src = tmp_path / "in.mlir"
    src.write_text(TORCH_MLIR)
    pipeline = "builtin.module(flashmlir-match-attention,flashmlir-lower-attention,canonicalize)"
    assert opt_tool.main([str(src), f"--pass-pipeline={pipeline}"]) == 0
    out = capsys.readouterr().out
    assert "iree_linalg_ext.attention" in out and "torch.aten.scaled_dot_product_attention" not in out


@pytest.mark.parametrize(
    "args, message",
    [
        (["{src}", "--pass-pipeline=builtin.module(no-such-pass)"], "unknown or malformed pass 'no-such-pass'"),
        (["{src}", "--flashmlir-tile-attention=q-block=x"], "cannot read 'x' as int"),
        (["{missing}", "--flashmlir-match-attention"], "no such file"),
    ],
)
def test_opt_errors(tmp_path, args, message):
    src = tmp_path / "in.mlir"
    src.write_text(TORCH_MLIR)
    argv = [a.format(src=src, missing=tmp_path / "missing.mlir") for a in args]
    proc = subprocess.run([BIN / "flashmlir-opt", *argv], capture_output=True, text=True)
    assert proc.returncode == 1 and message in proc.stderr and "Traceback" not in proc.stderr


def test_linalg_chain_is_raised_and_compiled(tmp_path):
    chunks = (LIT_INPUTS / "match-attention.mlir").read_text().split("// -----")
    (chunk,) = [c for c in chunks if "@linalg_transpose_scale" in c]
    src = tmp_path / "chain.mlir"
    src.write_text("\n".join(line for line in chunk.splitlines() if not line.startswith("//")))
    assert compile_tool.main([str(src), "-q"]) == 0
    q, k, v = (torch.randn(8, 128, 64) for _ in range(3))
    (out,) = IreeModule((tmp_path / "chain.vmfb").read_bytes(), function="linalg_transpose_scale")(q, k, v)
    assert rel_err(out, attention64(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), scale=0.125)[0]) < 1e-5


def test_save_temps_keeps_every_stage(tmp_path, monkeypatch):
    monkeypatch.setenv("FLASHMLIR_SAVE_TEMPS", str(tmp_path))
    q, k, v = (torch.randn(1, 2, 24, 8) for _ in range(3))
    with torch.no_grad():
        torch.compile(F.scaled_dot_product_attention, backend="flashmlir")(q, k, v)
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    names = sorted(p.name for p in folder.iterdir())
    assert names[:8] == ["00-input.mlir", "01-erase-device-placement.mlir", "02-bind-result-storage.mlir",
                         "03-match-attention.mlir", "04-lower-attention.mlir", "05-dispatch-microkernels.mlir",
                         "06-dispatch-training.mlir", "07-tile-attention.mlir"]
    # Head dim 8 has no microkernel: the tile pass writes the flash loop nest.
    assert "flow.dispatch.workgroups" in (folder / "07-tile-attention.mlir").read_text()
