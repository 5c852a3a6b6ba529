"""The target table: what is available, and what asking for the rest says."""

import pytest

from flashmlir.compiler.targets import TARGET_NAMES, check_runs_on, get_target, lookup, target_for_device
from flashmlir.errors import UnsupportedError


def test_cpu_is_available_with_llvm_cpu_flags_and_tiles():
    cpu = get_target("cpu")
    assert cpu.available and cpu.runtime_driver == "local-task"
    assert "--iree-hal-local-target-device-backends=llvm-cpu" in cpu.iree_flags
    tiles = cpu.attention_tiles
    assert tiles.q_block % tiles.vector_q == 0 and tiles.kv_block % tiles.vector_kv == 0


@pytest.mark.parametrize("name", ["npu"])
def test_planned_targets_are_listed_but_refused_clearly(name):
    assert name in TARGET_NAMES and not lookup(name).available
    with pytest.raises(UnsupportedError, match=rf"target '{name}' .* not supported yet \(supported now: cpu, sm_70"):
        get_target(name)


def test_unknown_target_names_the_known_ones():
    with pytest.raises(UnsupportedError, match="unknown target 'sm_75' .*known: cpu, sm_70"):
        lookup("sm_75")


def test_device_selection_takes_the_newest_target_the_device_runs():
    assert target_for_device("cpu").name == "cpu"
    assert [target_for_device("cuda", cc).name for cc in [(7, 0), (7, 5), (8, 0), (8, 9), (9, 0), (10, 0)]] == [
        "sm_70", "sm_70", "sm_80", "sm_80", "sm_90", "sm_90"]
    with pytest.raises(UnsupportedError, match="older than sm_70"):
        target_for_device("cuda", (6, 1))
    with pytest.raises(UnsupportedError, match="device 'mps'"):
        target_for_device("mps")


def test_code_for_a_newer_arch_is_refused_on_an_older_device():
    check_runs_on(get_target("sm_70"), (9, 0))  # PTX JIT-compiles forward
    with pytest.raises(UnsupportedError, match=r"sm_90 needs compute capability \(9, 0\), the device has \(8, 0\)"):
        check_runs_on(get_target("sm_90"), (8, 0))


@pytest.mark.parametrize("name, has_mma, bf16", [("sm_70", False, False), ("sm_80", True, True), ("sm_90", True, True)])
def test_cuda_target_descriptions(name, has_mma, bf16):
    gpu = get_target(name).gpu
    text = gpu.iree_target()
    assert f'arch = "{name}"' in text
    assert ("NV_MMA_SYNC_F32_16x8x16_F16" in text) == has_mma  # mma.sync m16n8k16 is sm_80+
    assert ("bfloat16" in get_target(name).dtypes) == bf16
