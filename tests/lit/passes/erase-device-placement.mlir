// RUN: flashmlir-opt --flashmlir-erase-device-placement %s | filecheck %s

// A graph traced on CUDA tensors: its device arguments become "cpu"; the ops are unchanged.
// CHECK-LABEL: func.func @traced_on_cuda
// CHECK-NOT:     cuda
// CHECK:         %[[D:.+]] = torch.constant.device "cpu"
// CHECK:         torch.aten.scalar_tensor %{{.+}}, %{{.+}}, %{{.+}}, %[[D]], %{{.+}}
// CHECK:         torch.aten.arange.start_step {{.*}}, %[[D]],
func.func @traced_on_cuda() -> (!torch.vtensor<[],f32>, !torch.vtensor<[16],si64>) {
  %float = torch.constant.float -3.402820e+38
  %int6 = torch.constant.int 6
  %int0 = torch.constant.int 0
  %int1 = torch.constant.int 1
  %int16 = torch.constant.int 16
  %none = torch.constant.none
  %false = torch.constant.bool false
  %cuda = torch.constant.device "cuda:0"
  %s = torch.aten.scalar_tensor %float, %int6, %int0, %cuda, %none : !torch.float, !torch.int, !torch.int, !torch.Device, !torch.none -> !torch.vtensor<[],f32>
  %a = torch.aten.arange.start_step %int0, %int16, %int1, %none, %int0, %cuda, %false : !torch.int, !torch.int, !torch.int, !torch.none, !torch.int, !torch.Device, !torch.bool -> !torch.vtensor<[16],si64>
  return %s, %a : !torch.vtensor<[],f32>, !torch.vtensor<[16],si64>
}
