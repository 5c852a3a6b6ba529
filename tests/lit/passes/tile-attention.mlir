// RUN: flashmlir-opt --split-input-file --flashmlir-tile-attention="target=cpu max-vector-bytes=32768" %s | filecheck %s
// RUN: flashmlir-opt --split-input-file --flashmlir-tile-attention='q-block=32 kv-block=32' %s | filecheck %s --check-prefix=B32
// RUN: flashmlir-opt --split-input-file --flashmlir-tile-attention="target=cpu max-vector-bytes=16384" %s | filecheck %s --check-prefix=AVX2
// RUN: flashmlir-opt --split-input-file --flashmlir-tile-attention --debug %s 2>&1 >/dev/null | filecheck %s --check-prefix=WHY

// Attention over [B*H, S, D] (the layout IREE's SDPA import produces): one dispatch over
// (Q blocks, batch); in it a KV loop carrying acc / running max / running sum through
// online_attention tiles that hold the CPU's vector tile sizes; then acc / sum.
// CHECK-LABEL: func.func @mha_3d
// CHECK-DAG:     %[[NQB:.+]] = arith.constant 2 : index
// CHECK-DAG:     %[[NB:.+]] = arith.constant 8 : index
// CHECK:         flow.dispatch.workgroups[%[[NQB]], %[[NB]]]
// CHECK-SAME:      -> tensor<8x128x64xf32>
// CHECK:           %[[WX:.+]] = flow.dispatch.workgroup.id[0] : index
// CHECK:           %[[Q0:.+]] = arith.muli %[[WX]], %{{.+}} : index
// CHECK:           %[[QT:.+]] = iree_tensor_ext.dispatch.tensor.load %{{.+}}, offsets = [%{{.+}}, %[[Q0]], 0], sizes = [1, 64, 64]
// CHECK:           %[[MAX0:.+]] = linalg.fill ins(%{{.+}} : f32) outs(%{{.+}} : tensor<1x64xf32>)
// CHECK:           %[[R:.+]]:3 = scf.for %[[KB:.+]] = %{{.+}} to %{{.+}} step %{{.+}} iter_args(%[[ACC:.+]] = %{{.+}}, %[[MX:.+]] = %[[MAX0]], %[[SUM:.+]] = %{{.+}})
// CHECK:             %[[KT:.+]] = iree_tensor_ext.dispatch.tensor.load %{{.+}} sizes = [1, 64, 64]
// CHECK:             %[[VT:.+]] = iree_tensor_ext.dispatch.tensor.load %{{.+}} sizes = [1, 64, 64]
// CHECK-NOT:         linalg.generic
// CHECK:             %[[O:.+]]:3 = iree_linalg_ext.online_attention {{.*}}compilation_info = #{{.+}}}
// CHECK-SAME:          ins(%[[QT]], %[[KT]], %[[VT]], %{{.+}} : {{.+}}) outs(%[[ACC]], %[[MX]], %[[SUM]] :
// CHECK:             scf.yield %[[O]]#0, %[[O]]#1, %[[O]]#2
// CHECK:           linalg.generic {{.+}} ins(%[[R]]#0, %[[R]]#2 :
// CHECK:             arith.divf
// CHECK:           iree_tensor_ext.dispatch.tensor.store %{{.+}}, offsets = [%{{.+}}, %[[Q0]], 0], sizes = [1, 64, 64]
// CHECK-NOT:     iree_linalg_ext.attention
// An AVX2 host's IREE takes vectors under 16 KB (512 of its 32-byte vectors): the final acc / sum
// of a 64-row block of head dim 64 would be exactly 16 KB, so blocks of 32 rows, and the Q·Kᵀ
// vector step over keys halves to 8 (4 × 8 × 64 f32 = 8 KB).
// AVX2:         #iree_cpu.lowering_config<{{.*}}vector_common_parallel = [1, 4, 64, 0, 0], vector_reduction = [0, 0, 0, 0, 8]>
// AVX2-LABEL:   func.func @mha_3d
// AVX2:           %[[NQB:.+]] = arith.constant 4 : index
// AVX2:           flow.dispatch.workgroups[%[[NQB]],
// AVX2:             iree_tensor_ext.dispatch.tensor.load %{{.+}}, offsets = [%{{.+}}, %{{.+}}, 0], sizes = [1, 32, 64]
// B32-LABEL:   func.func @mha_3d
// B32:           %[[NQB:.+]] = arith.constant 4 : index
// B32:           flow.dispatch.workgroups[%[[NQB]],
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @mha_3d(%q: tensor<8x128x64xf32>, %k: tensor<8x128x64xf32>, %v: tensor<8x128x64xf32>) -> tensor<8x128x64xf32> {
  %scale = arith.constant 0.125 : f32
  %e = tensor.empty() : tensor<8x128x64xf32>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<8x128x64xf32>, tensor<8x128x64xf32>, tensor<8x128x64xf32>, f32)
      outs(%e : tensor<8x128x64xf32>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<8x128x64xf32>
  return %r : tensor<8x128x64xf32>
}
// -----

// Causal (recognized from the mask producer) and ragged (S = 100): Q/K/V are padded to the
// 64-block grid, the KV loop stops at the diagonal block, and the mask tile is computed per
// block from indices (key j < 100 and j <= query i). The 100x100 mask is never built.
// CHECK-LABEL: func.func @causal_ragged
// CHECK-NOT:     tensor<100x100xf16>
// CHECK:         %[[QP:.+]] = tensor.pad %arg0 low[0, 0, 0] high[0, 28, 0]
// CHECK:         %[[KP:.+]] = tensor.pad %arg1 low[0, 0, 0] high[0, 28, 0]
// CHECK:         %[[VP:.+]] = tensor.pad %arg2 low[0, 0, 0] high[0, 28, 0]
// CHECK:         %[[OUT:.+]] = flow.dispatch.workgroups[%{{.+}}, %{{.+}}](%[[QP]], %[[KP]], %[[VP]], %{{.+}}) : {{.+}} -> tensor<4x128x32xf16>
// CHECK:           %[[LAST:.+]] = arith.divui
// CHECK:           %[[END:.+]] = arith.addi %[[LAST]], %{{.+}} : index
// CHECK:           %[[BOUND:.+]] = arith.minui %[[END]], %{{.+}} : index
// CHECK:           scf.for %{{.+}} = %{{.+}} to %[[BOUND]] step
// CHECK:             %[[MASK:.+]] = linalg.generic
// CHECK:               %[[INB:.+]] = arith.cmpi ult, %[[J:.+]], %{{.+}} : index
// CHECK:               %[[BELOW:.+]] = arith.cmpi ule, %[[J]], %{{.+}} : index
// CHECK:               %[[OK:.+]] = arith.andi %[[INB]], %[[BELOW]] : i1
// CHECK:               arith.select %[[OK]], %{{.+}}, %{{.+}} : f16
// CHECK:             iree_linalg_ext.online_attention {{.+}} ins({{.+}}, %[[MASK]] : {{.+}}, tensor<1x64x64xf16>)
// CHECK:           arith.truncf %{{.+}} : f32 to f16
// CHECK:         tensor.extract_slice %[[OUT]][0, 0, 0] [4, 100, 32] [1, 1, 1] : tensor<4x128x32xf16> to tensor<4x100x32xf16>
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#k = affine_map<(b, m, n, k1, k2) -> (b, k2, k1)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#mk = affine_map<(b, m, n, k1, k2) -> (m, k2)>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
#id = affine_map<(i, j) -> (i, j)>
func.func @causal_ragged(%q: tensor<4x100x32xf16>, %k: tensor<4x100x32xf16>, %v: tensor<4x100x32xf16>) -> tensor<4x100x32xf16> {
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
  %e = tensor.empty() : tensor<4x100x32xf16>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #mk, #o]>
      ins(%q, %k, %v, %scale, %mask : tensor<4x100x32xf16>, tensor<4x100x32xf16>, tensor<4x100x32xf16>, f32, tensor<100x100xf16>)
      outs(%e : tensor<4x100x32xf16>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<4x100x32xf16>
  return %r : tensor<4x100x32xf16>
}
// -----

// GQA in the 7-d form flashmlir-lower-attention produces: K and V are read at (b, h) without
// the group dim; the key-padding mask [B, Sk] is loaded per tile at its own shape and broadcast
// inside the mask tile.
// CHECK-LABEL: func.func @gqa_padding_mask
// CHECK:         flow.dispatch.workgroups[%{{.+}}, %[[NB:.+]]](%arg0, %arg1, %arg2, %{{.+}}, %arg3)
// CHECK:           %[[Q:.+]] = iree_tensor_ext.dispatch.tensor.load {{.+}} sizes = [1, 1, 1, 64, 16]
// CHECK:           scf.for
// CHECK:             iree_tensor_ext.dispatch.tensor.load {{.+}} sizes = [1, 1, 64, 16]{{.*}} -> tensor<1x1x64x16xf32>
// CHECK:             %[[MT:.+]] = iree_tensor_ext.dispatch.tensor.load {{.+}} sizes = [1, 64]{{.*}} -> tensor<1x64xf32>
// CHECK:             %[[MASK:.+]] = linalg.generic {{.+}} ins(%[[MT]] : tensor<1x64xf32>) outs(%{{.+}} : tensor<1x1x1x64x64xf32>)
// CHECK:             iree_linalg_ext.online_attention {{.+}} ins(%[[Q]], {{.+}}, %[[MASK]] :
#q = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, g, m, k1)>
#k = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, k2, k1)>
#v = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, k2, n)>
#s = affine_map<(b, h, g, m, n, k1, k2) -> ()>
#mk = affine_map<(b, h, g, m, n, k1, k2) -> (b, k2)>
#o = affine_map<(b, h, g, m, n, k1, k2) -> (b, h, g, m, n)>
func.func @gqa_padding_mask(%q: tensor<2x2x4x64x16xf32>, %k: tensor<2x2x64x16xf32>, %v: tensor<2x2x64x16xf32>, %m: tensor<2x64xf32>) -> tensor<2x2x4x64x16xf32> {
  %scale = arith.constant 0.25 : f32
  %e = tensor.empty() : tensor<2x2x4x64x16xf32>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #k, #v, #s, #mk, #o]>
      ins(%q, %k, %v, %scale, %m : tensor<2x2x4x64x16xf32>, tensor<2x2x64x16xf32>, tensor<2x2x64x16xf32>, f32, tensor<2x64xf32>)
      outs(%e : tensor<2x2x4x64x16xf32>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<2x2x4x64x16xf32>
  return %r : tensor<2x2x4x64x16xf32>
}
// -----

// Negative: K stored transposed ([B, D, S]) is not the canonical layout: left to IREE.
// CHECK-LABEL: func.func @transposed_k
// CHECK:         iree_linalg_ext.attention
// CHECK-NOT:     flow.dispatch.workgroups
// WHY:         declined iree_linalg_ext.attention {{.*}}operand layout is not canonical
#q = affine_map<(b, m, n, k1, k2) -> (b, m, k1)>
#kt = affine_map<(b, m, n, k1, k2) -> (b, k1, k2)>
#v = affine_map<(b, m, n, k1, k2) -> (b, k2, n)>
#s = affine_map<(b, m, n, k1, k2) -> ()>
#o = affine_map<(b, m, n, k1, k2) -> (b, m, n)>
func.func @transposed_k(%q: tensor<8x128x64xf32>, %k: tensor<8x64x128xf32>, %v: tensor<8x128x64xf32>) -> tensor<8x128x64xf32> {
  %scale = arith.constant 0.125 : f32
  %e = tensor.empty() : tensor<8x128x64xf32>
  %r = iree_linalg_ext.attention <indexing_maps = [#q, #kt, #v, #s, #o]>
      ins(%q, %k, %v, %scale : tensor<8x128x64xf32>, tensor<8x64x128xf32>, tensor<8x128x64xf32>, f32)
      outs(%e : tensor<8x128x64xf32>) {
    ^bb0(%x: f32):
      iree_linalg_ext.yield %x : f32
  } -> tensor<8x128x64xf32>
  return %r : tensor<8x128x64xf32>
}
