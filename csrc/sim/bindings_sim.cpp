// csrc/bindings.cpp for the simulation build: the same operators, for CPU tensors.
#include "../bindings.cpp"
