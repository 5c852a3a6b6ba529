// CUDA targets (the CPU target: dispatch-attention-microkernel-cpu.mlir).
// A library with the real catalog and stand-in objects (sm_80 bf16 d128 and sm_70 d64 deliberately
// missing):
// RUN: rm -rf %t && mkdir -p %t/cuda && cp %S/../../../runtime/microkernels/kernels.json %t/
// RUN: touch %t/cuda/attention_fwd_sm80_f16_d64.fatbin %t/cuda/attention_fwd_sm80_f16_d128.fatbin %t/cuda/attention_fwd_sm80_bf16_d64.fatbin
// RUN: touch %t/cuda/attention_fwd_sm70_f16_d128.ptx
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel=target=sm_80 %s | filecheck %s
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel=target=sm_90 %s | filecheck %s
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel=target=sm_80 --debug %s 2>&1 >/dev/null | filecheck %s --check-prefix=WHY
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel=target=sm_70 %s | filecheck %s --check-prefix=SM70
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel=target=sm_70 --debug %s 2>&1 >/dev/null | filecheck %s --check-prefix=VOLTADECLINE
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t/none flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel=target=sm_80 --debug %s 2>&1 >/dev/null | filecheck %s --check-prefix=NOLIB
// With the Hopper kernels built as well (the sm_90 run above had only sm_80 objects: it falls back to them):
// RUN: rm -rf %t90 && mkdir -p %t90/cuda && cp %t/kernels.json %t/cuda/* %t90/ 2>/dev/null; mv %t90/*.fatbin %t90/*.ptx %t90/cuda/
// RUN: touch %t90/cuda/attention_fwd_sm90_f16_d64.fatbin %t90/cuda/attention_fwd_sm90_f16_d128.fatbin %t90/cuda/attention_fwd_sm90_bf16_d64.fatbin
// RUN: touch %t90/cuda/attention_fwd_sm90_f16_d64_from2048.fatbin
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t90 flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel=target=sm_90 %s | filecheck %s --check-prefix=HOPPER
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t90 flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel=target=sm_90 --debug %s 2>&1 >/dev/null | filecheck %s --check-prefix=HOPPERWHY
// RUN: env FLASHMLIR_MICROKERNEL_DIR=%t90 flashmlir-opt --split-input-file --flashmlir-dispatch-attention-microkernel=target=sm_80 %s | filecheck %s

// sm_90: the warp-specialized kernel: 3 warpgroups (384 threads), persistent up to 4k rows:
// ⌈1000/128⌉ · B·H = 256 (head, query block) tiles over one workgroup per SM, so the grid is
// (132, 1, 1) for the sm_90 flagship (H100 SXM) and the kernel gets B·H = 32 as its sixth constant
// shared memory Q + 2 stages × (K, V) of 128 keys + 10 mbarriers + 1024 bytes of alignment, and at
// head dim 128 (below 2048 tokens) a 64-row O tile a consumer for the copy engine to write out and 4
// tensor maps (Q, K, V, O; 3 at head dim 64). Head dim 64 below 2048 tokens has one consumer of 64
// rows (2 warpgroups, 256 threads; two workgroups an SM, so its persistent grid could take 264):
// causal_f16_d64 has ⌈100/64⌉ · 4 = 8 tiles, causal ones in pairs, 4 workgroups. The kernel loads through TMA (catalog `tma`): a second result, the maps of each
// workgroup + 128 bytes (132 · 512 + 128), is the workspace where they are made, a fifth
// binding; only O is used.
// HOPPER:       #[[LAYOUT:.+]] = #hal.pipeline.layout<constants = 6, bindings = [#hal.pipeline.binding<storage_buffer, ReadOnly>, #hal.pipeline.binding<storage_buffer, ReadOnly>, #hal.pipeline.binding<storage_buffer, ReadOnly>, #hal.pipeline.binding<storage_buffer>, #hal.pipeline.binding<storage_buffer>]>
// HOPPER-LABEL: func.func @mha_f16_d128
// HOPPER:         %[[O:.+]]:2 = hal.dispatch.extern "flashmlir_attention_fwd_sm90_f16_d128"(%c1_i32, %c1000_i32, %c1000_i32_0, %{{.+}}, %c0_i32, %c32_i32, %arg0, %arg1, %arg2)
// HOPPER-SAME:      -> (tensor<2x16x1000x128xf16>, tensor<67712xi8>)
// HOPPER-DAG:       %[[X:.+]] = arith.constant 132 : index
// HOPPER-DAG:       %[[Y:.+]] = arith.constant 1 : index
// HOPPER:           hal.return %[[X]], %[[Y]], %{{.+}} : index, index, index
// HOPPER:         } layout(#[[LAYOUT]]) objects({
// HOPPER:           ordinal(0) = [#hal.executable.object<{path = "{{.+}}/cuda/attention_fwd_sm90_f16_d128.fatbin"}>]
// HOPPER-NEXT:    }) <workgroup_size = [384 : index, 1 : index, 1 : index], workgroup_local_memory = 198224>
// HOPPER:         return %[[O]]#0
// HOPPER-LABEL: func.func @causal_f16_d64
// HOPPER:         hal.dispatch.extern "flashmlir_attention_fwd_sm90_f16_d64"(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %c1_i32{{(_[0-9]+)?}}, %c4_i32{{(_[0-9]+)?}}, %arg0, %arg1, %arg2)
// HOPPER-DAG:       %[[X:.+]] = arith.constant 4 : index
// HOPPER-DAG:       %[[Y:.+]] = arith.constant 1 : index
// HOPPER:           hal.return %[[X]], %[[Y]], %{{.+}} : index, index, index
// HOPPER:         workgroup_size = [256 : index, 1 : index, 1 : index], workgroup_local_memory = 75216>
// HOPPER-LABEL: func.func @gqa_bf16_d64
// HOPPER:         hal.dispatch.extern "flashmlir_attention_fwd_sm90_bf16_d64"(%c4_i32,
// HOPPER-LABEL: func.func @padding_mask
// HOPPER-NOT:     hal.dispatch.extern
// HOPPERWHY:      declined iree_linalg_ext.attention {{.*}}an explicit mask
// HOPPERWHY:      declined iree_linalg_ext.attention {{.*}}microkernel flashmlir_attention_fwd_sm90_bf16_d128 was not built
// HOPPERWHY:      declined iree_linalg_ext.attention {{.*}}no sm_90 attention microkernel for f32 head dim 64 (have: bf16 d64, bf16 d128, bf16 d256, f16 d64, f16 d128, f16 d256)
// HOPPERWHY:      declined iree_linalg_ext.attention {{.*}}no sm_90 attention microkernel for f16 head dim 96

// sm_70 (Volta): f16 head dim 128 takes the Volta kernel, whose image is compute_70 PTX; its grid is
// (⌈1000/64⌉, B·H) = (16, 32) and its shared memory Q, K, V plus per-warp S, P and row factors.
// SM70-LABEL:  func.func @mha_f16_d128
// SM70:          hal.dispatch.extern "flashmlir_attention_fwd_sm70_f16_d128"
// SM70-DAG:        arith.constant 16 : index
// SM70-DAG:        arith.constant 32 : index
// SM70:            ordinal(0) = [#hal.executable.object<{path = "{{.+}}/cuda/attention_fwd_sm70_f16_d128.ptx"}>]
// SM70-NEXT:     }) <workgroup_size = [128 : index, 1 : index, 1 : index], workgroup_local_memory = 79104>
// SM70-LABEL:  func.func @causal_f16_d64
// SM70-NOT:      hal.dispatch.extern
// VOLTADECLINE:     declined iree_linalg_ext.attention {{.*}}microkernel flashmlir_attention_fwd_sm70_f16_d64 was not built ({{.+}}/cuda/attention_fwd_sm70_f16_d64.ptx is missing: Volta code is built by NVRTC 12
// VOLTADECLINE:     declined iree_linalg_ext.attention {{.*}}no sm_70 attention microkernel for bf16 head dim 64 (have: f16 d64, f16 d128)
// NOLIB:        the microkernel library is not installed

// Multi-head f16, head dim 128, Sq = Sk = 1000: one launch of the d128 kernel, grid
// (⌈1000/128⌉, B·H) = (8, 32), 4 warps, Q + 2 × (K, V) tiles of shared memory; the constants
// are (group, Sq, Sk, scale bits, causal, B·H).
// CHECK-LABEL: func.func @mha_f16_d128
// CHECK:         %[[SCALE:.+]] = arith.constant 0.0883883461 : f32
// CHECK:         %[[BITS:.+]] = arith.bitcast %[[SCALE]] : f32 to i32
// CHECK:         %[[O:.+]] = hal.dispatch.extern "flashmlir_attention_fwd_sm80_f16_d128"(%c1_i32, %c1000_i32, %c1000_i32_0, %[[BITS]], %c0_i32, %c32_i32, %arg0, %arg1, %arg2)
// CHECK-SAME:      -> tensor<2x16x1000x128xf16> count(
// CHECK-DAG:       %[[X:.+]] = arith.constant 8 : index
// CHECK-DAG:       %[[Y:.+]] = arith.constant 32 : index
// CHECK:           hal.return %[[X]], %[[Y]], %{{.+}} : index, index, index
// CHECK:         } layout(#{{.+}}) objects({
// CHECK-NEXT:      ordinal(0) = [#hal.executable.object<{path = "{{.+}}/cuda/attention_fwd_sm80_f16_d128.fatbin"}>]
// CHECK-NEXT:    }) <workgroup_size = [128 : index, 1 : index, 1 : index], workgroup_local_memory = 98304>
// CHECK-NOT:     iree_linalg_ext.attention
// CHECK:         return %[[O]]
#q = affine_map<(b, h, m, n, k1, k2) -> (b, h, m, k1)>
#k = affine_map<(b, h, m, n, k1, k2) -> (b, h, k2, k1)>
#v = affine_map<(b, h, m, n, k1, k2) -> (b, h, k2, n)>
#s = affine_map<(b, h, m, n, k1, k2) -> ()>
#o = affine_map<(b, h, m, n, k1, k2) -> (b, h, m, n)>
func.func @mha_f16_d128(%q: tensor<2x16x1000x128xf16>, %k: tensor<2x16x1000x128xf16>, %v: tensor<2x16x1000x128xf16>) -> tensor<2x16x1000x128xf16> {
  %scale = arith.constant 0.08838834764831845 : f32
  %e = tensor.empty() : tensor<2x16x1000x128xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<2x16x1000x128xf16>, tensor<2x16x1000x128xf16>, tensor<2x16x1000x128xf16>, f32)
      outs(%e : tensor<2x16x1000x128xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<2x16x1000x128xf16>
  return %r : tensor<2x16x1000x128xf16>
}
// -----

// The causal mask flashmlir-lower-attention writes (select(k2 <= m, 0, -inf)) becomes the
// kernel's causal flag; its N×N producer is gone. Sq = 100: one 128-row block per head.
// CHECK-LABEL: func.func @causal_f16_d64
// CHECK-NOT:     linalg.generic
// CHECK:         hal.dispatch.extern "flashmlir_attention_fwd_sm80_f16_d64"(%{{.+}}, %{{.+}}, %{{.+}}, %{{.+}}, %c1_i32{{(_[0-9]+)?}}, %c4_i32{{(_[0-9]+)?}}, %arg0, %arg1, %arg2)
// CHECK-DAG:       arith.constant 1 : index
// CHECK-DAG:       arith.constant 4 : index
// CHECK:         workgroup_local_memory = 81920>
// CHECK-NOT:     linalg.generic
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#mk = affine_map<(b, m, n, k1, k2) -> (m, k2)>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
#id = affine_map<(i, j) -> (i, j)>
func.func @causal_f16_d64(%q: tensor<4x100x64xf16>, %k: tensor<4x100x64xf16>, %v: tensor<4x100x64xf16>) -> tensor<4x100x64xf16> {
  %scale = arith.constant 0.125 : f32
  %em = tensor.empty() : tensor<100x100xf16>
  %mask = linalg.generic {indexing_maps = [#id], iterator_types = ["parallel", "parallel"]} outs(%em : tensor<100x100xf16>) {
  ^bb0(%out: f16):
    %zero = arith.constant 0.0 : f16
    %ninf = arith.constant 0xFC00 : f16
    %i = linalg.index 0 : index
    %j = linalg.index 1 : index
    %c = arith.cmpi ule, %j, %i : index
    %r = arith.select %c, %zero, %ninf : f16
    linalg.yield %r : f16
  } -> tensor<100x100xf16>
  %e = tensor.empty() : tensor<4x100x64xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #mk, #o]>
      ins(%q, %k, %v, %scale, %mask : tensor<4x100x64xf16>, tensor<4x100x64xf16>, tensor<4x100x64xf16>, f32, tensor<100x100xf16>)
      outs(%e : tensor<4x100x64xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x100x64xf16>
  return %r : tensor<4x100x64xf16>
}
// -----

// GQA in the 7-d form: K and V lack the group dim, so 4 consecutive query heads share one K/V
// head (group = 4); the grid's y is B·Hkv·G = 16.
// CHECK-LABEL: func.func @gqa_bf16_d64
// CHECK:         hal.dispatch.extern "flashmlir_attention_fwd_sm80_bf16_d64"(%c4_i32,
// CHECK-SAME:      (i32, i32, i32, i32, i32, i32, tensor<2x2x4x256x64xbf16>, tensor<2x2x256x64xbf16>, tensor<2x2x256x64xbf16>) -> tensor<2x2x4x256x64xbf16>
// CHECK-DAG:       arith.constant 2 : index
// CHECK-DAG:       arith.constant 16 : index
#q = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, g, m, k1)>
#k = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, k2, k1)>
#v = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, k2, n)>
#s = affine_map<(b, h, g, m, n, k1, k2) -> ()>
#o = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, g, m, n)>
func.func @gqa_bf16_d64(%q: tensor<2x2x4x256x64xbf16>, %k: tensor<2x2x256x64xbf16>, %v: tensor<2x2x256x64xbf16>) -> tensor<2x2x4x256x64xbf16> {
  %scale = arith.constant 0.125 : f32
  %e = tensor.empty() : tensor<2x2x4x256x64xbf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<2x2x4x256x64xbf16>, tensor<2x2x256x64xbf16>, tensor<2x2x256x64xbf16>, f32)
      outs(%e : tensor<2x2x4x256x64xbf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<2x2x4x256x64xbf16>
  return %r : tensor<2x2x4x256x64xbf16>
}
// -----

// Refused, each with its reason; the op stays for the passes after this one.
// CHECK-LABEL: func.func @padding_mask
// CHECK-NOT:     hal.dispatch.extern
// CHECK:         iree_linalg_ext.attention
// WHY:           declined iree_linalg_ext.attention {{.*}}an explicit mask (the attention microkernels take no mask or the causal one)
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#mk = affine_map<(b, m, n, k1, k2) -> (b, k2)>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @padding_mask(%q: tensor<4x100x64xf16>, %k: tensor<4x100x64xf16>, %v: tensor<4x100x64xf16>, %m: tensor<4x100xf16>) -> tensor<4x100x64xf16> {
  %scale = arith.constant 0.125 : f32
  %e = tensor.empty() : tensor<4x100x64xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #mk, #o]>
      ins(%q, %k, %v, %scale, %m : tensor<4x100x64xf16>, tensor<4x100x64xf16>, tensor<4x100x64xf16>, f32, tensor<4x100xf16>)
      outs(%e : tensor<4x100x64xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x100x64xf16>
  return %r : tensor<4x100x64xf16>
}
// -----

// CHECK-LABEL: func.func @bf16_d128_not_built
// CHECK-NOT:     hal.dispatch.extern
// WHY:           declined iree_linalg_ext.attention {{.*}}microkernel flashmlir_attention_fwd_sm80_bf16_d128 was not built ({{.+}} is missing: nvcc was not found when flashmlir was installed
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @bf16_d128_not_built(%q: tensor<4x100x128xbf16>, %k: tensor<4x100x128xbf16>, %v: tensor<4x100x128xbf16>) -> tensor<4x100x128xbf16> {
  %scale = arith.constant 0.125 : f32
  %e = tensor.empty() : tensor<4x100x128xbf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<4x100x128xbf16>, tensor<4x100x128xbf16>, tensor<4x100x128xbf16>, f32)
      outs(%e : tensor<4x100x128xbf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x100x128xbf16>
  return %r : tensor<4x100x128xbf16>
}
// -----

// CHECK-LABEL: func.func @f32
// CHECK-NOT:     hal.dispatch.extern
// WHY:           declined iree_linalg_ext.attention {{.*}}no sm_80 attention microkernel for f32 head dim 64 (have: bf16 d64, bf16 d128, bf16 d256, f16 d64, f16 d128, f16 d256)
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @f32(%q: tensor<4x100x64xf32>, %k: tensor<4x100x64xf32>, %v: tensor<4x100x64xf32>) -> tensor<4x100x64xf32> {
  %scale = arith.constant 0.125 : f32
  %e = tensor.empty() : tensor<4x100x64xf32>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<4x100x64xf32>, tensor<4x100x64xf32>, tensor<4x100x64xf32>, f32)
      outs(%e : tensor<4x100x64xf32>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x100x64xf32>
  return %r : tensor<4x100x64xf32>
}
// -----

// CHECK-LABEL: func.func @head_dim_96
// CHECK-NOT:     hal.dispatch.extern
// WHY:           declined iree_linalg_ext.attention {{.*}}no sm_80 attention microkernel for f16 head dim 96
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @head_dim_96(%q: tensor<4x100x96xf16>, %k: tensor<4x100x96xf16>, %v: tensor<4x100x96xf16>) -> tensor<4x100x96xf16> {
  %scale = arith.constant 0.0625 : f32
  %e = tensor.empty() : tensor<4x100x96xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<4x100x96xf16>, tensor<4x100x96xf16>, tensor<4x100x96xf16>, f32)
      outs(%e : tensor<4x100x96xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x100x96xf16>
  return %r : tensor<4x100x96xf16>
}
// -----

// CHECK-LABEL: func.func @negative_scale
// CHECK-NOT:     hal.dispatch.extern
// WHY:           declined iree_linalg_ext.attention {{.*}}scale -0.125: the CUDA kernel needs a positive scale
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @negative_scale(%q: tensor<4x100x64xf16>, %k: tensor<4x100x64xf16>, %v: tensor<4x100x64xf16>) -> tensor<4x100x64xf16> {
  %scale = arith.constant -0.125 : f32
  %e = tensor.empty() : tensor<4x100x64xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<4x100x64xf16>, tensor<4x100x64xf16>, tensor<4x100x64xf16>, f32)
      outs(%e : tensor<4x100x64xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x100x64xf16>
  return %r : tensor<4x100x64xf16>
}

// -----

// A module compiled for a known device carries its SM count (compiler/pipeline.py): the persistent
// sm_90 grid follows it (an H100 PCIe has 114 SMs), the sm_80 and sm_70 ones do not depend on it.
// HOPPER-LABEL: func.func @device_with_114_sms
// HOPPER:         hal.dispatch.extern "flashmlir_attention_fwd_sm90_f16_d128"
// HOPPER-DAG:       %[[X:.+]] = arith.constant 114 : index
// HOPPER-DAG:       %[[Y:.+]] = arith.constant 1 : index
// HOPPER:           hal.return %[[X]], %[[Y]], %{{.+}} : index, index, index
// SM70-LABEL:  func.func @device_with_114_sms
// CHECK-LABEL: func.func @device_with_114_sms
// CHECK:         hal.dispatch.extern "flashmlir_attention_fwd_sm80_f16_d128"
// CHECK-DAG:       %[[X:.+]] = arith.constant 8 : index
// CHECK-DAG:       %[[Y:.+]] = arith.constant 32 : index
// CHECK:           hal.return %[[X]], %[[Y]], %{{.+}} : index, index, index
#q = affine_map<(b, h, m, n, k1, k2) -> (b, h, m, k1)>
#k = affine_map<(b, h, m, n, k1, k2) -> (b, h, k2, k1)>
#v = affine_map<(b, h, m, n, k1, k2) -> (b, h, k2, n)>
#s = affine_map<(b, h, m, n, k1, k2) -> ()>
#o = affine_map<(b, h, m, n, k1, k2) -> (b, h, m, n)>
module attributes {flashmlir.gpu_multiprocessors = 114 : i32} {
func.func @device_with_114_sms(%q: tensor<2x16x1000x128xf16>, %k: tensor<2x16x1000x128xf16>, %v: tensor<2x16x1000x128xf16>) -> tensor<2x16x1000x128xf16> {
  %scale = arith.constant 0.08838834764831845 : f32
  %e = tensor.empty() : tensor<2x16x1000x128xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<2x16x1000x128xf16>, tensor<2x16x1000x128xf16>, tensor<2x16x1000x128xf16>, f32)
      outs(%e : tensor<2x16x1000x128xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<2x16x1000x128xf16>
  return %r : tensor<2x16x1000x128xf16>
}
}
// -----

// Long sequences at head dim 64 take the catalog's tiling for them (min_seq 2048): three consumer
// warpgroups (512 threads), 192 query rows a block, 96 keys a stage; ⌈4096/192⌉ · B·H = 88 tiles on
// 88 workgroups; shared memory Q + 2 stages × (K, V) of 96 keys + 3 tensor maps + 10 mbarriers + 1024 bytes. A key
// length under 2048, or (bf16 here) a long tiling that was not built, keeps the default one (one
// consumer, 256 threads, whose shared memory comes to the same 75216 bytes).
// HOPPER-LABEL: func.func @long_f16_d64
// HOPPER:         hal.dispatch.extern "flashmlir_attention_fwd_sm90_f16_d64_from2048"(%c1_i32, %c4096_i32, %c4096_i32_0,
// HOPPER-DAG:       %[[X:.+]] = arith.constant 88 : index
// HOPPER:           hal.return %[[X]], %{{.+}}, %{{.+}} : index, index, index
// HOPPER:           ordinal(0) = [#hal.executable.object<{path = "{{.+}}/cuda/attention_fwd_sm90_f16_d64_from2048.fatbin"}>]
// HOPPER-NEXT:    }) <workgroup_size = [512 : index, 1 : index, 1 : index], workgroup_local_memory = 75216>
// HOPPER-LABEL: func.func @long_queries_short_keys_f16_d64
// HOPPER:         hal.dispatch.extern "flashmlir_attention_fwd_sm90_f16_d64"(%c1_i32, %c4096_i32, %c2000_i32,
// HOPPER:         workgroup_size = [256 : index, 1 : index, 1 : index], workgroup_local_memory = 75216>
// HOPPER-LABEL: func.func @long_bf16_d64
// HOPPER:         hal.dispatch.extern "flashmlir_attention_fwd_sm90_bf16_d64"(%c1_i32, %c4096_i32, %c4096_i32_0,
// HOPPER:         workgroup_size = [256 : index, 1 : index, 1 : index], workgroup_local_memory = 75216>
// CHECK-LABEL: func.func @long_f16_d64
// CHECK:         hal.dispatch.extern "flashmlir_attention_fwd_sm80_f16_d64"
#q = affine_map<(b, h, m, n, k1, k2) -> (b, h, m, k1)>
#k = affine_map<(b, h, m, n, k1, k2) -> (b, h, k2, k1)>
#v = affine_map<(b, h, m, n, k1, k2) -> (b, h, k2, n)>
#s = affine_map<(b, h, m, n, k1, k2) -> ()>
#o = affine_map<(b, h, m, n, k1, k2) -> (b, h, m, n)>
func.func @long_f16_d64(%q: tensor<1x4x4096x64xf16>, %k: tensor<1x4x4096x64xf16>, %v: tensor<1x4x4096x64xf16>) -> tensor<1x4x4096x64xf16> {
  %scale = arith.constant 0.125 : f32
  %e = tensor.empty() : tensor<1x4x4096x64xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<1x4x4096x64xf16>, tensor<1x4x4096x64xf16>, tensor<1x4x4096x64xf16>, f32)
      outs(%e : tensor<1x4x4096x64xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<1x4x4096x64xf16>
  return %r : tensor<1x4x4096x64xf16>
}
func.func @long_queries_short_keys_f16_d64(%q: tensor<1x4x4096x64xf16>, %k: tensor<1x4x2000x64xf16>, %v: tensor<1x4x2000x64xf16>) -> tensor<1x4x4096x64xf16> {
  %scale = arith.constant 0.125 : f32
  %e = tensor.empty() : tensor<1x4x4096x64xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<1x4x4096x64xf16>, tensor<1x4x2000x64xf16>, tensor<1x4x2000x64xf16>, f32)
      outs(%e : tensor<1x4x4096x64xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<1x4x4096x64xf16>
  return %r : tensor<1x4x4096x64xf16>
}
func.func @long_bf16_d64(%q: tensor<1x4x4096x64xbf16>, %k: tensor<1x4x4096x64xbf16>, %v: tensor<1x4x4096x64xbf16>) -> tensor<1x4x4096x64xbf16> {
  %scale = arith.constant 0.125 : f32
  %e = tensor.empty() : tensor<1x4x4096x64xbf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<1x4x4096x64xbf16>, tensor<1x4x4096x64xbf16>, tensor<1x4x4096x64xbf16>, f32)
      outs(%e : tensor<1x4x4096x64xbf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<1x4x4096x64xbf16>
  return %r : tensor<1x4x4096x64xbf16>
}
// -----

// Causal problems take the long tiling later (min_seq_causal 3072: a causal query block's work is
// shorter and uneven): at 2560 tokens the default one.
// HOPPER-LABEL: func.func @causal_2560_f16_d64
// HOPPER:         hal.dispatch.extern "flashmlir_attention_fwd_sm90_f16_d64"(%c1_i32, %c2560_i32, %c2560_i32_0,
// HOPPER:         workgroup_size = [256 : index, 1 : index, 1 : index], workgroup_local_memory = 75216>
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#mk = affine_map<(b, m, n, k1, k2) -> (m, k2)>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
#id = affine_map<(i, j) -> (i, j)>
func.func @causal_2560_f16_d64(%q: tensor<4x2560x64xf16>, %k: tensor<4x2560x64xf16>, %v: tensor<4x2560x64xf16>) -> tensor<4x2560x64xf16> {
  %scale = arith.constant 0.125 : f32
  %em = tensor.empty() : tensor<2560x2560xf16>
  %mask = linalg.generic {indexing_maps = [#id], iterator_types = ["parallel", "parallel"]} outs(%em : tensor<2560x2560xf16>) {
  ^bb0(%out: f16):
    %zero = arith.constant 0.0 : f16
    %ninf = arith.constant 0xFC00 : f16
    %i = linalg.index 0 : index
    %j = linalg.index 1 : index
    %c = arith.cmpi ule, %j, %i : index
    %r = arith.select %c, %zero, %ninf : f16
    linalg.yield %r : f16
  } -> tensor<2560x2560xf16>
  %e = tensor.empty() : tensor<4x2560x64xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #mk, #o]>
      ins(%q, %k, %v, %scale, %mask : tensor<4x2560x64xf16>, tensor<4x2560x64xf16>, tensor<4x2560x64xf16>, f32, tensor<2560x2560xf16>)
      outs(%e : tensor<4x2560x64xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x2560x64xf16>
  return %r : tensor<4x2560x64xf16>
}
