"""Launch geometry of the CUDA forward kernels as the catalog describes them (no GPU needed)."""

from pathlib import Path

import pytest

from flashmlir.compiler.microkernels import CudaAttentionKernel


def _sm90(head_dim: int, rounds: int) -> CudaAttentionKernel:
    return CudaAttentionKernel("attention_fwd_sm90", "f16", head_dim, 128, 128, 12, "sm_90a", Path("k.fatbin"),
                               2, False, rounds)


@pytest.mark.parametrize("seq_q, rounds, columns", [(1000, 1, 8), (1000, 2, 4), (1000, 3, 3), (1000, 8, 1),
                                                    (1000, 9, 1), (1, 4, 1), (129, 2, 1), (257, 2, 2)])
def test_sm90_workgroups_take_rounds_of_query_blocks(seq_q, rounds, columns):
    assert _sm90(128, rounds).grid(seq_q, 32) == (columns, 32, 1)


def test_long_sequences_take_one_query_block_per_workgroup():
    assert _sm90(128, 2).grid(64 * 128, 4) == (32, 4, 1)
    assert _sm90(128, 2).grid(64 * 128 + 1, 4) == (65, 4, 1)


def test_only_the_persistent_kernel_takes_several_query_blocks():
    with pytest.raises(ValueError, match="below head dim 256"):
        _sm90(256, 2)
    with pytest.raises(ValueError, match="only the sm_90 kernel"):
        CudaAttentionKernel("attention_fwd_sm80", "f16", 128, 128, 64, 4, "sm_80", Path("k.fatbin"), rounds=2)
    with pytest.raises(ValueError):
        _sm90(128, 0)
    assert _sm90(256, 1).grid(1000, 4) == (8, 4, 1)


def test_shared_memory_counts_the_query_barriers():
    # Q (128 × 128 × 2) + 2 stages × K, V (128 × 128 × 2) + 10 mbarriers + 1024 bytes of alignment.
    assert _sm90(128, 2).shared_bytes == 32768 + 4 * 32768 + 80 + 1024
