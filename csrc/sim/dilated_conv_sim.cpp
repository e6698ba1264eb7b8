// csrc/dilated_conv/dilated_conv.cu compiled as host C++ against the CUDA simulation (ultron_kernels._C_sim).
#include "../dilated_conv/dilated_conv.cu"
