// Schemas of the reflexflow ops (TORCH_LIBRARY namespace "reflexflow").
// Kernels: rollout.cpp (CPU), rollout_cuda.cu (CUDA). Fake kernels for torch.compile:
// reflexflow/native.py (torch.library.register_fake). Reference twins: reflexflow/rollout.py.
#include <torch/library.h>

TORCH_LIBRARY(reflexflow, m) {
  // order: stable sort of k, descending; K = kmax if given, else max k (on CUDA one
  // device-to-host read of (min k, max k)); counts[j] = #{i : k_i > j} for j < K;
  // times[j, r] = t0[order[r]] + step[order[r]] added j times, shape (K, B); steps = step[order].
  m.def(
      "rollout_plan(Tensor k, Tensor t0, Tensor step, int? kmax=None) -> "
      "(Tensor, Tensor, Tensor, Tensor)");
  // state += h * v (h per sample or one value); next_input = state cast to its dtype.
  m.def("euler_update_(Tensor(a!) state, Tensor v, Tensor h, Tensor(b!)? next_input=None) -> ()");
  // Step j of the masked static plan, only on the rows r with k[r] > j:
  //   state[r] += h[r] * v[r];  tau[r] += h[r];  next_input[r] = state[r] cast to its dtype.
  // Other rows are not touched (bit for bit). No host read of k.
  m.def(
      "euler_update_masked_(Tensor(a!) state, Tensor(b!) tau, Tensor v, Tensor h, Tensor k, "
      "int j, Tensor(c!)? next_input=None) -> ()");
}
