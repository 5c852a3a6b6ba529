// The dropout training pair on the CPU target: the functions' dropout twins (cpu_dropout.h), the
// int64 seed a memref<1xi64> after the inputs, ⌈p · 2¹⁶⌉ (index) and 1 / (1 − p) (f32) between
// causal and the workgroup id. CUDA: dispatch-attention-training-dropout.mlir.
// RUN: rm -rf %t && mkdir -p %t/cpu && cp %S/../../../runtime/microkernels/kernels.json %t/
// RUN: touch %t/cpu/attention_fwd_cpu_avx2.o %t/cpu/attention_bwd_cpu_avx2.o
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --flashmlir-dispatch-attention-training='target=cpu cpu-features=avx,avx2,fma,f16c,bmi1,bmi2,abm,movbe cpu-threads=2' %s | filecheck %s --check-prefix=CPU

// p = 0.1; 4 heads on 2 threads: the one-pass backward's twin.
// CPU:         func.func private @flashmlir_attention_fwd_cpu_f32_d64_lse_dropout(memref<25600xf32>, memref<12800xf32>, memref<12800xf32>, memref<1xi64>, memref<25600xf32>, memref<400xf32>, index, index, index, index, f32, index, index, f32, index, index)
// CPU:           %[[T:.+]] = arith.constant 6554 : index
// CPU:           %[[S:.+]] = arith.constant 1.11111{{[0-9]*}} : f32
// CPU:           call @flashmlir_attention_fwd_cpu_f32_d64_lse_dropout({{.+}}, %[[T]], %[[S]], %{{[^,]+}}, %{{[^)]+}})
// CPU:         func.func private @flashmlir_attention_bwd_cpu_f32_d64_fused_dropout(memref<25600xf32>, memref<12800xf32>, memref<12800xf32>, memref<25600xf32>, memref<25600xf32>, memref<400xf32>, memref<1xi64>, memref<25600xf32>, memref<400xf32>, memref<12800xf32>, memref<12800xf32>, index, index, index, index, f32, index, index, f32, index, index)
// CPU-LABEL:   func.func @train_dropout_f32
// CPU:           flow.dispatch @{{.+}}::@forward({{.+}}) : ({{.+}}, tensor<i64>) -> (tensor<1x4x100x64xf32>, tensor<1x4x100xf32>)
// CPU:           flow.dispatch @{{.+}}::@backward({{.+}}) : ({{.+}}, tensor<1x4x100xf32>, tensor<i64>) -> (tensor<1x4x100x64xf32>, tensor<1x4x100xf32>, tensor<1x2x100x64xf32>, tensor<1x2x100x64xf32>)
// CPU-NOT:       torch.operator
func.func @train_dropout_f32(%q: !torch.vtensor<[1,4,100,64],f32>, %k: !torch.vtensor<[1,2,100,64],f32>, %v: !torch.vtensor<[1,2,100,64],f32>, %do: !torch.vtensor<[1,4,100,64],f32>, %seed: !torch.vtensor<[],si64>) -> (!torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>) {
  %true = torch.constant.bool true
  %none = torch.constant.none
  %p = torch.constant.float 1.000000e-01
  %0:2 = torch.operator "torch.flashmlir.attention_forward_dropout"(%q, %k, %v, %p, %seed, %true, %none) : (!torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>, !torch.float, !torch.vtensor<[],si64>, !torch.bool, !torch.none) -> (!torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,4,100],f32>)
  %1:3 = torch.operator "torch.flashmlir.attention_backward_dropout"(%do, %q, %k, %v, %0#0, %0#1, %p, %seed, %true, %none) : (!torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>, !torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,4,100],f32>, !torch.float, !torch.vtensor<[],si64>, !torch.bool, !torch.none) -> (!torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>)
  return %0#0, %1#0, %1#1, %1#2 : !torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,4,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>, !torch.vtensor<[1,2,100,64],f32>
}
