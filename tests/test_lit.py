"""Run the lit/FileCheck suite (tests/lit) as part of pytest, so one command runs every test."""

import subprocess
import sys
from pathlib import Path


def test_lit_suite():
    lit = Path(sys.executable).parent / "lit"
    proc = subprocess.run([lit, "-v", str(Path(__file__).parent / "lit")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert "Passed" in proc.stdout
