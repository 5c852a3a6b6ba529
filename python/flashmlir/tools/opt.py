"""flashmlir-opt: run flashmlir's passes (and any MLIR/IREE pass) on an .mlir file, print the IR.

    flashmlir-opt input.mlir --pass-pipeline='builtin.module(flashmlir-match-attention,canonicalize)'
    flashmlir-opt --split-input-file --flashmlir-tile-attention='target=cpu q-block=32' input.mlir

Like mlir-opt: `-` reads stdin, `--split-input-file` runs each `// -----` chunk on its own (errors
are reported per chunk and the exit code is 1 if any chunk failed), `--debug` prints why our
passes left ops alone.
"""

from __future__ import annotations

import argparse
import sys

from flashmlir.compiler.mlir_io import new_context, parse_module, read_text
from flashmlir.errors import FlashmlirError, InputError
from flashmlir.passes import REGISTRY
from flashmlir.passes.pass_manager import build_pass_manager, parse_pipeline

SPLIT_MARKER = "// -----"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="flashmlir-opt",
        description="Run flashmlir passes on MLIR and print the result.",
        epilog="flashmlir passes (as flags, with options as --name='key=value ...'):\n"
        + "\n".join(f"  --{s.name:<28} {s.summary}" for s in REGISTRY.values()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("input", help="an .mlir file, or - for stdin")
    p.add_argument("--pass-pipeline", default="", help="textual pipeline, e.g. 'builtin.module(a,b)'")
    p.add_argument("--split-input-file", action="store_true", help="process each '// -----' chunk separately")
    p.add_argument("-o", "--output", default="-", help="output file (default: stdout)")
    p.add_argument("--debug", action="store_true", help="print each decline of our passes to stderr")
    return p


def _split_pass_flags(argv: list[str]) -> tuple[list[str], list[str]]:
    """Take `--<our pass>[=OPTIONS]` flags out of argv (in order) as pipeline elements."""
    elements, rest = [], []
    for token in argv:
        name, sep, options = token.removeprefix("--").partition("=")
        if token.startswith("--") and name in REGISTRY:
            elements.append(f"{name}{{{options}}}" if sep and options else name)
        else:
            rest.append(token)
    return elements, rest


def _pipeline_from(args: argparse.Namespace, pass_flags: list[str]) -> str:
    """The pipeline: --pass-pipeline, or the pass flags in the order they were given."""
    if args.pass_pipeline and pass_flags:
        raise InputError("give either --pass-pipeline or individual pass flags, not both")
    return args.pass_pipeline or ",".join(pass_flags)


def _process(chunk: str, source: str, pipeline: str, debug: bool) -> str:
    context = new_context()
    with context:
        module = parse_module(chunk, context, source)
        results = []
        pm = build_pass_manager(parse_pipeline(pipeline), results)
        diagnostics: list[str] = []

        def on_diagnostic(d):
            diagnostics.append(str(d.message))
            return True

        handle = context.attach_diagnostic_handler(on_diagnostic)
        try:
            pm.run(module.operation)
        except Exception as e:
            detail = "; ".join(diagnostics) or str(e)
            raise FlashmlirError(f"pass pipeline failed: {detail}") from None
        finally:
            handle.detach()
        if debug:
            for r in results:
                print(f"[{r.pass_name}] rewrote {r.rewritten}", file=sys.stderr)
                for d in r.declined:
                    print(f"[{r.pass_name}] declined {d}", file=sys.stderr)
        return str(module)


def main(argv: list[str] | None = None) -> int:
    pass_flags, argv = _split_pass_flags(list(sys.argv[1:] if argv is None else argv))
    args = _parser().parse_args(argv)
    try:
        pipeline = _pipeline_from(args, pass_flags)
        parse_pipeline(pipeline)  # report a bad pipeline once, before any chunk
        text = sys.stdin.read() if args.input == "-" else read_text(args.input)
        chunks = text.split(SPLIT_MARKER) if args.split_input_file else [text]
        outputs, failed = [], False
        for chunk in chunks:
            try:
                outputs.append(_process(chunk, args.input, pipeline, args.debug))
            except FlashmlirError as e:
                if not args.split_input_file:
                    raise
                print(f"flashmlir-opt: error: {e}", file=sys.stderr)
                failed = True
        rendered = f"\n{SPLIT_MARKER}\n".join(o.rstrip("\n") for o in outputs) + "\n"
        if args.output == "-":
            sys.stdout.write(rendered)
        else:
            with open(args.output, "w") as f:
                f.write(rendered)
        return 1 if failed else 0
    except FlashmlirError as e:
        print(f"flashmlir-opt: error: {e}", file=sys.stderr)
        return 1
