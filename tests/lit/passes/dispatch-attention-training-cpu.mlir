// The training ops on the CPU target: one executable linking the library's forward and backward
// objects (stand-ins here, with the real catalog), compiled for an AVX2 CPU with 2 threads whatever
// the host is, with 3 threads (SPLIT), and for an AVX-512 CPU (AVX512) (f16 on the CPU:
// dispatch-attention-training.mlir).
// RUN: rm -rf %t && mkdir -p %t/cpu && cp %S/../../../runtime/microkernels/kernels.json %t/
// RUN: touch %t/cpu/attention_fwd_cpu_avx512.o %t/cpu/attention_bwd_cpu_avx512.o %t/cpu/attention_fwd_cpu_avx2.o %t/cpu/attention_bwd_cpu_avx2.o
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --flashmlir-dispatch-attention-training='target=cpu cpu-features=avx,avx2,fma,f16c,bmi1,bmi2,abm,movbe cpu-threads=2' %s | filecheck %s
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --flashmlir-dispatch-attention-training='target=cpu cpu-features=avx,avx2,fma,f16c,bmi1,bmi2,abm,movbe cpu-threads=3' %s | filecheck %s --check-prefix=SPLIT
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --flashmlir-dispatch-attention-training='target=cpu cpu-features=avx512f,avx512bw,avx512cd,avx512dq,avx512vl cpu-threads=2' %s | filecheck %s --check-prefix=AVX512
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t not flashmlir-opt --flashmlir-dispatch-attention-training='target=cpu cpu-features=sse4_2,avx cpu-threads=2' %s 2>&1 | filecheck %s --check-prefix=NOSIMD
// RUN: rm %t/cpu/attention_bwd_cpu_avx512.o
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t not flashmlir-opt --flashmlir-dispatch-attention-training='target=cpu cpu-features=avx512f,avx512bw,avx512cd,avx512dq,avx512vl cpu-threads=2' %s 2>&1 | filecheck %s --check-prefix=NOTBUILT

// GQA (8 query heads on 2 K/V heads), causal, seq 100, head dim 32, default scale 1/√32.
// The forward calls the forward object's _lse function: Q, K, V, O, lse as memrefs, then group 4,
// B·Hq = 16, Sq, Sk, the scale, causal; ⌈100/32⌉·16 = 64 items (4 vectors of 8 rows) on 2 threads:
// 8 workgroups.
// CHECK:       #[[X86:.+]] = #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64">
// CHECK-LABEL: stream.executable private @flashmlir_attention_training_cpu_0
// CHECK-SAME:    path = "{{.+}}/cpu/attention_fwd_cpu_avx2.o"
// CHECK:         stream.executable.export public @forward
// CHECK:           %[[X:.+]] = arith.constant 8 : index
// CHECK:           stream.return %[[X]],
// CHECK:         func.func private @flashmlir_attention_fwd_cpu_f32_d32_lse(memref<51200xf32>, memref<12800xf32>, memref<12800xf32>, memref<51200xf32>, memref<1600xf32>, index, index, index, index, f32, index, index, index)
// CHECK:           %[[G:.+]] = arith.constant 4 : index
// CHECK:           %[[BH:.+]] = arith.constant 16 : index
// CHECK:           %[[SCALE:.+]] = arith.constant 0.176776{{[0-9]+}} : f32
// CHECK:           call @flashmlir_attention_fwd_cpu_f32_d32_lse({{.+}}, %[[G]], %[[BH]], %{{.+}}, %{{.+}}, %[[SCALE]], %{{.+}}, %{{.+}}, %{{.+}})
// The backward: B·Hkv = 4 heads share out evenly between 2 threads, so one pass (_fused: Δ, dQ,
// dK, dV from each dS tile) over a workgroup per head; its Δ result is left unused.
// CHECK-LABEL: stream.executable private @flashmlir_attention_training_cpu_1
// CHECK-SAME:    path = "{{.+}}/cpu/attention_bwd_cpu_avx2.o"
// CHECK:         stream.executable.export public @backward
// CHECK:           %[[X:.+]] = arith.constant 4 : index
// CHECK:           stream.return %[[X]],
// CHECK:         func.func private @flashmlir_attention_bwd_cpu_f32_d32_fused(memref<51200xf32>, memref<12800xf32>, memref<12800xf32>, memref<51200xf32>, memref<51200xf32>, memref<1600xf32>, memref<51200xf32>, memref<1600xf32>, memref<12800xf32>, memref<12800xf32>, index, index, index, index, f32, index, index, index)
// CHECK-LABEL: func.func @train_gqa_causal
// CHECK:         flow.dispatch @flashmlir_attention_training_cpu_0::@forward({{.+}}) : ({{.+}}) -> (tensor<2x8x100x32xf32>, tensor<2x8x100xf32>)
// CHECK:         flow.dispatch @flashmlir_attention_training_cpu_1::@backward({{.+}}) : ({{.+}}) -> (tensor<2x8x100x32xf32>, tensor<2x8x100xf32>, tensor<2x2x100x32xf32>, tensor<2x2x100x32xf32>)
// CHECK-NOT:     torch.operator
// CHECK:         return

// On 3 threads 4 heads would leave a third of the time idle: the split backward, with two exports,
// dq over ⌈100/16⌉·16 = 112 query items and dkdv over ⌈100/16⌉·4 = 28 key items (12 workgroups each).
// SPLIT-LABEL: stream.executable private @flashmlir_attention_training_cpu_1
// SPLIT:         stream.executable.export public @dq
// SPLIT:         stream.executable.export public @dkdv
// SPLIT:         func.func private @flashmlir_attention_bwd_cpu_f32_d32_dq(memref<51200xf32>, memref<12800xf32>, memref<12800xf32>, memref<51200xf32>, memref<51200xf32>, memref<1600xf32>, memref<51200xf32>, memref<1600xf32>, index, index, index, index, f32, index, index, index)
// SPLIT:         func.func private @flashmlir_attention_bwd_cpu_f32_d32_dkdv(memref<51200xf32>, memref<12800xf32>, memref<12800xf32>, memref<51200xf32>, memref<1600xf32>, memref<1600xf32>, memref<12800xf32>, memref<12800xf32>, index, index, index, index, f32, index, index, index)
// SPLIT-LABEL: func.func @train_gqa_causal
// SPLIT:         %[[DQ:.+]]:2 = flow.dispatch @flashmlir_attention_training_cpu_1::@dq({{.+}}) : ({{.+}}) -> (tensor<2x8x100x32xf32>, tensor<2x8x100xf32>)
// SPLIT:         flow.dispatch @flashmlir_attention_training_cpu_1::@dkdv({{.+}}, %[[DQ]]#1) : ({{.+}}) -> (tensor<2x2x100x32xf32>, tensor<2x2x100x32xf32>)

// The AVX-512 objects: the one-pass backward is not enabled for them (kernels.json "one_pass"), so
// the split even where the heads share out evenly.
// AVX512-LABEL: stream.executable private @flashmlir_attention_training_cpu_0
// AVX512-SAME:    path = "{{.+}}/cpu/attention_fwd_cpu_avx512.o"
// AVX512-LABEL: stream.executable private @flashmlir_attention_training_cpu_1
// AVX512-SAME:    path = "{{.+}}/cpu/attention_bwd_cpu_avx512.o"
// AVX512:         stream.executable.export public @dq
// AVX512:         stream.executable.export public @dkdv

// NOSIMD: torch.operator {{.*}}no CPU attention microkernel for this CPU (they need avx512bw+avx512cd+avx512dq+avx512f+avx512vl or abm+avx+avx2+bmi1+bmi2+f16c+fma+movbe)
// NOTBUILT: torch.operator {{.*}}CPU microkernel attention_bwd_cpu_avx512 was not built
func.func @train_gqa_causal(%q: !torch.vtensor<[2,8,100,32],f32>, %k: !torch.vtensor<[2,2,100,32],f32>, %v: !torch.vtensor<[2,2,100,32],f32>, %do: !torch.vtensor<[2,8,100,32],f32>) -> (!torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>) {
  %true = torch.constant.bool true
  %none = torch.constant.none
  %0:2 = torch.operator "torch.flashmlir.attention_forward"(%q, %k, %v, %true, %none) : (!torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>, !torch.bool, !torch.none) -> (!torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,8,100],f32>)
  %1:3 = torch.operator "torch.flashmlir.attention_backward"(%do, %q, %k, %v, %0#0, %0#1, %true, %none) : (!torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>, !torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,8,100],f32>, !torch.bool, !torch.none) -> (!torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>)
  return %0#0, %1#0, %1#1, %1#2 : !torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,8,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>, !torch.vtensor<[2,2,100,32],f32>
}

