"""Textual pipelines mixing our passes with MLIR passes."""

import pytest

from flashmlir.errors import InputError
from flashmlir.passes import REGISTRY
from flashmlir.passes.pass_manager import parse_pipeline, split_top_level


def test_split_respects_nesting():
    assert split_top_level("a,b{x=1,y=2},func.func(c,d),e") == ["a", "b{x=1,y=2}", "func.func(c,d)", "e"]


def test_parse_mixed_pipeline_with_options():
    elements = parse_pipeline(
        "builtin.module(flashmlir-match-attention,canonicalize,flashmlir-tile-attention{target=cpu q-block=32})"
    )
    assert [e.spec.name if e.spec else e.text for e in elements] == [
        "flashmlir-match-attention", "canonicalize", "flashmlir-tile-attention"]
    options = elements[2].options
    assert (options.target, options.q_block, options.kv_block) == ("cpu", 32, 0)


@pytest.mark.parametrize(
    "text, message",
    [
        ("flashmlir-tile-attention{q-blok=3}", "unknown option 'q-blok=3'"),
        ("flashmlir-tile-attention{q-block=big}", "cannot read 'big' as int"),
    ],
)
def test_bad_options_are_input_errors(text, message):
    with pytest.raises(InputError, match=message):
        parse_pipeline(text)


def test_every_pass_has_a_lit_test():
    from pathlib import Path

    lit_dir = Path(__file__).parents[1] / "lit" / "passes"
    for name in REGISTRY:
        assert (lit_dir / f"{name.removeprefix('flashmlir-')}.mlir").is_file(), name


@pytest.mark.parametrize("target, deterministic, expected", [
    ("sm_90", True, True), ("sm_90", False, False), ("sm_80", True, True), ("cpu", True, False)])
def test_deterministic_mode_reaches_the_training_pass_for_cuda(target, deterministic, expected):
    """torch's deterministic mode (compiler/fx_compile.py) becomes the training pass's option on CUDA
    targets (the sm_90 kernels sum dQ in a varying order); the CPU kernels are deterministic anyway."""
    from flashmlir.compiler.pipeline import flashmlir_stages
    from flashmlir.compiler.targets import get_target

    [stage] = [s for s in flashmlir_stages(get_target(target), True, deterministic) if s.name == "dispatch-training"]
    [element] = parse_pipeline(stage.pipeline)
    assert element.options.deterministic is expected
