// The CPU target, with the real catalog and stand-in objects, compiled for an AVX-512 CPU
// whatever the host is (cpu-features), for an AVX2 one (the same source, built for
// x86-64-v3, 8-lane vectors, so 24-row items) and for one with neither (NOSIMD):
// RUN: rm -rf %t && mkdir -p %t/cpu && cp %S/../../../runtime/microkernels/kernels.json %t/
// RUN: touch %t/cpu/attention_fwd_cpu_avx512.o %t/cpu/attention_fwd_cpu_avx2.o
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel='target=cpu cpu-features=avx2,fma,avx512f,avx512bw,avx512cd,avx512dq,avx512vl cpu-threads=2' %s | filecheck %s
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel='target=cpu cpu-features=avx2,fma,avx512f,avx512bw,avx512cd,avx512dq,avx512vl cpu-threads=2' --debug %s 2>&1 >/dev/null | filecheck %s --check-prefix=WHY
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel='target=cpu cpu-features=avx,avx2,fma,f16c,bmi1,bmi2,abm,movbe cpu-threads=2' %s | filecheck %s --check-prefix=AVX2
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel='target=cpu cpu-features=sse4_2,avx' --debug %s 2>&1 | filecheck %s --check-prefix=NOSIMD

// NOSIMD:     no CPU attention microkernel for this CPU (they need avx512bw+avx512cd+avx512dq+avx512f+avx512vl or abm+avx+avx2+bmi1+bmi2+f16c+fma+movbe)
// NOSIMD-NOT: flow.dispatch @

// AVX2-LABEL: stream.executable private @flashmlir_attention_cpu_0
// AVX2-SAME:    path = "{{.+}}/cpu/attention_fwd_cpu_avx2.o"
// AVX2:           %[[X:.+]] = arith.constant 8 : index
// AVX2:           stream.return %[[X]],
// AVX2:         call @flashmlir_attention_fwd_cpu_f32_d64(

// GQA, causal, f32, head dim 64: an executable that links the library object and whose shim calls
// the d64 function with the four bindings as memrefs, the constants (group 4, B·Hq = 16, Sq = Sk =
// 100, scale, causal), the workgroup id and the grid's size. 3 blocks of 48 rows × 16 heads = 48
// items, 4 workgroups for each of the 2 threads: a grid of (8, 1, 1). The op becomes a
// flow.dispatch of that executable; the causal mask producer is gone.
// CHECK:       #[[X86:.+]] = #hal.executable.target<"llvm-cpu", "embedded-elf-x86_64">
// CHECK-LABEL: stream.executable private @flashmlir_attention_cpu_0
// CHECK-SAME:    hal.executable.objects = #hal.executable.objects<{#[[X86]] = [#hal.executable.object<{path = "{{.+}}/cpu/attention_fwd_cpu_avx512.o"}>]}>
// CHECK:         stream.executable.export public @attention workgroups() -> (index, index, index)
// CHECK-DAG:       %[[X:.+]] = arith.constant 8 : index
// CHECK-DAG:       %[[ONE:.+]] = arith.constant 1 : index
// CHECK:           stream.return %[[X]], %[[ONE]], %[[ONE]] : index, index, index
// CHECK:         func.func private @flashmlir_attention_fwd_cpu_f32_d64(memref<102400xf32>, memref<25600xf32>, memref<25600xf32>, memref<102400xf32>, index, index, index, index, f32, index, index, index) attributes {hal.import.static}
// CHECK:         func.func @attention(%[[Q:.+]]: !stream.binding, %[[K:.+]]: !stream.binding, %[[V:.+]]: !stream.binding, %[[O:.+]]: !stream.binding)
// CHECK-DAG:       %[[QM:.+]] = stream.binding.subspan %[[Q]][%{{.+}}] : !stream.binding -> memref<102400xf32>
// CHECK-DAG:       %[[GROUP:.+]] = arith.constant 4 : index
// CHECK-DAG:       %[[BH:.+]] = arith.constant 16 : index
// CHECK-DAG:       %[[SEQ:.+]] = arith.constant 100 : index
// CHECK-DAG:       %[[SCALE:.+]] = arith.constant 1.250000e-01 : f32
// CHECK-DAG:       %[[CAUSAL:.+]] = arith.constant 1 : index
// CHECK-DAG:       %[[WG:.+]] = hal.interface.workgroup.id[0] : index
// CHECK-DAG:       %[[WGS:.+]] = arith.constant 8 : index
// CHECK:           call @flashmlir_attention_fwd_cpu_f32_d64(%[[QM]], %{{.+}}, %{{.+}}, %{{.+}}, %[[GROUP]], %[[BH]], %[[SEQ]], %{{.+}}, %[[SCALE]], %[[CAUSAL]], %[[WG]], %[[WGS]])
// CHECK-LABEL: func.func @gqa_causal_f32_d64
// CHECK-NOT:     linalg.generic
// CHECK:         %[[R:.+]] = flow.dispatch @flashmlir_attention_cpu_0::@attention(%arg0, %arg1, %arg2) : (tensor<2x2x4x100x64xf32>, tensor<2x2x100x64xf32>, tensor<2x2x100x64xf32>) -> tensor<2x2x4x100x64xf32>
// CHECK:         return %[[R]]
#q = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, g, m, k1)>
#k = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, k2, k1)>
#v = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, k2, n)>
#s = affine_map<(b, h, g, m, n, k1, k2) -> ()>
#mk = affine_map<(b, h, g, m, n, k1, k2) -> (m, k2)>
#o = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, g, m, n)>
#id = affine_map<(i, j) -> (i, j)>
func.func @gqa_causal_f32_d64(%q: tensor<2x2x4x100x64xf32>, %k: tensor<2x2x100x64xf32>, %v: tensor<2x2x100x64xf32>) -> tensor<2x2x4x100x64xf32> {
  %scale = arith.constant 0.125 : f32
  %em = tensor.empty() : tensor<100x100xf32>
  %mask = linalg.generic {indexing_maps = [#id], iterator_types = ["parallel", "parallel"]} outs(%em : tensor<100x100xf32>) {
  ^bb0(%out: f32):
    %zero = arith.constant 0.0 : f32
    %ninf = arith.constant 0xFF800000 : f32
    %i = linalg.index 0 : index
    %j = linalg.index 1 : index
    %c = arith.cmpi ule, %j, %i : index
    %r = arith.select %c, %zero, %ninf : f32
    linalg.yield %r : f32
  } -> tensor<100x100xf32>
  %e = tensor.empty() : tensor<2x2x4x100x64xf32>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #mk, #o]>
      ins(%q, %k, %v, %scale, %mask : tensor<2x2x4x100x64xf32>, tensor<2x2x100x64xf32>, tensor<2x2x100x64xf32>, f32, tensor<100x100xf32>)
      outs(%e : tensor<2x2x4x100x64xf32>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<2x2x4x100x64xf32>
  return %r : tensor<2x2x4x100x64xf32>
}
// -----

// Two sites in one function: two executables with their own symbols.
// CHECK-LABEL: stream.executable private @flashmlir_attention_cpu_0
// CHECK:         call @flashmlir_attention_fwd_cpu_f32_d32
// CHECK-LABEL: stream.executable private @flashmlir_attention_cpu_1
// CHECK:         call @flashmlir_attention_fwd_cpu_f32_d128
// CHECK-LABEL: func.func @two_sites
// CHECK:         flow.dispatch @flashmlir_attention_cpu_0::@attention
// CHECK:         flow.dispatch @flashmlir_attention_cpu_1::@attention
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @two_sites(%q: tensor<4x50x32xf32>, %k: tensor<4x70x32xf32>, %v: tensor<4x70x32xf32>, %q2: tensor<4x50x128xf32>) -> (tensor<4x50x32xf32>, tensor<4x50x128xf32>) {
  %scale = arith.constant 0.5 : f32
  %e = tensor.empty() : tensor<4x50x32xf32>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<4x50x32xf32>, tensor<4x70x32xf32>, tensor<4x70x32xf32>, f32)
      outs(%e : tensor<4x50x32xf32>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x50x32xf32>
  %e2 = tensor.empty() : tensor<4x50x128xf32>
  %r2 = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q2, %q2, %q2, %scale : tensor<4x50x128xf32>, tensor<4x50x128xf32>, tensor<4x50x128xf32>, f32)
      outs(%e2 : tensor<4x50x128xf32>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x50x128xf32>
  return %r, %r2 : tensor<4x50x32xf32>, tensor<4x50x128xf32>
}
// -----

// Half precision runs the f32 kernel: Q, K, V widened exactly before the dispatch, O rounded once
// after it.
// CHECK-LABEL: stream.executable private @flashmlir_attention_cpu_0
// CHECK:         call @flashmlir_attention_fwd_cpu_f32_d64({{.*}}memref<12800xf32>
// CHECK-LABEL: func.func @bf16_widened
// CHECK-COUNT-3: arith.extf {{.*}} : bf16 to f32
// CHECK:         flow.dispatch @flashmlir_attention_cpu_0::@attention({{.*}}) : (tensor<4x50x64xf32>, tensor<4x50x64xf32>, tensor<4x50x64xf32>) -> tensor<4x50x64xf32>
// CHECK:         arith.truncf {{.*}} : f32 to bf16
// CHECK:         return {{.*}} : tensor<4x50x64xbf16>
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @bf16_widened(%q: tensor<4x50x64xbf16>, %k: tensor<4x50x64xbf16>, %v: tensor<4x50x64xbf16>) -> tensor<4x50x64xbf16> {
  %scale = arith.constant 0.5 : f32
  %e = tensor.empty() : tensor<4x50x64xbf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<4x50x64xbf16>, tensor<4x50x64xbf16>, tensor<4x50x64xbf16>, f32)
      outs(%e : tensor<4x50x64xbf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x50x64xbf16>
  return %r : tensor<4x50x64xbf16>
}
// -----

// Refused on the CPU: head dims the library lacks.
// CHECK-LABEL: func.func @d16
// CHECK-NOT:     flow.dispatch @
// WHY:           declined iree_linalg_ext.attention {{.*}}no CPU attention microkernel for f32 head dim 16 (have: f32 d32/64/128)
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @d16(%q2: tensor<4x50x16xf32>) -> tensor<4x50x16xf32> {
  %scale = arith.constant 0.5 : f32
  %e2 = tensor.empty() : tensor<4x50x16xf32>
  %r2 = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q2, %q2, %q2, %scale : tensor<4x50x16xf32>, tensor<4x50x16xf32>, tensor<4x50x16xf32>, f32)
      outs(%e2 : tensor<4x50x16xf32>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x50x16xf32>
  return %r2 : tensor<4x50x16xf32>
}
