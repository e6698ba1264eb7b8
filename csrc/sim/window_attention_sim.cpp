// csrc/window_attention/window_attention.cu compiled as host C++ against the CUDA simulation (ultron_kernels._C_sim).
#include "../window_attention/window_attention.cu"
