"""lit configuration: FileCheck tests of flashmlir's passes and tools.

Run with `lit tests/lit` from an environment where flashmlir is installed; `flashmlir-opt`,
`flashmlir-compile` and `filecheck` (the Python FileCheck) are taken from that environment.
"""

import os
import sys

import lit.formats

config.name = "flashmlir"  # noqa: F821 - `config` is injected by lit
config.test_format = lit.formats.ShTest(execute_external=False)  # noqa: F821
config.suffixes = [".mlir", ".test"]  # noqa: F821
config.test_source_root = os.path.dirname(__file__)  # noqa: F821
config.excludes = ["lit.cfg.py", "Output", "inputs"]  # noqa: F821
bin_dir = os.path.dirname(sys.executable)
config.environment["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")  # noqa: F821
for knob in ("FLASHMLIR_CACHE_DIR", "HOME"):
    if knob in os.environ:
        config.environment[knob] = os.environ[knob]  # noqa: F821
