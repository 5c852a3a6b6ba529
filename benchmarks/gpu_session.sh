#!/usr/bin/env bash
# What one session on the GPU machine runs (device tool, H100/H200; see README "GPU work"):
#   source .bundle/activate.sh; bash benchmarks/gpu_session.sh STEP...
# Steps: install (builds the microkernels with nvcc), kernels (their direct tests), volta (the sm_70
# kernel's tests, through the driver's PTX JIT),
# sweep (tile sweep table), gpu-tests (the whole GPU suite), bench (attention grid, hdim 64/128),
# sanitize (compute-sanitizer memcheck + racecheck on a kernel), profile (ncu vs SDPA flash, SASS mix),
# backward (the backward kernels' direct tests and their table beside SDPA's backward),
# train (GPT-2 small training steps, benchmarks/train_gpt2.py; TRAIN_ARGS), host (host cost per
# attention call, benchmarks/host_overhead.py), ablation (what O's stores and the proxy fences cost
# the sm_90 forward, benchmarks/forward_epilogue_ablation.py), stalls (ncu: where the forward's
# consumers wait at 512 tokens with and without O's stores), tma (whether a TMA tensor map can be
# made on the device; each case in its own process, benchmarks/tma_probe.py), store-stalls (ncu: O
# through TMA against O from registers at 4k tokens), dropout (the dropout twins' GPU tests, IREE's
# lowering of them included, and their cost beside SDPA's: benchmarks/dropout_cost.py), backward-kernels
# (the sm_90 backward kernel by kernel beside cuDNN's and flash's kernels: benchmarks/backward_kernels.py;
# BWD_VARIANTS for an A/B, e.g. "sm90 sm90:NAME=V").
# Logs and tables go to $OUT (at most 8 files come back).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/flashmlir-out}
mkdir -p "$OUT"
status=0
for step in "$@"; do
  echo "=== $step"
  case $step in
    install) python -m pip install --no-deps --no-build-isolation -q -e . 2>&1 | tail -15 || status=1
             lib="$(python -c 'from flashmlir.compiler import microkernels as m; print(m.library_dir())')"
             # The Volta PTX needs NVRTC 12, which this machine lacks (no package index): it is built
             # on the workstation (pip install '.[volta]'; pip install -e .) and carried in .volta/.
             if ls .volta/*.ptx > /dev/null 2>&1; then cp .volta/*.ptx "$lib/cuda/"; fi
             ls -la "$lib/cuda" ;;
    volta) python -m pytest -q -p no:cacheprovider tests/gpu/test_microkernels.py -k "volta or sm_70" 2>&1 | tail -15 || status=1
           grep -ohE "wmma\.mma\.sync[a-z0-9._]*" "$(python -c 'from flashmlir.compiler import microkernels as m; print(m.library_dir())')"/cuda/*sm70*.ptx | sort | uniq -c ;;
    kernels) python -m pytest -q -p no:cacheprovider tests/gpu/test_microkernels.py 2>&1 | tail -30 || status=1 ;;
    backward) python -m pytest -q -p no:cacheprovider tests/gpu/test_backward_microkernels.py 2>&1 | tail -30 || status=1
              python benchmarks/attention_backward.py ${BWD_ARGS:-} --markdown "$OUT/backward.md" \
                --json "$OUT/backward.json" 2>&1 | grep -v '^{' || status=1 ;;
    train) python benchmarks/train_gpt2.py ${TRAIN_ARGS:-} --markdown "$OUT/train-gpt2.md" \
             --json "$OUT/train-gpt2.json" 2>&1 | grep -v '^{' | grep -v 'leaked\|nanobind' || status=1 ;;
    host) python benchmarks/host_overhead.py --profile --markdown "$OUT/host.md" --json "$OUT/host.json" \
            2>&1 | grep -v '^{' || status=1 ;;
    sweep) python benchmarks/microkernel_sweep.py --markdown "$OUT/sweep.md" --json "$OUT/sweep.json" \
             2>&1 | grep -v '^{' || status=1 ;;
    gpu-tests) python -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu-tests.log" | tail -40 || status=1 ;;
    bench) python benchmarks/attention.py --targets default sm_90 sm_80 --no-stock --markdown "$OUT/bench.md" \
             --json "$OUT/bench.json" 2>&1 | grep -v '^{' || status=1 ;;
    sanitize) for tool in memcheck racecheck; do
                compute-sanitizer --tool $tool --print-limit 5 python benchmarks/profile_microkernel.py \
                  --seq 333 --batch 1 --heads 2 --causal 2>&1 | tail -3 || status=1
                # head dim 256: O staged in the Q tile's rows for its TMA store (333 rows: a ragged last block)
                compute-sanitizer --tool $tool --print-limit 5 python benchmarks/profile_microkernel.py \
                  --seq 333 --batch 1 --heads 2 --causal --head-dim 256 2>&1 | tail -2 || status=1
                # head dim 64's three-consumer tiling; 200 rows: two of the last block's consumers idle
                compute-sanitizer --tool $tool --print-limit 5 python benchmarks/profile_microkernel.py \
                  --seq 200 --batch 1 --heads 2 --causal --head-dim 64 --select-seq 4096 2>&1 | tail -2 || status=1
                for d in 64 128; do  # the backward (sm_90: dkdv's mbarrier hand-offs), causal, GQA 4:2
                  compute-sanitizer --tool $tool --print-limit 5 python benchmarks/profile_microkernel.py \
                    --seq 333 --batch 1 --heads 4 --kv-heads 2 --causal --head-dim $d --backward 2>&1 | tail -2 || status=1
                done
                # the dropout twins (sm_90 and sm_80), forward and backward, odd lengths, GQA
                compute-sanitizer --tool $tool --print-limit 5 python -m pytest -q -p no:cacheprovider \
                  tests/gpu/test_dropout_kernels.py -k "f16 and not bf16 and (333-517 or 129-77)" 2>&1 | tail -2 || status=1
              done ;;
    profile) ncu --section WarpStateStats --section ComputeWorkloadAnalysis --section SchedulerStats \
               --section MemoryWorkloadAnalysis --section Occupancy -k regex:flash -s 1 -c 3 \
               python benchmarks/profile_microkernel.py --arch sm_80 --sdpa flash > "$OUT/ncu.txt" 2>&1 || status=1
             grep -E "^  [a-z_]+flash|Warp Cycles Per Issued|Issue Slots Busy|No Eligible|Stall|Registers|Achieved Occ|Mem Busy|L1/TEX Hit|L2 Hit|Max Bandwidth|Executed Ipc A" "$OUT/ncu.txt" | head -60
             cuobjdump -sass "$(python -c 'from flashmlir.compiler import microkernels as m; print(m.select_attention_forward("sm_80","f16",128).object_path)')" \
               > "$OUT/sass_d128.txt" 2>&1
             grep -oE "(HMMA|LDSM|MUFU|FFMA|FMUL|FADD|FMNMX|SHFL|BAR|LDGSTS|STL|LDL|F2FP)[A-Z0-9._]*" "$OUT/sass_d128.txt" \
               | sort | uniq -c | sort -rn | head -20 ;;
    ablation) # what O's stores and the consumers' proxy fences (MEMBAR.ALL.CTA) cost the forward
              python benchmarks/forward_epilogue_ablation.py --head-dims 64 128 --seqs 512 1024 2048 4096 16384 \
                --markdown "$OUT/forward-ablation.md" 2>&1 | grep -v '^{' || status=1 ;;
    stalls) # where the forward's consumers wait at head dim 128, 512 tokens, with and without O's stores (ncu)
            dir=$(mktemp -d)
            python -c "import sys, pathlib; sys.path.insert(0, 'benchmarks'); import forward_epilogue_ablation as f; f.patched_copy(pathlib.Path('$dir'))"
            for x in 0 1; do
              nvcc --cubin -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DFLASHMLIR_ELEMENT=half \
                -DFLASHMLIR_ELEMENT_NAME=f16 -DFLASHMLIR_HEAD_DIM=128 -DFLASHMLIR_X_NO_STORE=$x \
                "$dir/fwd_sm90_kernels.cu" -o "$dir/x$x.cubin" || status=1
              ncu --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
                --section MemoryWorkloadAnalysis -k regex:attention_fwd python benchmarks/profile_microkernel.py --seq 512 \
                --object "$dir/x$x.cubin" > "$OUT/stalls-x$x.txt" 2>&1 || status=1
              echo "--- X_NO_STORE=$x"; grep -E "Duration|Stall|Warp Cycles|Issue Slots|Eligible|DRAM Throughput|L2 Hit" "$OUT/stalls-x$x.txt" | head -30
            done ;;
    tma) python benchmarks/tma_probe.py --markdown "$OUT/tma-probe.md" 2>&1 | tail -12 || status=1 ;;
    store-stalls) # why O through TMA (tma_store) loses 3-12% from 2k tokens: ncu at head dim 128, 4096 tokens,
                  # the catalog's kernel there (O from registers) against the same entry built with it
                  dir=$(mktemp -d)
                  nvcc --cubin -O3 -std=c++17 -gencode=arch=compute_90a,code=sm_90a -DFLASHMLIR_ELEMENT=half \
                    -DFLASHMLIR_ELEMENT_NAME=f16 -DFLASHMLIR_HEAD_DIM=128 -DFLASHMLIR_NAME_TAG=_from2048 -DFLASHMLIR_TMA=1 \
                    -DFLASHMLIR_TMA_STORE=1 runtime/microkernels/attention/fwd_sm90_kernels.cu -o "$dir/store.cubin" || status=1
                  for v in registers store; do
                    extra=(); [ $v = store ] && extra=(--object "$dir/store.cubin" --set tma_store=1)
                    ncu --launch-skip 1 --launch-count 1 --section SpeedOfLight --section WarpStateStats --section SchedulerStats \
                      --section MemoryWorkloadAnalysis --section SourceCounters -k regex:attention_fwd \
                      python benchmarks/profile_microkernel.py --seq 4096 "${extra[@]}" > "$OUT/store-stalls-$v.txt" 2>&1 || status=1
                    echo "--- O from $v"; grep -E "Duration|Warp Cycles|Eligible|stall|Stall" "$OUT/store-stalls-$v.txt" | head -24
                  done ;;
    dropout) python -m pytest -q -p no:cacheprovider tests/gpu/test_dropout_kernels.py 2>&1 | tail -15 || status=1
             python benchmarks/dropout_cost.py --head-dims 64 128 --seqs 1024 4096 16384 --markdown "$OUT/dropout.md" \
               2>&1 | grep "^| " || status=1 ;;
    backward-kernels) python benchmarks/backward_kernels.py --variants ${BWD_VARIANTS:-sm90} \
                        --markdown "$OUT/backward-kernels.md" 2>&1 | grep -E "all|error" || status=1 ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
