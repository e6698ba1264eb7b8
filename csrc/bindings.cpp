// Registers the CUDA kernels as PyTorch operators in the namespace `ultron_kernels_cuda`.
// The Python package wraps them in its own custom ops (fake kernels, autograd), see
// ultron_kernels/ops/. Importing `ultron_kernels._C` runs these registrations.
#include <Python.h>

#include <optional>
#include <tuple>

#include <ATen/ATen.h>
#include <torch/library.h>

namespace ultron {
at::Tensor dilated_conv2d_fwd(const at::Tensor& x, const at::Tensor& weight,
                              const std::optional<at::Tensor>& bias, const at::Tensor& dilation,
                              int64_t stride, int64_t channel_run, int64_t max_dilation);
std::tuple<at::Tensor, at::Tensor, at::Tensor> dilated_conv2d_bwd(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight,
    const at::Tensor& dilation, int64_t stride, int64_t channel_run, int64_t max_dilation);
std::tuple<at::Tensor, at::Tensor> window_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& bias, int64_t bias_kind, at::IntArrayRef window,
    at::IntArrayRef shift, double scale);
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> window_attention_bwd(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, const std::optional<at::Tensor>& bias,
    int64_t bias_kind, bool bias_grad, at::IntArrayRef window, at::IntArrayRef shift, double scale);
}  // namespace ultron

extern "C" {
// `import ultron_kernels._C` needs a module object; the operators are registered below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(ultron_kernels_cuda, m) {
  m.def("dilated_conv2d_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor dilation, int stride, "
        "int channel_run, int max_dilation) -> Tensor");
  m.def("dilated_conv2d_bwd(Tensor grad_out, Tensor x, Tensor weight, Tensor dilation, int stride, "
        "int channel_run, int max_dilation) -> (Tensor, Tensor, Tensor)");
  m.def("window_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? bias, int bias_kind, "
        "int[] window, int[] shift, float scale) -> (Tensor, Tensor)");
  m.def("window_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, "
        "Tensor lse, Tensor? bias, int bias_kind, bool bias_grad, int[] window, int[] shift, "
        "float scale) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(ultron_kernels_cuda, CUDA, m) {
  m.impl("dilated_conv2d_fwd", &ultron::dilated_conv2d_fwd);
  m.impl("dilated_conv2d_bwd", &ultron::dilated_conv2d_bwd);
  m.impl("window_attention_fwd", &ultron::window_attention_fwd);
  m.impl("window_attention_bwd", &ultron::window_attention_bwd);
}
