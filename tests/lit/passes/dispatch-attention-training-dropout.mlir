// The dropout training pair: the kernels' dropout twins, with the int64 seed as one more input
// binding (before dkdv's tied accumulator on sm_90) and ⌈p · 2¹⁶⌉, 1 / (1 − p) after the
// constants (CUDA: push constants 7 and 8, the second an f32's bits). p = 0.1: 6554 and
// 1.1111112 (bits 1066285284). sm_90 regenerates the mask in dkdv only, sm_80 in both of its
// kernels; sm_70 has no twins: an error naming the kernel. The CPU: dispatch-attention-training-dropout-cpu.mlir.
// RUN: rm -rf %t && mkdir -p %t/cuda %t/cpu && cp %S/../../../runtime/microkernels/kernels.json %t/
// RUN: touch %t/cuda/attention_fwd_sm90_f16_d64.fatbin %t/cuda/attention_bwd_sm90_f16_d64.fatbin
// RUN: touch %t/cuda/attention_fwd_sm80_f16_d64.fatbin %t/cuda/attention_bwd_sm80_f16_d64.fatbin
// RUN: touch %t/cuda/attention_fwd_sm70_f16_d64.ptx
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --flashmlir-dispatch-attention-training=target=sm_90 %s | filecheck %s --check-prefix=HOPPER
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --flashmlir-dispatch-attention-training=target=sm_80 %s | filecheck %s --check-prefix=AMPERE
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t not flashmlir-opt --flashmlir-dispatch-attention-training=target=sm_70 %s 2>&1 | filecheck %s --check-prefix=VOLTA

// HOPPER-LABEL: func.func @train_dropout_f16
// HOPPER:         %[[T:.+]] = arith.constant 6554 : i32
// HOPPER:         %[[S:.+]] = arith.constant 1066285284 : i32
// HOPPER:         hal.dispatch.extern "flashmlir_attention_fwd_sm90_f16_d64_lse_dropout"({{.+}}, %[[T]], %[[S]], %{{[^,]+}}, %{{[^,]+}}, %{{[^,]+}}, %{{[^)]+}}) : (i32, i32, i32, i32, i32, i32, i32, i32, tensor<1x4x100x64xf16>, tensor<1x2x100x64xf16>, tensor<1x2x100x64xf16>, tensor<i64>) -> (tensor<1x4x100x64xf16>, tensor<1x4x100xf32>, tensor<{{[0-9]+}}xi8>)
// HOPPER:         hal.dispatch.extern "flashmlir_attention_bwd_sm90_f16_d64_prep"({{.+}}) : (i32, i32, i32, i32, i32, i32, tensor
// HOPPER:         %[[SUM:.+]]:3 = hal.dispatch.extern "flashmlir_attention_bwd_sm90_f16_d64_dkdv_dropout"({{.+}}, %{{[^,]+}}, %[[ACC:[^)]+]]) : (i32, i32, i32, i32, i32, i32, i32, i32, {{.+}}, tensor<i64>, tensor<1x4x128x64xf32>) -> (%[[ACC]], tensor<1x2x100x64xf16>, tensor<1x2x100x64xf16>)
// HOPPER:         hal.dispatch.extern "flashmlir_attention_bwd_sm90_f16_d64_dq"({{.+}}, %[[SUM]]#0)
// HOPPER-NOT:     torch.operator

// AMPERE-LABEL: func.func @train_dropout_f16
// AMPERE:         %[[T:.+]] = arith.constant 6554 : i32
// AMPERE:         %[[S:.+]] = arith.constant 1066285284 : i32
// AMPERE:         hal.dispatch.extern "flashmlir_attention_fwd_sm80_f16_d64_lse_dropout"({{.+}}, %[[T]], %[[S]], %{{[^,]+}}, %{{[^,]+}}, %{{[^,]+}}, %{{[^)]+}}) : (i32, i32, i32, i32, i32, i32, i32, i32, tensor<1x4x100x64xf16>, tensor<1x2x100x64xf16>, tensor<1x2x100x64xf16>, tensor<i64>) -> (tensor<1x4x100x64xf16>, tensor<1x4x100xf32>)
// AMPERE:         %[[DQ:.+]]:2 = hal.dispatch.extern "flashmlir_attention_bwd_sm80_f16_d64_dq_dropout"({{.+}}) : (i32, i32, i32, i32, i32, i32, i32, i32, {{.+}}, tensor<1x4x100xf32>, tensor<i64>) -> (tensor<1x4x100x64xf16>, tensor<1x4x100xf32>)
// AMPERE:         hal.dispatch.extern "flashmlir_attention_bwd_sm80_f16_d64_dkdv_dropout"({{.+}}, %[[DQ]]#1, %{{[^)]+}}) : (i32, i32, i32, i32, i32, i32, i32, i32, {{.+}}, tensor<1x4x100xf32>, tensor<i64>) -> (tensor<1x2x100x64xf16>, tensor<1x2x100x64xf16>)
// AMPERE-NOT:     torch.operator

// VOLTA: flashmlir_attention_fwd_sm70_f16_d64 has no dropout twin (the sm_90 and sm_80 kernels do)

func.func @train_dropout_f16(%q: !torch.vtensor<[1,4,100,64],f16>, %k: !torch.vtensor<[1,2,100,64],f16>, %v: !torch.vtensor<[1,2,100,64],f16>, %do: !torch.vtensor<[1,4,100,64],f16>, %seed: !torch.vtensor<[],si64>) -> (!torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>) {
  %true = torch.constant.bool true
  %none = torch.constant.none
  %p = torch.constant.float 1.000000e-01
  %0:2 = torch.operator "torch.flashmlir.attention_forward_dropout"(%q, %k, %v, %p, %seed, %true, %none) : (!torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>, !torch.float, !torch.vtensor<[],si64>, !torch.bool, !torch.none) -> (!torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,4,100],f32>)
  %1:3 = torch.operator "torch.flashmlir.attention_backward_dropout"(%do, %q, %k, %v, %0#0, %0#1, %p, %seed, %true, %none) : (!torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>, !torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,4,100],f32>, !torch.float, !torch.vtensor<[],si64>, !torch.bool, !torch.none) -> (!torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>)
  return %0#0, %1#0, %1#1, %1#2 : !torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,4,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>, !torch.vtensor<[1,2,100,64],f16>
}
