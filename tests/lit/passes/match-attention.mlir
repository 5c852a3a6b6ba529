// RUN: flashmlir-opt --split-input-file --flashmlir-match-attention %s | filecheck %s
// RUN: flashmlir-opt --split-input-file --flashmlir-match-attention --debug %s 2>&1 >/dev/null | filecheck %s --check-prefix=WHY

// softmax(Q·Kᵀ · 0.25) · V with the scale as a multiply.
// CHECK-LABEL: func.func @manual_mul_scale
// CHECK-SAME:    (%[[Q:.+]]: !torch.vtensor<[2,4,32,16],f32>, %[[K:.+]]: !torch.vtensor<[2,4,32,16],f32>, %[[V:.+]]: !torch.vtensor<[2,4,32,16],f32>)
// CHECK-DAG:     %[[NONE:.+]] = torch.constant.none
// CHECK-DAG:     %[[P:.+]] = torch.constant.float 0.000000e+00
// CHECK-DAG:     %[[FALSE:.+]] = torch.constant.bool false
// CHECK-DAG:     %[[SCALE:.+]] = torch.constant.float 2.500000e-01
// CHECK-DAG:     %[[NOSEED:.+]] = torch.constant.none
// CHECK:         %[[O:.+]] = torch.operator "torch.flashmlir.attention"(%[[Q]], %[[K]], %[[V]], %[[NONE]], %[[P]], %[[FALSE]], %[[SCALE]], %[[NOSEED]])
// CHECK-NOT:     torch.aten.softmax
// CHECK-NOT:     torch.aten.matmul
// CHECK:         return %[[O]]
func.func @manual_mul_scale(%q: !torch.vtensor<[2,4,32,16],f32>, %k: !torch.vtensor<[2,4,32,16],f32>, %v: !torch.vtensor<[2,4,32,16],f32>) -> !torch.vtensor<[2,4,32,16],f32> {
  %int-2 = torch.constant.int -2
  %int-1 = torch.constant.int -1
  %float = torch.constant.float 2.500000e-01
  %none = torch.constant.none
  %kt = torch.aten.transpose.int %k, %int-2, %int-1 : !torch.vtensor<[2,4,32,16],f32>, !torch.int, !torch.int -> !torch.vtensor<[2,4,16,32],f32>
  %s = torch.aten.matmul %q, %kt : !torch.vtensor<[2,4,32,16],f32>, !torch.vtensor<[2,4,16,32],f32> -> !torch.vtensor<[2,4,32,32],f32>
  %ss = torch.aten.mul.Scalar %s, %float : !torch.vtensor<[2,4,32,32],f32>, !torch.float -> !torch.vtensor<[2,4,32,32],f32>
  %p = torch.aten.softmax.int %ss, %int-1, %none : !torch.vtensor<[2,4,32,32],f32>, !torch.int, !torch.none -> !torch.vtensor<[2,4,32,32],f32>
  %o = torch.aten.matmul %p, %v : !torch.vtensor<[2,4,32,32],f32>, !torch.vtensor<[2,4,32,16],f32> -> !torch.vtensor<[2,4,32,16],f32>
  return %o : !torch.vtensor<[2,4,32,16],f32>
}

// -----

// Division by sqrt(d), an additive mask, and a 3-D bmm layout ([B*H, S, D], permute for Kᵀ).
// CHECK-LABEL: func.func @manual_div_mask_bmm
// CHECK-SAME:    (%[[Q:.+]]: !torch.vtensor<[8,32,16],f32>, %[[K:.+]]: !torch.vtensor<[8,32,16],f32>, %[[V:.+]]: !torch.vtensor<[8,32,16],f32>, %[[M:.+]]: !torch.vtensor<[8,32,32],f32>)
// CHECK:         %[[SCALE:.+]] = torch.constant.float 2.500000e-01
// CHECK:         torch.operator "torch.flashmlir.attention"(%[[Q]], %[[K]], %[[V]], %[[M]], %{{.+}}, %{{.+}}, %[[SCALE]], %{{.+}})
// CHECK-NOT:     torch.aten.bmm
func.func @manual_div_mask_bmm(%q: !torch.vtensor<[8,32,16],f32>, %k: !torch.vtensor<[8,32,16],f32>, %v: !torch.vtensor<[8,32,16],f32>, %m: !torch.vtensor<[8,32,32],f32>) -> !torch.vtensor<[8,32,16],f32> {
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int2 = torch.constant.int 2
  %int-1 = torch.constant.int -1
  %int1a = torch.constant.int 1
  %float4 = torch.constant.float 4.000000e+00
  %false = torch.constant.bool false
  %perm = torch.prim.ListConstruct %int0, %int2, %int1 : (!torch.int, !torch.int, !torch.int) -> !torch.list<int>
  %kt = torch.aten.permute %k, %perm : !torch.vtensor<[8,32,16],f32>, !torch.list<int> -> !torch.vtensor<[8,16,32],f32>
  %s = torch.aten.bmm %q, %kt : !torch.vtensor<[8,32,16],f32>, !torch.vtensor<[8,16,32],f32> -> !torch.vtensor<[8,32,32],f32>
  %sd = torch.aten.div.Scalar %s, %float4 : !torch.vtensor<[8,32,32],f32>, !torch.float -> !torch.vtensor<[8,32,32],f32>
  %sm = torch.aten.add.Tensor %sd, %m, %int1a : !torch.vtensor<[8,32,32],f32>, !torch.vtensor<[8,32,32],f32>, !torch.int -> !torch.vtensor<[8,32,32],f32>
  %p = torch.aten._softmax %sm, %int-1, %false : !torch.vtensor<[8,32,32],f32>, !torch.int, !torch.bool -> !torch.vtensor<[8,32,32],f32>
  %o = torch.aten.bmm %p, %v : !torch.vtensor<[8,32,32],f32>, !torch.vtensor<[8,32,16],f32> -> !torch.vtensor<[8,32,16],f32>
  return %o : !torch.vtensor<[8,32,16],f32>
}

// -----

// masked_fill(C, -inf) means "do not attend where C": our op gets the mask not(C).
// CHECK-LABEL: func.func @masked_fill
// CHECK-SAME:    %[[C:[^:]+]]: !torch.vtensor<[1,1,32,32],i1>
// CHECK:         %[[KEEP:.+]] = torch.aten.logical_not %[[C]]
// CHECK:         torch.operator "torch.flashmlir.attention"(%{{.+}}, %{{.+}}, %{{.+}}, %[[KEEP]],
func.func @masked_fill(%q: !torch.vtensor<[2,4,32,16],f32>, %k: !torch.vtensor<[2,4,32,16],f32>, %v: !torch.vtensor<[2,4,32,16],f32>, %c: !torch.vtensor<[1,1,32,32],i1>) -> !torch.vtensor<[2,4,32,16],f32> {
  %int-2 = torch.constant.int -2
  %int-1 = torch.constant.int -1
  %ninf = torch.constant.float 0xFFF0000000000000
  %none = torch.constant.none
  %kt = torch.aten.transpose.int %k, %int-2, %int-1 : !torch.vtensor<[2,4,32,16],f32>, !torch.int, !torch.int -> !torch.vtensor<[2,4,16,32],f32>
  %s = torch.aten.matmul %q, %kt : !torch.vtensor<[2,4,32,16],f32>, !torch.vtensor<[2,4,16,32],f32> -> !torch.vtensor<[2,4,32,32],f32>
  %f = torch.aten.masked_fill.Scalar %s, %c, %ninf : !torch.vtensor<[2,4,32,32],f32>, !torch.vtensor<[1,1,32,32],i1>, !torch.float -> !torch.vtensor<[2,4,32,32],f32>
  %p = torch.aten.softmax.int %f, %int-1, %none : !torch.vtensor<[2,4,32,32],f32>, !torch.int, !torch.none -> !torch.vtensor<[2,4,32,32],f32>
  %o = torch.aten.matmul %p, %v : !torch.vtensor<[2,4,32,32],f32>, !torch.vtensor<[2,4,32,16],f32> -> !torch.vtensor<[2,4,32,16],f32>
  return %o : !torch.vtensor<[2,4,32,16],f32>
}

// -----

// SDPA with is_causal and GQA (4 query heads, 2 kv heads): kept as GQA, no scale given.
// CHECK-LABEL: func.func @sdpa_causal_gqa
// CHECK-DAG:     %[[MASK:.+]] = torch.constant.none
// CHECK-DAG:     %[[TRUE:.+]] = torch.constant.bool true
// CHECK-DAG:     %[[SCALE:.+]] = torch.constant.none
// CHECK:         torch.operator "torch.flashmlir.attention"(%{{.+}}, %{{.+}}, %{{.+}}, %[[MASK]], %{{.+}}, %[[TRUE]], %[[SCALE]], %{{.+}}) : (!torch.vtensor<[2,4,16,8],f32>, !torch.vtensor<[2,2,16,8],f32>, !torch.vtensor<[2,2,16,8],f32>
// CHECK-NOT:     torch.aten.scaled_dot_product_attention
func.func @sdpa_causal_gqa(%q: !torch.vtensor<[2,4,16,8],f32>, %k: !torch.vtensor<[2,2,16,8],f32>, %v: !torch.vtensor<[2,2,16,8],f32>) -> !torch.vtensor<[2,4,16,8],f32> {
  %none = torch.constant.none
  %float0 = torch.constant.float 0.000000e+00
  %true = torch.constant.bool true
  %0 = torch.aten.scaled_dot_product_attention %q, %k, %v, %none, %float0, %true, %none, %true : !torch.vtensor<[2,4,16,8],f32>, !torch.vtensor<[2,2,16,8],f32>, !torch.vtensor<[2,2,16,8],f32>, !torch.none, !torch.float, !torch.bool, !torch.none, !torch.bool -> !torch.vtensor<[2,4,16,8],f32>
  return %0 : !torch.vtensor<[2,4,16,8],f32>
}

// -----

// Negative: softmax over the query axis is not attention.
// CHECK-LABEL: func.func @softmax_wrong_dim
// CHECK-NOT:     torch.operator
// CHECK:         torch.aten.softmax.int
// WHY:         declined torch.aten.softmax.int {{.*}}softmax on dim 2, expected the last (key) axis 3
func.func @softmax_wrong_dim(%q: !torch.vtensor<[2,4,32,16],f32>, %k: !torch.vtensor<[2,4,32,16],f32>, %v: !torch.vtensor<[2,4,32,16],f32>) -> !torch.vtensor<[2,4,32,16],f32> {
  %int-2 = torch.constant.int -2
  %int-1 = torch.constant.int -1
  %none = torch.constant.none
  %kt = torch.aten.transpose.int %k, %int-2, %int-1 : !torch.vtensor<[2,4,32,16],f32>, !torch.int, !torch.int -> !torch.vtensor<[2,4,16,32],f32>
  %s = torch.aten.matmul %q, %kt : !torch.vtensor<[2,4,32,16],f32>, !torch.vtensor<[2,4,16,32],f32> -> !torch.vtensor<[2,4,32,32],f32>
  %p = torch.aten.softmax.int %s, %int-2, %none : !torch.vtensor<[2,4,32,32],f32>, !torch.int, !torch.none -> !torch.vtensor<[2,4,32,32],f32>
  %o = torch.aten.matmul %p, %v : !torch.vtensor<[2,4,32,32],f32>, !torch.vtensor<[2,4,32,16],f32> -> !torch.vtensor<[2,4,32,16],f32>
  return %o : !torch.vtensor<[2,4,32,16],f32>
}

// -----

// Negative: the probabilities are also returned (attention weights escape).
// CHECK-LABEL: func.func @weights_returned
// CHECK-NOT:     torch.operator
// CHECK:         return %{{.+}}, %{{.+}} : !torch.vtensor<[2,4,32,16],f32>, !torch.vtensor<[2,4,32,32],f32>
// WHY:         declined torch.aten.softmax.int {{.*}}the softmax output has 2 users, expected 1
func.func @weights_returned(%q: !torch.vtensor<[2,4,32,16],f32>, %k: !torch.vtensor<[2,4,32,16],f32>, %v: !torch.vtensor<[2,4,32,16],f32>) -> (!torch.vtensor<[2,4,32,16],f32>, !torch.vtensor<[2,4,32,32],f32>) {
  %int-2 = torch.constant.int -2
  %int-1 = torch.constant.int -1
  %none = torch.constant.none
  %kt = torch.aten.transpose.int %k, %int-2, %int-1 : !torch.vtensor<[2,4,32,16],f32>, !torch.int, !torch.int -> !torch.vtensor<[2,4,16,32],f32>
  %s = torch.aten.matmul %q, %kt : !torch.vtensor<[2,4,32,16],f32>, !torch.vtensor<[2,4,16,32],f32> -> !torch.vtensor<[2,4,32,32],f32>
  %p = torch.aten.softmax.int %s, %int-1, %none : !torch.vtensor<[2,4,32,32],f32>, !torch.int, !torch.none -> !torch.vtensor<[2,4,32,32],f32>
  %o = torch.aten.matmul %p, %v : !torch.vtensor<[2,4,32,32],f32>, !torch.vtensor<[2,4,32,16],f32> -> !torch.vtensor<[2,4,32,16],f32>
  return %o, %p : !torch.vtensor<[2,4,32,16],f32>, !torch.vtensor<[2,4,32,32],f32>
}

// -----

// Negative: K is transposed over dims (1, 3), so the matmul does not contract the head dim.
// CHECK-LABEL: func.func @transpose_wrong_dims
// CHECK-NOT:     torch.operator
// WHY:         declined torch.aten.softmax.int {{.*}}not K with its last two dims swapped
func.func @transpose_wrong_dims(%q: !torch.vtensor<[2,32,4,32],f32>, %k: !torch.vtensor<[2,32,4,32],f32>, %v: !torch.vtensor<[2,32,32,32],f32>) -> !torch.vtensor<[2,32,4,32],f32> {
  %int1 = torch.constant.int 1
  %int3 = torch.constant.int 3
  %int-1 = torch.constant.int -1
  %none = torch.constant.none
  %kt = torch.aten.transpose.int %k, %int1, %int3 : !torch.vtensor<[2,32,4,32],f32>, !torch.int, !torch.int -> !torch.vtensor<[2,32,4,32],f32>
  %s = torch.aten.matmul %q, %kt : !torch.vtensor<[2,32,4,32],f32>, !torch.vtensor<[2,32,4,32],f32> -> !torch.vtensor<[2,32,4,32],f32>
  %p = torch.aten.softmax.int %s, %int-1, %none : !torch.vtensor<[2,32,4,32],f32>, !torch.int, !torch.none -> !torch.vtensor<[2,32,4,32],f32>
  %o = torch.aten.matmul %p, %v : !torch.vtensor<[2,32,4,32],f32>, !torch.vtensor<[2,32,32,32],f32> -> !torch.vtensor<[2,32,4,32],f32>
  return %o : !torch.vtensor<[2,32,4,32],f32>
}

// -----

// Negative: dropout on SDPA is not supported yet; the op is left for IREE.
// CHECK-LABEL: func.func @sdpa_dropout
// CHECK:         torch.aten.scaled_dot_product_attention
// WHY:         declined torch.aten.scaled_dot_product_attention {{.*}}dropout_p is not 0
func.func @sdpa_dropout(%q: !torch.vtensor<[2,4,16,8],f32>, %k: !torch.vtensor<[2,4,16,8],f32>, %v: !torch.vtensor<[2,4,16,8],f32>) -> !torch.vtensor<[2,4,16,8],f32> {
  %none = torch.constant.none
  %p = torch.constant.float 1.000000e-01
  %false = torch.constant.bool false
  %0 = torch.aten.scaled_dot_product_attention %q, %k, %v, %none, %p, %false, %none, %false : !torch.vtensor<[2,4,16,8],f32>, !torch.vtensor<[2,4,16,8],f32>, !torch.vtensor<[2,4,16,8],f32>, !torch.none, !torch.float, !torch.bool, !torch.none, !torch.bool -> !torch.vtensor<[2,4,16,8],f32>
  return %0 : !torch.vtensor<[2,4,16,8],f32>
}

// -----

// linalg IR: batch_matmul(Q, transpose(K)) → ·s → softmax(dim 2) → batch_matmul(·, V).
// CHECK-LABEL: func.func @linalg_transpose_scale
// CHECK-SAME:    (%[[Q:.+]]: tensor<8x128x64xf32>, %[[K:.+]]: tensor<8x128x64xf32>, %[[V:.+]]: tensor<8x128x64xf32>)
// CHECK:         %[[S:.+]] = arith.constant 1.250000e-01 : f32
// CHECK:         %[[A:.+]] = iree_linalg_ext.attention
// CHECK-SAME:      ins(%[[Q]], %[[K]], %[[V]], %[[S]] : tensor<8x128x64xf32>, tensor<8x128x64xf32>, tensor<8x128x64xf32>, f32)
// CHECK-NOT:     linalg.batch_matmul
// CHECK-NOT:     linalg.softmax
// CHECK-NOT:     linalg.transpose
// CHECK:         return %[[A]]
func.func @linalg_transpose_scale(%q: tensor<8x128x64xf32>, %k: tensor<8x128x64xf32>, %v: tensor<8x128x64xf32>) -> tensor<8x128x64xf32> {
  %zero = arith.constant 0.0 : f32
  %scale = arith.constant 0.125 : f32
  %et = tensor.empty() : tensor<8x64x128xf32>
  %kt = linalg.transpose ins(%k : tensor<8x128x64xf32>) outs(%et : tensor<8x64x128xf32>) permutation = [0, 2, 1]
  %es = tensor.empty() : tensor<8x128x128xf32>
  %fs = linalg.fill ins(%zero : f32) outs(%es : tensor<8x128x128xf32>) -> tensor<8x128x128xf32>
  %s = linalg.batch_matmul ins(%q, %kt : tensor<8x128x64xf32>, tensor<8x64x128xf32>) outs(%fs : tensor<8x128x128xf32>) -> tensor<8x128x128xf32>
  %ss = linalg.generic {indexing_maps = [affine_map<(b, m, n) -> (b, m, n)>, affine_map<(b, m, n) -> (b, m, n)>], iterator_types = ["parallel", "parallel", "parallel"]} ins(%s : tensor<8x128x128xf32>) outs(%es : tensor<8x128x128xf32>) {
  ^bb0(%in: f32, %out: f32):
    %m = arith.mulf %in, %scale : f32
    linalg.yield %m : f32
  } -> tensor<8x128x128xf32>
  %p = linalg.softmax dimension(2) ins(%ss : tensor<8x128x128xf32>) outs(%es : tensor<8x128x128xf32>) -> tensor<8x128x128xf32>
  %eo = tensor.empty() : tensor<8x128x64xf32>
  %fo = linalg.fill ins(%zero : f32) outs(%eo : tensor<8x128x64xf32>) -> tensor<8x128x64xf32>
  %o = linalg.batch_matmul ins(%p, %v : tensor<8x128x128xf32>, tensor<8x128x64xf32>) outs(%fo : tensor<8x128x64xf32>) -> tensor<8x128x64xf32>
  return %o : tensor<8x128x64xf32>
}

// -----

// linalg IR, Kᵀ spelled as batch_matmul's indexing map, no scale.
// CHECK-LABEL: func.func @linalg_transposed_map
// CHECK:         %[[S:.+]] = arith.constant 1.000000e+00 : f32
// CHECK:         iree_linalg_ext.attention {{.+}} ins(%arg0, %arg1, %arg2, %[[S]] :
func.func @linalg_transposed_map(%q: tensor<4x32x16xf16>, %k: tensor<4x48x16xf16>, %v: tensor<4x48x16xf16>) -> tensor<4x32x16xf16> {
  %zero = arith.constant 0.0 : f16
  %es = tensor.empty() : tensor<4x32x48xf16>
  %fs = linalg.fill ins(%zero : f16) outs(%es : tensor<4x32x48xf16>) -> tensor<4x32x48xf16>
  %s = linalg.batch_matmul indexing_maps = [affine_map<(d0, d1, d2, d3) -> (d0, d1, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d2, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>] ins(%q, %k : tensor<4x32x16xf16>, tensor<4x48x16xf16>) outs(%fs : tensor<4x32x48xf16>) -> tensor<4x32x48xf16>
  %p = linalg.softmax dimension(2) ins(%s : tensor<4x32x48xf16>) outs(%es : tensor<4x32x48xf16>) -> tensor<4x32x48xf16>
  %eo = tensor.empty() : tensor<4x32x16xf16>
  %fo = linalg.fill ins(%zero : f16) outs(%eo : tensor<4x32x16xf16>) -> tensor<4x32x16xf16>
  %o = linalg.batch_matmul ins(%p, %v : tensor<4x32x48xf16>, tensor<4x48x16xf16>) outs(%fo : tensor<4x32x16xf16>) -> tensor<4x32x16xf16>
  return %o : tensor<4x32x16xf16>
}

// -----

// Negative (linalg): the P·V matmul accumulates into a non-zero init: not plain attention.
// CHECK-LABEL: func.func @linalg_accumulating_init
// CHECK:         linalg.softmax
// CHECK-NOT:     iree_linalg_ext.attention
// WHY:         declined linalg.softmax {{.*}}P·V accumulates into an init that is not a fill of 0
func.func @linalg_accumulating_init(%q: tensor<4x32x16xf32>, %k: tensor<4x48x16xf32>, %v: tensor<4x48x16xf32>, %acc: tensor<4x32x16xf32>) -> tensor<4x32x16xf32> {
  %zero = arith.constant 0.0 : f32
  %es = tensor.empty() : tensor<4x32x48xf32>
  %fs = linalg.fill ins(%zero : f32) outs(%es : tensor<4x32x48xf32>) -> tensor<4x32x48xf32>
  %s = linalg.batch_matmul indexing_maps = [affine_map<(d0, d1, d2, d3) -> (d0, d1, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d2, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>] ins(%q, %k : tensor<4x32x16xf32>, tensor<4x48x16xf32>) outs(%fs : tensor<4x32x48xf32>) -> tensor<4x32x48xf32>
  %p = linalg.softmax dimension(2) ins(%s : tensor<4x32x48xf32>) outs(%es : tensor<4x32x48xf32>) -> tensor<4x32x48xf32>
  %o = linalg.batch_matmul ins(%p, %v : tensor<4x32x48xf32>, tensor<4x48x16xf32>) outs(%acc : tensor<4x32x16xf32>) -> tensor<4x32x16xf32>
  return %o : tensor<4x32x16xf32>
}

// -----

// Negative (linalg): softmax over the query axis.
// CHECK-LABEL: func.func @linalg_softmax_dim1
// CHECK-NOT:     iree_linalg_ext.attention
// WHY:         declined linalg.softmax {{.*}}softmax on dim 1, expected the last (key) axis 2
func.func @linalg_softmax_dim1(%q: tensor<4x32x16xf32>, %k: tensor<4x32x16xf32>, %v: tensor<4x32x16xf32>) -> tensor<4x32x16xf32> {
  %zero = arith.constant 0.0 : f32
  %es = tensor.empty() : tensor<4x32x32xf32>
  %fs = linalg.fill ins(%zero : f32) outs(%es : tensor<4x32x32xf32>) -> tensor<4x32x32xf32>
  %s = linalg.batch_matmul indexing_maps = [affine_map<(d0, d1, d2, d3) -> (d0, d1, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d2, d3)>, affine_map<(d0, d1, d2, d3) -> (d0, d1, d2)>] ins(%q, %k : tensor<4x32x16xf32>, tensor<4x32x16xf32>) outs(%fs : tensor<4x32x32xf32>) -> tensor<4x32x32xf32>
  %p = linalg.softmax dimension(1) ins(%s : tensor<4x32x32xf32>) outs(%es : tensor<4x32x32xf32>) -> tensor<4x32x32xf32>
  %eo = tensor.empty() : tensor<4x32x16xf32>
  %fo = linalg.fill ins(%zero : f32) outs(%eo : tensor<4x32x16xf32>) -> tensor<4x32x16xf32>
  %o = linalg.batch_matmul ins(%p, %v : tensor<4x32x32xf32>, tensor<4x32x16xf32>) outs(%fo : tensor<4x32x16xf32>) -> tensor<4x32x16xf32>
  return %o : tensor<4x32x16xf32>
}
