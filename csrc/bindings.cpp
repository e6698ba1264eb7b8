// Registers the CUDA kernels as PyTorch operators. The Python package wraps them in its own
// custom ops (fake kernels, autograd), see ultron_kernels/ops/.
//
// Built two ways from this one file:
//  * ultron_kernels._C: namespace `ultron_kernels_cuda`, CUDA tensors;
//  * ultron_kernels._C_sim (-DULTRON_CUDA_SIM, csrc/sim/): namespace `ultron_kernels_cuda_sim`,
//    CPU tensors, the same kernels run by the host simulation; it also registers
//    `device_properties` (the simulated device the host code sees) and `take_launch_log`.
// Importing the module runs these registrations.
#include <Python.h>

#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

#include "ops.h"

#ifdef ULTRON_CUDA_SIM
#include "common.cuh"
#define ULTRON_OPS_NAMESPACE ultron_kernels_cuda_sim
#define ULTRON_OPS_DEVICE CPU
#define ULTRON_MODULE_NAME "_C_sim"
#define ULTRON_MODULE_INIT PyInit__C_sim
#else
#define ULTRON_OPS_NAMESPACE ultron_kernels_cuda
#define ULTRON_OPS_DEVICE CUDA
#define ULTRON_MODULE_NAME "_C"
#define ULTRON_MODULE_INIT PyInit__C
#endif


extern "C" {
// `import ultron_kernels._C` needs a module object; the operators are registered below.
PyObject* ULTRON_MODULE_INIT(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, ULTRON_MODULE_NAME, nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ULTRON_OPS_NAMESPACE, m) {
  m.def("grouped_dwconv2d_fwd(Tensor x, Tensor weight, Tensor? bias, int[] groups, int stride) -> Tensor");
  m.def("grouped_dwconv2d_bwd(Tensor grad_out, Tensor x, Tensor weight, int[] groups, int stride) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, int bias_kind, "
        "int[] window, int[] shift, Tensor? scale, float scale_value, bool qk_norm, Tensor? k_pad, Tensor? v_pad, "
        "bool roll_first, Tensor? rel_rows=None) -> (Tensor, Tensor)");
  m.def("window_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, "
        "Tensor lse, Tensor? bias, int bias_kind, int[] window, int[] shift, Tensor? scale, float scale_value, "
        "bool qk_norm, Tensor? k_pad, Tensor? v_pad, bool roll_first, bool bias_grad, "
        "bool scale_grad, bool pad_grad, Tensor? rel_rows=None) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, "
        "Tensor, Tensor)");
#ifdef ULTRON_KERNELS_CUDA_ARCHS
  // The TORCH_CUDA_ARCH_LIST this binary was built with (e.g. "8.0;8.6;8.9;9.0+PTX"): which
  // GPUs have a kernel image in it.
  m.def("cuda_arch_list() -> str", [] { return std::string(ULTRON_KERNELS_CUDA_ARCHS); });
#endif
#ifdef ULTRON_CUDA_SIM
  // [SM count, major, minor, shared memory per block with opt-in] of the simulated device.
  m.def("device_properties() -> int[]", [] {
    const ultron::DeviceInfo d = ultron::current_device();
    return std::vector<int64_t>{d.sms, d.major, d.minor, d.smem_optin};
  });
  // The launches since the last call, one line each (kernel, grid, block, shared memory).
  m.def("take_launch_log() -> str[]", [] { return ultron::sim::take_launch_log(); });
#endif
}

TORCH_LIBRARY_IMPL(ULTRON_OPS_NAMESPACE, ULTRON_OPS_DEVICE, m) {
  m.impl("grouped_dwconv2d_fwd", &ultron::grouped_dwconv2d_fwd);
  m.impl("grouped_dwconv2d_bwd", &ultron::grouped_dwconv2d_bwd);
  m.impl("window_attention_fwd", &ultron::window_attention_fwd);
  m.impl("window_attention_bwd", &ultron::window_attention_bwd);
}
