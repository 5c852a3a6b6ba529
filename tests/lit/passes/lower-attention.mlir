// RUN: flashmlir-opt --split-input-file --flashmlir-lower-attention %s | filecheck %s
// RUN: flashmlir-opt --split-input-file --flashmlir-lower-attention --debug %s 2>&1 >/dev/null | filecheck %s --check-prefix=WHY

// Multi-head attention, f16, Sq != Sk, Dv != D: one iree_linalg_ext.attention over
// (b, h, m, n, k1, k2); no reshapes, no mask.
// CHECK-DAG:   #[[QMAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5) -> (d0, d1, d2, d4)>
// CHECK-DAG:   #[[KMAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5) -> (d0, d1, d5, d4)>
// CHECK-DAG:   #[[VMAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5) -> (d0, d1, d5, d3)>
// CHECK-DAG:   #[[SMAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5) -> ()>
// CHECK-DAG:   #[[OMAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5) -> (d0, d1, d2, d3)>
// CHECK-LABEL: func.func @mha
// CHECK:         %[[Q:.+]] = torch_c.to_builtin_tensor %arg0 : !torch.vtensor<[2,4,32,16],f16> -> tensor<2x4x32x16xf16>
// CHECK:         %[[K:.+]] = torch_c.to_builtin_tensor %arg1
// CHECK:         %[[V:.+]] = torch_c.to_builtin_tensor %arg2
// CHECK:         %[[S:.+]] = arith.constant 2.500000e-01 : f32
// CHECK:         %[[A:.+]] = iree_linalg_ext.attention <indexing_maps = [#[[QMAP]], #[[KMAP]], #[[VMAP]], #[[SMAP]], #[[OMAP]]]>
// CHECK-SAME:      ins(%[[Q]], %[[K]], %[[V]], %[[S]] : tensor<2x4x32x16xf16>, tensor<2x4x48x16xf16>, tensor<2x4x48x8xf16>, f32)
// CHECK-SAME:      outs(%{{.+}} : tensor<2x4x32x8xf16>)
// CHECK:         } -> tensor<2x4x32x8xf16>
// CHECK:         torch_c.from_builtin_tensor %[[A]] : tensor<2x4x32x8xf16> -> !torch.vtensor<[2,4,32,8],f16>
// CHECK-NOT:     torch.operator
func.func @mha(%q: !torch.vtensor<[2,4,32,16],f16>, %k: !torch.vtensor<[2,4,48,16],f16>, %v: !torch.vtensor<[2,4,48,8],f16>) -> !torch.vtensor<[2,4,32,8],f16> {
  %none = torch.constant.none
  %p = torch.constant.float 0.000000e+00
  %false = torch.constant.bool false
  %s = torch.constant.float 2.500000e-01
  %0 = torch.operator "torch.flashmlir.attention"(%q, %k, %v, %none, %p, %false, %s) : (!torch.vtensor<[2,4,32,16],f16>, !torch.vtensor<[2,4,48,16],f16>, !torch.vtensor<[2,4,48,8],f16>, !torch.none, !torch.float, !torch.bool, !torch.float) -> !torch.vtensor<[2,4,32,8],f16>
  return %0 : !torch.vtensor<[2,4,32,8],f16>
}

// -----

// GQA (8 query heads over 2 kv heads) with a boolean key-padding mask [B,1,1,Sk]:
// Q is viewed as [B, Hkv, G, Sq, D] (no K/V copies), the mask becomes additive and
// keeps only its real dims (b, k2); the broadcast over heads and queries is in the map.
// CHECK-DAG:   #[[QMAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6) -> (d0, d1, d2, d3, d5)>
// CHECK-DAG:   #[[KMAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6) -> (d0, d1, d6, d5)>
// CHECK-DAG:   #[[MMAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6) -> (d0, d6)>
// CHECK-LABEL: func.func @padding_mask_gqa
// CHECK:         %[[Q5:.+]] = tensor.expand_shape %{{.+}} {{\[}}[0], [1, 2], [3], [4]] output_shape [2, 2, 4, 32, 16] : tensor<2x8x32x16xf32> into tensor<2x2x4x32x16xf32>
// CHECK:         %[[ADD:.+]] = linalg.generic
// CHECK-SAME:      ins(%{{.+}} : tensor<2x1x1x32xi1>) outs(%{{.+}} : tensor<2x1x1x32xf32>)
// CHECK:           arith.select %{{.+}}, %{{.+}}, %{{.+}} : f32
// CHECK:         %[[M:.+]] = tensor.collapse_shape %[[ADD]] {{\[}}[0], [1, 2, 3]] : tensor<2x1x1x32xf32> into tensor<2x32xf32>
// CHECK:         %[[A:.+]] = iree_linalg_ext.attention <indexing_maps = [#[[QMAP]], #[[KMAP]], #{{.+}}, #{{.+}}, #[[MMAP]], #{{.+}}]>
// CHECK-SAME:      ins(%[[Q5]], %{{.+}}, %{{.+}}, %{{.+}}, %[[M]] : tensor<2x2x4x32x16xf32>, tensor<2x2x32x16xf32>, tensor<2x2x32x16xf32>, f32, tensor<2x32xf32>)
// CHECK:         tensor.collapse_shape %[[A]] {{\[}}[0], [1, 2], [3], [4]] : tensor<2x2x4x32x16xf32> into tensor<2x8x32x16xf32>
func.func @padding_mask_gqa(%q: !torch.vtensor<[2,8,32,16],f32>, %k: !torch.vtensor<[2,2,32,16],f32>, %v: !torch.vtensor<[2,2,32,16],f32>, %m: !torch.vtensor<[2,1,1,32],i1>) -> !torch.vtensor<[2,8,32,16],f32> {
  %none = torch.constant.none
  %p = torch.constant.float 0.000000e+00
  %false = torch.constant.bool false
  %0 = torch.operator "torch.flashmlir.attention"(%q, %k, %v, %m, %p, %false, %none) : (!torch.vtensor<[2,8,32,16],f32>, !torch.vtensor<[2,2,32,16],f32>, !torch.vtensor<[2,2,32,16],f32>, !torch.vtensor<[2,1,1,32],i1>, !torch.float, !torch.bool, !torch.none) -> !torch.vtensor<[2,8,32,16],f32>
  return %0 : !torch.vtensor<[2,8,32,16],f32>
}

// -----

// Causal together with a per-head mask: the mask operand is produced by
// select(k2 <= m, mask, -inf), computed from loop indices, the form
// flashmlir-tile-attention recognizes. The head dim of the mask is split into (Hkv, G).
// CHECK-DAG:   #[[MMAP:.+]] = affine_map<(d0, d1, d2, d3, d4, d5, d6) -> (d1, d2, d3, d6)>
// CHECK-LABEL: func.func @causal_and_head_mask
// CHECK:         %[[M4:.+]] = tensor.expand_shape %{{.+}} {{\[}}[0, 1], [2], [3]] output_shape [2, 4, 32, 32] : tensor<8x32x32xf32> into tensor<2x4x32x32xf32>
// CHECK:         %[[CAUSAL:.+]] = linalg.generic
// CHECK-SAME:      ins(%[[M4]] : tensor<2x4x32x32xf32>)
// CHECK:         ^bb0(%[[IN:.+]]: f32, %{{.+}}: f32):
// CHECK-DAG:       %[[NINF:.+]] = arith.constant 0xFF800000 : f32
// CHECK-DAG:       %[[I:.+]] = linalg.index 2 : index
// CHECK-DAG:       %[[J:.+]] = linalg.index 3 : index
// CHECK:           %[[ATTEND:.+]] = arith.cmpi ule, %[[J]], %[[I]] : index
// CHECK:           arith.select %[[ATTEND]], %[[IN]], %[[NINF]] : f32
// CHECK:         iree_linalg_ext.attention <indexing_maps = [#{{.+}}, #{{.+}}, #{{.+}}, #{{.+}}, #[[MMAP]], #{{.+}}]>
// CHECK-SAME:      ins({{.+}}, %[[CAUSAL]] : {{.+}}, tensor<2x4x32x32xf32>)
func.func @causal_and_head_mask(%q: !torch.vtensor<[2,8,32,16],f32>, %k: !torch.vtensor<[2,2,32,16],f32>, %v: !torch.vtensor<[2,2,32,16],f32>, %m: !torch.vtensor<[8,32,32],f32>) -> !torch.vtensor<[2,8,32,16],f32> {
  %none = torch.constant.none
  %p = torch.constant.float 0.000000e+00
  %true = torch.constant.bool true
  %0 = torch.operator "torch.flashmlir.attention"(%q, %k, %v, %m, %p, %true, %none) : (!torch.vtensor<[2,8,32,16],f32>, !torch.vtensor<[2,2,32,16],f32>, !torch.vtensor<[2,2,32,16],f32>, !torch.vtensor<[8,32,32],f32>, !torch.float, !torch.bool, !torch.none) -> !torch.vtensor<[2,8,32,16],f32>
  return %0 : !torch.vtensor<[2,8,32,16],f32>
}

// -----

// Negative: dynamic sequence lengths are not lowered yet; the op stays and says why.
// CHECK-LABEL: func.func @dynamic
// CHECK:         torch.operator "torch.flashmlir.attention"
// CHECK-NOT:     iree_linalg_ext.attention
// WHY:         declined torch.operator {{.*}}dynamic shapes are not supported yet
func.func @dynamic(%q: !torch.vtensor<[2,4,?,16],f32>, %k: !torch.vtensor<[2,4,?,16],f32>, %v: !torch.vtensor<[2,4,?,16],f32>) -> !torch.vtensor<[2,4,?,16],f32> {
  %none = torch.constant.none
  %p = torch.constant.float 0.000000e+00
  %false = torch.constant.bool false
  %0 = torch.operator "torch.flashmlir.attention"(%q, %k, %v, %none, %p, %false, %none) : (!torch.vtensor<[2,4,?,16],f32>, !torch.vtensor<[2,4,?,16],f32>, !torch.vtensor<[2,4,?,16],f32>, !torch.none, !torch.float, !torch.bool, !torch.none) -> !torch.vtensor<[2,4,?,16],f32>
  return %0 : !torch.vtensor<[2,4,?,16],f32>
}

// -----

// Negative: dropout is not lowered yet.
// CHECK-LABEL: func.func @dropout
// CHECK:         torch.operator "torch.flashmlir.attention"
// WHY:         declined torch.operator {{.*}}dropout_p > 0 is not supported yet
func.func @dropout(%q: !torch.vtensor<[2,4,16,16],f32>, %k: !torch.vtensor<[2,4,16,16],f32>, %v: !torch.vtensor<[2,4,16,16],f32>) -> !torch.vtensor<[2,4,16,16],f32> {
  %none = torch.constant.none
  %p = torch.constant.float 1.000000e-01
  %false = torch.constant.bool false
  %0 = torch.operator "torch.flashmlir.attention"(%q, %k, %v, %none, %p, %false, %none) : (!torch.vtensor<[2,4,16,16],f32>, !torch.vtensor<[2,4,16,16],f32>, !torch.vtensor<[2,4,16,16],f32>, !torch.none, !torch.float, !torch.bool, !torch.none) -> !torch.vtensor<[2,4,16,16],f32>
  return %0 : !torch.vtensor<[2,4,16,16],f32>
}
