// csrc/grouped_depthwise_conv/grouped_depthwise_conv.cu compiled as host C++ against the CUDA simulation (ultron_kernels._C_sim).
#include "../grouped_depthwise_conv/grouped_depthwise_conv.cu"
