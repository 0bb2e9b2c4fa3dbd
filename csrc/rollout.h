// Shared declarations and argument checks of the reflexflow rollout ops.
//
//   reflexflow::rollout_plan(k, t0, step, kmax?) -> (order, counts, times, steps)
//   reflexflow::euler_update_(state, v, h, next_input?)   state += h * v, in place
//   reflexflow::euler_update_masked_(state, tau, v, h, k, j, next_input?)
//       the same on the rows with k > j only, and tau += h there
//
// Reference twins: reflexflow/rollout.py (plan_tensors, euler_update, euler_update_masked).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Optional.h>

#include <tuple>

namespace reflexflow {

using PlanResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Checks shared by the CPU and CUDA kernels; returns h as a state-dtype tensor.
inline at::Tensor check_euler_args(const at::Tensor& state, const at::Tensor& v,
                                   const at::Tensor& h,
                                   const c10::optional<at::Tensor>& next_input) {
  TORCH_CHECK(state.scalar_type() == at::kFloat || state.scalar_type() == at::kDouble,
              "euler_update_: state must be float32 or float64, got ", state.scalar_type());
  TORCH_CHECK(state.dim() >= 1, "euler_update_: state must have a batch axis");
  TORCH_CHECK(state.is_contiguous(), "euler_update_: state must be contiguous");
  TORCH_CHECK(at::isFloatingType(v.scalar_type()),
              "euler_update_: v must be a floating-point tensor, got ", v.scalar_type());
  TORCH_CHECK(v.sizes() == state.sizes(), "euler_update_: v has shape ", v.sizes(),
              ", state has ", state.sizes());
  TORCH_CHECK(v.device() == state.device(), "euler_update_: v is on ", v.device(),
              ", state on ", state.device());
  TORCH_CHECK(h.device() == state.device(), "euler_update_: h is on ", h.device(),
              ", state on ", state.device());
  TORCH_CHECK(at::isFloatingType(h.scalar_type()), "euler_update_: h must be floating-point");
  const int64_t n = state.size(0);
  TORCH_CHECK(h.numel() == 1 || (h.dim() == 1 && h.size(0) == n),
              "euler_update_: h must have one element or shape (", n, ",), got ", h.sizes());
  if (next_input.has_value()) {
    const at::Tensor& o = *next_input;
    TORCH_CHECK(o.sizes() == state.sizes(), "euler_update_: next_input has shape ", o.sizes(),
                ", state has ", state.sizes());
    TORCH_CHECK(o.is_contiguous(), "euler_update_: next_input must be contiguous");
    TORCH_CHECK(at::isFloatingType(o.scalar_type()),
                "euler_update_: next_input must be floating-point, got ", o.scalar_type());
    TORCH_CHECK(o.device() == state.device(), "euler_update_: next_input is on ", o.device(),
                ", state on ", state.device());
  }
  return h.to(state.scalar_type()).contiguous();
}

// Checks of the masked update's extra arguments (tau, k, j); state/v/h as above.
inline void check_masked_args(const at::Tensor& state, const at::Tensor& tau, const at::Tensor& k,
                              int64_t j) {
  const int64_t n = state.size(0);
  TORCH_CHECK(tau.scalar_type() == state.scalar_type(), "euler_update_masked_: tau must have ",
              "the state's dtype ", state.scalar_type(), ", got ", tau.scalar_type());
  TORCH_CHECK(tau.dim() == 1 && tau.size(0) == n, "euler_update_masked_: tau must have shape (",
              n, ",), got ", tau.sizes());
  TORCH_CHECK(tau.is_contiguous(), "euler_update_masked_: tau must be contiguous");
  TORCH_CHECK(tau.device() == state.device(), "euler_update_masked_: tau is on ", tau.device(),
              ", state on ", state.device());
  TORCH_CHECK(k.scalar_type() == at::kLong, "euler_update_masked_: k must be int64, got ",
              k.scalar_type());
  TORCH_CHECK(k.dim() == 1 && k.size(0) == n, "euler_update_masked_: k must have shape (", n,
              ",), got ", k.sizes());
  TORCH_CHECK(k.device() == state.device(), "euler_update_masked_: k is on ", k.device(),
              ", state on ", state.device());
  TORCH_CHECK(j >= 0, "euler_update_masked_: j must be >= 0, got ", j);
}

inline void check_plan_args(const at::Tensor& k, const at::Tensor& t0, const at::Tensor& step,
                            const c10::optional<int64_t>& kmax) {
  TORCH_CHECK(!kmax.has_value() || *kmax >= 0, "rollout_plan: kmax must be >= 0, got ",
              kmax.value_or(0));
  TORCH_CHECK(k.scalar_type() == at::kLong, "rollout_plan: k must be int64, got ",
              k.scalar_type());
  TORCH_CHECK(k.dim() == 1, "rollout_plan: k must have shape (B,), got ", k.sizes());
  const int64_t b = k.size(0);
  TORCH_CHECK(t0.dim() == 1 && t0.size(0) == b, "rollout_plan: t0 must have shape (", b,
              ",), got ", t0.sizes());
  TORCH_CHECK(step.dim() == 1 && step.size(0) == b, "rollout_plan: step must have shape (", b,
              ",), got ", step.sizes());
  TORCH_CHECK(at::isFloatingType(t0.scalar_type()) && step.scalar_type() == t0.scalar_type(),
              "rollout_plan: t0 and step must share one floating-point dtype, got ",
              t0.scalar_type(), " and ", step.scalar_type());
  TORCH_CHECK(t0.device() == k.device() && step.device() == k.device(),
              "rollout_plan: k, t0 and step must be on one device");
}

}  // namespace reflexflow
