// Schemas of the reflexflow ops (TORCH_LIBRARY namespace "reflexflow").
// Kernels: rollout.cpp (CPU), rollout_cuda.cu (CUDA). Fake kernels for torch.compile:
// reflexflow/native.py (torch.library.register_fake).
#include <torch/library.h>

TORCH_LIBRARY(reflexflow, m) {
  // order: stable sort of k, descending; counts[j] = #{i : k_i > j} for j < max k;
  // times[j, r] = t0[order[r]] + step[order[r]] added j times; steps = step[order].
  m.def("rollout_plan(Tensor k, Tensor t0, Tensor step) -> (Tensor, Tensor, Tensor, Tensor)");
  // state += h * v (h per sample or one value); next_input = state cast to its dtype.
  m.def("euler_update_(Tensor(a!) state, Tensor v, Tensor h, Tensor(b!)? next_input=None) -> ()");
}
