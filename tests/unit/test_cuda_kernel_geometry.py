"""Launch geometry of the CUDA forward kernels as the catalog describes them (no GPU needed)."""

from pathlib import Path

import pytest

from flashmlir.compiler.microkernels import PERSISTENT_MAX_Q_BLOCKS, CudaAttentionKernel


def _sm90(head_dim: int, tma: bool = False) -> CudaAttentionKernel:
    return CudaAttentionKernel("attention_fwd_sm90", "f16", head_dim, 128, 128, 12, "sm_90a", Path("k.fatbin"),
                               tma=tma)


@pytest.mark.parametrize("seq_q, batch_heads, causal, workgroups", [
    (1000, 32, False, 132),  # 8 query blocks × 32 heads = 256 tiles over one workgroup per SM
    (1000, 16, False, 128),  # 128 tiles: one each
    (1000, 16, True, 64),  # causal tiles go out in pairs
    (1000, 33, True, 132),  # 264 tiles, 132 pairs
    (1, 4, False, 4),
    (129, 3, True, 3),  # 6 tiles, 3 pairs
    (130, 1, True, 1),
])
def test_sm90_grid_is_persistent_on_short_sequences(seq_q, batch_heads, causal, workgroups):
    assert _sm90(128).grid(seq_q, batch_heads, 132, causal) == (workgroups, 1, 1)


def test_a_single_consumer_fills_two_workgroups_an_sm():
    """block_m 64 (Sm90Config::kBlocksPerSm 2): the persistent grid is twice the SMs, and two
    workgroups' shared memory fit one SM's 228 KB at head dims 64 and 128."""
    single = CudaAttentionKernel("attention_fwd_sm90", "f16", 64, 64, 128, 8, "sm_90a", Path("k.fatbin"), tma=True)
    assert single.workgroups_per_multiprocessor == 2 and _sm90(64).workgroups_per_multiprocessor == 1
    assert single.grid(4096, 32, 132, False) == (264, 1, 1)
    assert single.grid(128, 100, 132, False) == (200, 1, 1)  # fewer tiles than places
    assert 2 * single.shared_bytes <= 228 * 1024
    d128 = CudaAttentionKernel("attention_fwd_sm90", "f16", 128, 64, 64, 8, "sm_90a", Path("k.fatbin"), tma=True)
    assert 2 * d128.shared_bytes <= 228 * 1024


def test_sm90_grid_follows_the_device():
    assert _sm90(64).grid(4096, 32, 114, False) == (114, 1, 1)


@pytest.mark.parametrize("causal", [False, True])
def test_long_sequences_take_a_workgroup_per_tile(causal):
    seq = PERSISTENT_MAX_Q_BLOCKS * 128
    assert _sm90(128).grid(seq, 4, 132, causal)[0] <= 132
    assert _sm90(128).grid(seq + 1, 4, 132, causal) == ((PERSISTENT_MAX_Q_BLOCKS + 1) * 4, 1, 1)


@pytest.mark.parametrize("causal", [False, True])
def test_tma_kernels_are_persistent_at_every_length(causal):
    assert _sm90(128, tma=True).grid(16384, 32, 132, causal) == (132, 1, 1)
    assert _sm90(64, tma=True).grid(16384, 1, 132, causal) == (128 // (2 if causal else 1), 1, 1)


def test_tma_workspace_holds_three_aligned_maps_a_workgroup():
    assert _sm90(128, tma=True).workspace_bytes((132, 1, 1)) == 132 * 3 * 128 + 128
    assert _sm90(128).workspace_bytes((132, 1, 1)) == 0
    # and Sm90Config's shared memory: the tiles, 3 maps, 10 mbarriers, 1024 bytes of alignment
    assert _sm90(128, tma=True).shared_bytes == 32768 + 4 * 32768 + 384 + 80 + 1024


def test_the_catalog_loads_every_sm90_forward_through_tma():
    from flashmlir.compiler.microkernels import library

    forward = [k for k in library().cuda if k.family == "attention_fwd_sm90"]
    if not forward:
        pytest.skip("the microkernel library is not installed")
    assert {(k.head_dim, k.tma) for k in forward} == {(64, True), (128, True), (256, True)}
    # O through the copy engine at head dim 128 below 16k tokens (with ping-pong), and at head dim 256
    assert {(k.head_dim, k.min_seq) for k in forward if k.tma_store} == {(128, 0), (256, 0)}
    assert {(k.min_seq, k.tma_store, k.pingpong) for k in forward if k.head_dim == 128} == {(0, True, True),
                                                                                          (16384, False, False)}
    # head dim 64: one consumer (two workgroups an SM) below the three-consumer tiling's lengths
    assert {(k.min_seq, k.block_m) for k in forward if k.head_dim == 64} == {(0, 64), (2048, 192)}


def test_tma_store_adds_an_o_tile_a_consumer_and_a_fourth_map():
    kernel = CudaAttentionKernel("attention_fwd_sm90", "f16", 128, 128, 128, 12, "sm_90a", Path("k.fatbin"),
                                 tma=True, tma_store=True)
    assert kernel.shared_bytes == 32768 + 4 * 32768 + 2 * 64 * 128 * 2 + 4 * 128 + 80 + 1024
    assert kernel.workspace_bytes((132, 1, 1)) == 132 * 4 * 128 + 128


def test_tma_store_without_a_persistent_grid_stages_o_in_the_q_tile():
    """Head dim 256 (a workgroup per query block) has no room for O tiles: O waits in Q's rows."""
    kernel = CudaAttentionKernel("attention_fwd_sm90", "f16", 256, 128, 64, 12, "sm_90a", Path("k.fatbin"),
                                 tma=True, tma_store=True)
    assert kernel.shared_bytes == 65536 + 4 * 32768 + 4 * 128 + 80 + 1024 <= 227 * 1024
    assert kernel.workspace_bytes((32, 1, 1)) == 32 * 4 * 128 + 128


@pytest.mark.parametrize("tma", [False, True])
def test_head_dim_256_takes_a_workgroup_per_tile(tma):
    assert not _sm90(256, tma=tma).persistent
    assert _sm90(256, tma=tma).grid(1000, 4, 132, True) == (32, 1, 1)
    # with TMA each of those workgroups makes its own maps
    assert _sm90(256, tma=tma).workspace_bytes((32, 1, 1)) == (32 * 3 * 128 + 128 if tma else 0)


def test_sm80_grid_is_query_blocks_by_heads():
    kernel = CudaAttentionKernel("attention_fwd_sm80", "f16", 128, 128, 64, 4, "sm_80", Path("k.fatbin"))
    assert not kernel.persistent
    assert kernel.grid(1000, 32, 108, False) == (8, 32, 1)


def test_shared_memory_counts_the_query_barriers():
    # Q (128 × 128 × 2) + 2 stages × K, V (128 × 128 × 2) + 10 mbarriers + 1024 bytes of alignment.
    assert _sm90(128).shared_bytes == 32768 + 4 * 32768 + 80 + 1024


def _library_with_objects(tmp_path, monkeypatch, built):
    """The real catalog in a library directory where only the sm_90 objects `built` exist."""
    import shutil

    from flashmlir.compiler import microkernels

    (tmp_path / "cuda").mkdir()
    shutil.copy(Path(__file__).parents[2] / "runtime" / "microkernels" / "kernels.json", tmp_path)
    for name in built:
        (tmp_path / "cuda" / f"attention_fwd_sm90_{name}.fatbin").write_bytes(b"stand-in")
    monkeypatch.setenv("FLASHMLIR_MICROKERNEL_DIR", str(tmp_path))
    return microkernels


@pytest.mark.parametrize("seq_q, seq_k, causal, tiles", [
    (None, None, False, (64, 128, 8)),  # lengths unknown: the tiling for any
    (1000, 1000, False, (64, 128, 8)),
    (2048, 2047, False, (64, 128, 8)),  # both lengths must reach min_seq
    (2047, 8192, False, (64, 128, 8)),
    (2048, 2048, False, (192, 96, 16)),
    (2048, 2048, True, (64, 128, 8)),  # causal: from min_seq_causal
    (3072, 3071, True, (64, 128, 8)),
    (3072, 3072, True, (192, 96, 16)),
    (16384, 8192, True, (192, 96, 16)),
])
def test_head_dim_64_takes_the_long_sequence_tiling_from_2048_causal_3072(tmp_path, monkeypatch, seq_q, seq_k,
                                                                          causal, tiles):
    microkernels = _library_with_objects(tmp_path, monkeypatch, ["f16_d64", "f16_d64_from2048"])
    kernel = microkernels.select_attention_forward("sm_90", "f16", 64, seq_q, seq_k, causal)
    assert (kernel.block_m, kernel.block_n, kernel.warps) == tiles
    long = tiles[0] == 192
    assert kernel.name == "flashmlir_attention_fwd_sm90_f16_d64" + ("_from2048" if long else "")
    assert kernel.object_path.name == "attention_fwd_sm90_f16_d64" + ("_from2048" if long else "") + ".fatbin"
    assert kernel.threads == (512 if long else 256)


def test_an_unbuilt_long_sequence_tiling_leaves_the_default(tmp_path, monkeypatch):
    microkernels = _library_with_objects(tmp_path, monkeypatch, ["f16_d64", "f16_d128"])
    assert microkernels.select_attention_forward("sm_90", "f16", 64, 8192, 8192).block_m == 64
    # head dim 128 has one tiling for every length
    assert microkernels.select_attention_forward("sm_90", "f16", 128, 8192, 8192).block_m == 128


def test_three_consumer_shared_memory():
    kernel = CudaAttentionKernel("attention_fwd_sm90", "f16", 64, 192, 96, 16, "sm_90a", Path("k.fatbin"), min_seq=2048)
    # Sm90Config<half, 64, 96, 2, 3>: Q 192×64, 2 stages × (K, V) of 96×64, 10 mbarriers, 1024 of alignment
    assert kernel.shared_bytes == 192 * 128 + 4 * 96 * 128 + 80 + 1024
    assert kernel.grid(4096, 4, 132, False) == (88, 1, 1)  # ⌈4096/192⌉ = 22 query blocks × 4 heads


def test_sm90_backward_tma_workspace_and_shared_memory():
    from flashmlir.compiler.microkernels import CudaAttentionBackwardKernel

    plain = CudaAttentionBackwardKernel("attention_bwd_sm90", "f16", 128, 64, 128, 12, "sm_90a", Path("k.fatbin"))
    tma = CudaAttentionBackwardKernel("attention_bwd_sm90", "f16", 128, 64, 128, 12, "sm_90a", Path("k.fatbin"),
                                      tma=True)
    grid = tma.grid("dkdv", 1000, 8)
    assert grid == (8, 8, 1)
    assert tma.workspace_bytes("dkdv", grid) == 8 * 8 * 4 * 128 + 128
    assert tma.workspace_bytes("dq", grid) == plain.workspace_bytes("dkdv", grid) == 0
    assert tma.shared_bytes("dkdv") == plain.shared_bytes("dkdv") + 4 * 128 <= 227 * 1024
