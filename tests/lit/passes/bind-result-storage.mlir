// RUN: flashmlir-opt --split-input-file --flashmlir-bind-result-storage %s | filecheck %s
// RUN: flashmlir-opt --split-input-file --flashmlir-bind-result-storage --debug %s 2>&1 >/dev/null | filecheck %s --check-prefix=WHY

// Each tensor result becomes a !torch.tensor argument the function overwrites; nothing is returned.
// CHECK-LABEL: func.func @main
// CHECK-SAME:    (%[[A:.+]]: !torch.vtensor<[4,8],f32>, %[[OUT0:.+]]: !torch.tensor<[4,8],f32>, %[[OUT1:.+]]: !torch.tensor<[8],bf16>)
// CHECK-NOT:     ->
// CHECK:         %[[R0:.+]] = torch.aten.mul.Scalar %[[A]]
// CHECK:         %[[R1:.+]] = torch.aten.sum.dim_IntList
// CHECK:         torch.overwrite.tensor.contents %[[R0]] overwrites %[[OUT0]] : !torch.vtensor<[4,8],f32>, !torch.tensor<[4,8],f32>
// CHECK:         torch.overwrite.tensor.contents %[[R1]] overwrites %[[OUT1]] : !torch.vtensor<[8],bf16>, !torch.tensor<[8],bf16>
// CHECK:         return{{$}}
func.func @main(%a: !torch.vtensor<[4,8],f32>) -> (!torch.vtensor<[4,8],f32>, !torch.vtensor<[8],bf16>) {
  %int2 = torch.constant.int 2
  %r0 = torch.aten.mul.Scalar %a, %int2 : !torch.vtensor<[4,8],f32>, !torch.int -> !torch.vtensor<[4,8],f32>
  %int0 = torch.constant.int 0
  %dims = torch.prim.ListConstruct %int0 : (!torch.int) -> !torch.list<int>
  %false = torch.constant.bool false
  %bf16 = torch.constant.int 15
  %r1 = torch.aten.sum.dim_IntList %a, %dims, %false, %bf16 : !torch.vtensor<[4,8],f32>, !torch.list<int>, !torch.bool, !torch.int -> !torch.vtensor<[8],bf16>
  return %r0, %r1 : !torch.vtensor<[4,8],f32>, !torch.vtensor<[8],bf16>
}

// -----

// Negative: a function with a dynamic result shape keeps its results (the caller cannot size them).
// CHECK-LABEL: func.func @main
// CHECK-SAME:    -> !torch.vtensor<[?],f32>
// WHY:         declined func.func {{.*}}results must all be static-shaped torch tensors
func.func @main(%a: !torch.vtensor<[?],f32>) -> !torch.vtensor<[?],f32> {
  return %a : !torch.vtensor<[?],f32>
}
