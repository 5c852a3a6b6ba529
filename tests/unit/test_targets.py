"""The target table: what is available, and what asking for the rest says."""

import pytest

from flashmlir.compiler.targets import TARGET_NAMES, get_target, lookup, target_for_device
from flashmlir.errors import UnsupportedError


def test_cpu_is_available_with_llvm_cpu_flags_and_tiles():
    cpu = get_target("cpu")
    assert cpu.available and cpu.runtime_driver == "local-task"
    assert "--iree-hal-local-target-device-backends=llvm-cpu" in cpu.iree_flags
    tiles = cpu.attention_tiles
    assert tiles.q_block % tiles.vector_q == 0 and tiles.kv_block % tiles.vector_kv == 0


@pytest.mark.parametrize("name", ["sm_70", "sm_80", "sm_90", "npu"])
def test_planned_targets_are_listed_but_refused_clearly(name):
    assert name in TARGET_NAMES and not lookup(name).available
    with pytest.raises(UnsupportedError, match=rf"target '{name}' .* not supported yet \(supported now: cpu\)"):
        get_target(name)


def test_unknown_target_names_the_known_ones():
    with pytest.raises(UnsupportedError, match="unknown target 'sm_75' .*known: cpu, sm_70"):
        lookup("sm_75")


def test_device_selection():
    assert target_for_device("cpu").name == "cpu"
    with pytest.raises(UnsupportedError, match="sm_90"):
        target_for_device("cuda", (9, 0))
    with pytest.raises(UnsupportedError, match="device 'mps'"):
        target_for_device("mps")
