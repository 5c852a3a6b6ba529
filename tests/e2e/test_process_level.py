"""What only a fresh process shows: entry-point registration and the on-disk module cache."""

import os
import subprocess
import sys
from pathlib import Path

SCRIPT = """
import torch, torch.nn.functional as F
# No `import flashmlir`: the backend is found through the torch_dynamo_backends entry point.
torch.manual_seed(0)
q, k, v = (torch.randn(1, 4, 64, 32) for _ in range(3))
with torch.no_grad():
    out = torch.compile(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True),
                        backend="flashmlir")(q, k, v)
ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
print("ERR", ((out.double() - ref).norm() / ref.norm()).item())
print("LOADED", "flashmlir" in sys.modules if (sys := __import__("sys")) else None)
"""


def _run(cache_dir: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, FLASHMLIR_CACHE_DIR=str(cache_dir), FLASHMLIR_LOG="info", FLASHMLIR_STRICT="1")
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300)


def test_entry_point_and_cache_across_processes(tmp_path):
    first = _run(tmp_path)
    assert first.returncode == 0, first.stderr
    assert "compiling for cpu" in first.stderr and "cache hit" not in first.stderr
    error = float(first.stdout.split("ERR")[1].split()[0])
    assert error < 1e-5

    entries = sorted(p.name for p in tmp_path.iterdir())
    assert len(entries) == 2 and entries[0].endswith(".json") and entries[1].endswith(".vmfb")

    second = _run(tmp_path)
    assert second.returncode == 0, second.stderr
    assert "cache hit" in second.stderr and "compiling for cpu" not in second.stderr
    assert second.stdout == first.stdout
