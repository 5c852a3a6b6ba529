// The training ops (forward with lse, backward) become calls of the library's CUDA kernels.
// A library with the real catalog and stand-in objects (f16 d64 forward and backward only):
// RUN: rm -rf %t && mkdir -p %t/cuda && cp %S/../../../runtime/microkernels/kernels.json %t/
// RUN: touch %t/cuda/attention_fwd_sm80_f16_d64.fatbin %t/cuda/attention_bwd_sm80_f16_d64.fatbin
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-training=target=sm_80 %s | filecheck %s
// With the Hopper forward built too, sm_90 takes it for the forward (the backward stays the sm_80 one):
// RUN: touch %t/cuda/attention_fwd_sm90_f16_d64.fatbin
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-training=target=sm_90 %s | filecheck %s --check-prefix=HOPPER
// With the Hopper backward built as well, sm_90 takes it (three kernels, dQ summed atomically), except
// in deterministic mode:
// RUN: touch %t/cuda/attention_bwd_sm90_f16_d64.fatbin
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-training=target=sm_90 %s | filecheck %s --check-prefix=HOPPERBWD
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-training='target=sm_90 deterministic=1' %s | filecheck %s --check-prefix=HOPPER
// A catalog whose sm_90 backward loads through TMA (`tma`): dkdv gains the maps' workspace result:
// RUN: rm -rf %ttma && cp -r %t %ttma && sed -i '/"attention_bwd_sm90"/{n;s/"stages": 2}/"stages": 2, "tma": true}/}' %ttma/kernels.json
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%ttma flashmlir-opt --split-input-file --flashmlir-dispatch-attention-training=target=sm_90 %s | filecheck %s --check-prefix=BWDTMA
// What it cannot serve is an error naming the op and the reason (nothing else lowers these ops):
// RUN: rm %t/cuda/attention_bwd_sm80_f16_d64.fatbin
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t not flashmlir-opt --flashmlir-dispatch-attention-training=target=sm_80 %s 2>&1 | filecheck %s --check-prefix=NOTBUILT
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t not flashmlir-opt --flashmlir-dispatch-attention-training='target=cpu cpu-features=avx512f,avx512bw,avx512cd,avx512dq,avx512vl' %s 2>&1 | filecheck %s --check-prefix=CPU

// GQA (8 query heads on 2 K/V heads), causal, seq 100, default scale 1/8 (bits 0x3E000000 = 1040187392).
// Every kernel takes the constants (group, Sq, Sk, scale bits, causal, B·Hq = 16).
// The forward is the forward kernel's lse variant: grid (⌈100/128⌉, 2·8), O and lse [2, 8, 100] f32.
// CHECK-LABEL: func.func @train_gqa_causal
// CHECK:       hal.dispatch.extern "flashmlir_attention_fwd_sm80_f16_d64_lse"(%c4_i32, %c100_i32, %c100_i32{{[_0-9]*}}, %c1040187392_i32, %c1_i32, %c16_i32, %{{[^)]+}})
// CHECK-SAME:    -> (tensor<2x8x100x64xf16>, tensor<2x8x100xf32>)
// CHECK:         hal.return %c1, %c16, %c1{{.*}} : index, index, index
// CHECK:       workgroup_size = [128 : index, 1 : index, 1 : index], workgroup_local_memory = 81920>
// The backward: dq (Q, K, V, O, dO, lse → dQ, Δ) over (⌈100/64⌉, 2·8) blocks, then dkdv
// (Q, K, V, dO, lse, Δ → dK, dV) over (⌈100/64⌉, 2·2): Δ flows from the first to the second.
// CHECK:       %[[DQ:[0-9]+]]:2 = hal.dispatch.extern "flashmlir_attention_bwd_sm80_f16_d64_dq"(%c4_i32{{[_0-9]*}}, %{{[^,]+}}, %{{[^,]+}}, %c1040187392_i32{{[_0-9]*}}, %c1_i32{{[_0-9]*}}, %c16_i32{{[_0-9]*}}, %{{[^)]+}})
// CHECK-SAME:    -> (tensor<2x8x100x64xf16>, tensor<2x8x100xf32>)
// CHECK:         hal.return %c2, %c16, %c1 : index, index, index
// CHECK:       path = "{{.+}}/cuda/attention_bwd_sm80_f16_d64.fatbin"
// CHECK:       workgroup_local_memory = 49152>
// CHECK:       hal.dispatch.extern "flashmlir_attention_bwd_sm80_f16_d64_dkdv"({{.+}}, %[[DQ]]#1)
// CHECK-SAME:    -> (tensor<2x2x100x64xf16>, tensor<2x2x100x64xf16>)
// CHECK:         hal.return %c2, %c4, %c1 : index, index, index
// CHECK:       workgroup_local_memory = 50176>
// CHECK-NOT:   torch.operator
// CHECK:       return

// The persistent sm_90 forward (head dim 64: one consumer of 64 rows, 256 threads): 32 (head,
// query block) tiles, causal ones in pairs, 16 workgroups; it loads through TMA, so a third result
// is the workspace where they make their tensor maps (16 · 384 + 128 bytes).
// HOPPER-LABEL: func.func @train_gqa_causal
// HOPPER:       %[[FWD:.+]]:3 = hal.dispatch.extern "flashmlir_attention_fwd_sm90_f16_d64_lse"
// HOPPER-SAME:    -> (tensor<2x8x100x64xf16>, tensor<2x8x100xf32>, tensor<6272xi8>)
// HOPPER:         hal.return %c16, %c1, %c1{{.*}} : index, index, index
// HOPPER:       workgroup_size = [256 : index, 1 : index, 1 : index], workgroup_local_memory = 75216>
// HOPPER:       hal.dispatch.extern "flashmlir_attention_bwd_sm80_f16_d64_dq"
// HOPPER:       hal.dispatch.extern "flashmlir_attention_bwd_sm80_f16_d64_dkdv"

// The sm_90 backward: prep (O, dO, lse → lse₂, Δ over 128 padded rows, the zeroed fp32 dQ sum) on
// (⌈100/64⌉, 2·8) blocks of 256 threads; dkdv (Q, K, V, dO, lse₂, Δ, sum → the sum in place, dK, dV)
// on (⌈100/128⌉, 2·2) blocks of 384 threads, its sum operand written (the 7th binding); dq (the sum → dQ).
// HOPPERBWD-LABEL: func.func @train_gqa_causal
// HOPPERBWD:       hal.dispatch.extern "flashmlir_attention_fwd_sm90_f16_d64_lse"
// HOPPERBWD:       %[[PREP:[0-9]+]]:3 = hal.dispatch.extern "flashmlir_attention_bwd_sm90_f16_d64_prep"
// HOPPERBWD-SAME:    -> (tensor<2x8x128xf32>, tensor<2x8x128xf32>, tensor<2x8x128x64xf32>)
// HOPPERBWD:         hal.return %c2, %c16, %c1 : index, index, index
// HOPPERBWD:       workgroup_size = [256 : index, 1 : index, 1 : index], workgroup_local_memory = 0>
// HOPPERBWD:       %[[SUM:[0-9]+]]:3 = hal.dispatch.extern "flashmlir_attention_bwd_sm90_f16_d64_dkdv"({{.+}}, %[[PREP]]#0, %[[PREP]]#1, %[[PREP]]#2)
// HOPPERBWD-SAME:    -> (%[[PREP]]#2, tensor<2x2x100x64xf16>, tensor<2x2x100x64xf16>)
// HOPPERBWD:         hal.return %c1, %c4, %c1{{.*}} : index, index, index
// HOPPERBWD:       workgroup_size = [384 : index, 1 : index, 1 : index], workgroup_local_memory = 165960>
// HOPPERBWD:       hal.dispatch.extern "flashmlir_attention_bwd_sm90_f16_d64_dq"({{.+}}, %[[SUM]]#0)
// With TMA, dkdv's fourth result is its workspace: 4 maps a block over its (1, 4) grid + 128 bytes,
// and the shared memory holds the 4 maps while they are made.
// BWDTMA-LABEL: func.func @train_gqa_causal
// BWDTMA:       %[[SUM:[0-9]+]]:4 = hal.dispatch.extern "flashmlir_attention_bwd_sm90_f16_d64_dkdv"
// BWDTMA-SAME:    -> (%{{.+}}#2, tensor<2x2x100x64xf16>, tensor<2x2x100x64xf16>, tensor<2176xi8>)
// BWDTMA:       workgroup_size = [384 : index, 1 : index, 1 : index], workgroup_local_memory = 166472>
// BWDTMA:       hal.dispatch.extern "flashmlir_attention_bwd_sm90_f16_d64_dq"({{.+}}, %[[SUM]]#0)
// HOPPERBWD-SAME:    -> tensor<2x8x100x64xf16>
// HOPPERBWD-NOT:   torch.operator

// NOTBUILT: torch.operator {{.*}}microkernel attention_bwd_sm80_f16_d64 was not built
// CPU: torch.operator {{.*}}no CPU attention microkernel for f16 head dim 64 (have: f32 d32/64/128)
func.func @train_gqa_causal(%q: !torch.vtensor<[2,8,100,64],f16>, %k: !torch.vtensor<[2,2,100,64],f16>, %v: !torch.vtensor<[2,2,100,64],f16>, %do: !torch.vtensor<[2,8,100,64],f16>) -> (!torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>) {
  %true = torch.constant.bool true
  %none = torch.constant.none
  %0:2 = torch.operator "torch.flashmlir.attention_forward"(%q, %k, %v, %true, %none) : (!torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>, !torch.bool, !torch.none) -> (!torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,8,100],f32>)
  %1:3 = torch.operator "torch.flashmlir.attention_backward"(%do, %q, %k, %v, %0#0, %0#1, %true, %none) : (!torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>, !torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,8,100],f32>, !torch.bool, !torch.none) -> (!torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>)
  return %0#0, %1#0, %1#1, %1#2 : !torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,8,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>, !torch.vtensor<[2,2,100,64],f16>
}
