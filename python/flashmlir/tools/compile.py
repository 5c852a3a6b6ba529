"""flashmlir-compile: an .mlir file (torch or linalg dialect) or a saved torch.export program → .vmfb.

    flashmlir-compile model.pt2 -o model.vmfb --target cpu
    flashmlir-compile attention.mlir --dump-ir ir/        # IR after every stage, numbered
    flashmlir-compile --print-stages

Attention in the input is found by flashmlir-match-attention (torch IR) or taken as
iree_linalg_ext.attention (linalg IR), then lowered by our passes; see docs/ARCHITECTURE.md.
User errors print one line and exit 1; nothing is written unless the compile succeeded.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from flashmlir.errors import FlashmlirError, InputError
from flashmlir.files import write_atomically


def _parser() -> argparse.ArgumentParser:
    from flashmlir.compiler.targets import TARGET_NAMES

    p = argparse.ArgumentParser(prog="flashmlir-compile", description=__doc__.split("\n\n")[0])
    p.add_argument("input", nargs="?", help="an .mlir file or a torch.export program (.pt2)")
    p.add_argument("-o", "--output", help="the .vmfb to write (default: INPUT with .vmfb)")
    p.add_argument("--target", default="cpu", choices=TARGET_NAMES, help="what to compile for (default: cpu)")
    p.add_argument("--dump-ir", metavar="DIR", help="write the IR after each stage into DIR")
    p.add_argument("--print-stages", action="store_true", help="list the pipeline's stages and exit")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")
    return p


def _load(path: Path, session):
    """The input as a module in the session's context."""
    from flashmlir.compiler.mlir_io import parse_module, read_text
    from flashmlir.frontend.fx_import import import_exported_program

    if path.suffix == ".mlir":
        return parse_module(read_text(path), session.context, str(path))
    if path.suffix == ".pt2":
        return import_exported_program(_load_exported_program(path), session.context)
    raise InputError(f"'{path}': expected an .mlir file or a torch.export program (.pt2)")


def _load_exported_program(path: Path):
    import logging
    import zipfile

    import torch

    if not path.is_file():
        raise InputError(f"no such file: '{path}'")
    if not zipfile.is_zipfile(path):
        raise InputError(f"'{path}' is not a torch.export program (not a .pt2 archive)")
    export_log = logging.getLogger("torch.export")
    level = export_log.level
    export_log.setLevel(logging.ERROR)  # torch logs its own account of a failed load; ours suffices
    try:
        return torch.export.load(str(path))
    except Exception as e:  # noqa: BLE001 - any load failure is a bad input file
        raise InputError(f"'{path}' is not a torch.export program: {type(e).__name__}: {e}") from None
    finally:
        export_log.setLevel(level)


def run(args: argparse.Namespace) -> int:
    from flashmlir.compiler import iree_driver
    from flashmlir.compiler.pipeline import check_element_types, compile_module, print_stages
    from flashmlir.compiler.targets import get_target

    target = get_target(args.target)
    if args.print_stages:
        print(print_stages(target))
        return 0
    if not args.input:
        raise InputError("no input file given (see --help)")
    source = Path(args.input)
    output = Path(args.output) if args.output else source.with_suffix(".vmfb")

    def say(msg: str) -> None:
        if not args.quiet:
            print(f"flashmlir-compile: {msg}", file=sys.stderr, flush=True)

    start = time.perf_counter()
    session = iree_driver.new_session(target.compile_flags)
    module = _load(source, session)
    check_element_types(module, target)
    say(f"{source} → {output} for {target.name}")
    vmfb, report = compile_module(
        session, module, target,
        dump_dir=Path(args.dump_ir) if args.dump_ir else None,
        progress=lambda stage: say(f"  stage {stage}"),
    )
    write_atomically(output, vmfb)
    for line in report.declines():
        say(f"  note: {line}")
    say(f"done in {time.perf_counter() - start:.2f} s: {report.attention_tiled} attention site(s) as flash "
        f"attention ({report.attention_microkernels} by microkernel), {len(vmfb)} bytes")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return run(args)
    except FlashmlirError as e:
        print(f"flashmlir-compile: error: {e}", file=sys.stderr)
        return 1
