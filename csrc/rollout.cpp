// CPU kernels of the reflexflow rollout ops (schemas in ops.cpp).
// Reference twin: reflexflow/rollout.py.
#include "rollout.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace reflexflow {
namespace {

// Stable counting sort of k (>= 0) in descending order, O(B + max k). The plan has
// K = kmax steps if given, else max k: counts[j] = #{k_i > j} (0 past max k) and times[j]
// for j < K.
PlanResult rollout_plan_cpu(const at::Tensor& k_in, const at::Tensor& t0_in,
                            const at::Tensor& step_in, c10::optional<int64_t> kmax_in) {
  check_plan_args(k_in, t0_in, step_in, kmax_in);
  const at::Tensor k = k_in.contiguous();
  const int64_t b = k.size(0);
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t kmax = 0;
  for (int64_t i = 0; i < b; ++i) {
    TORCH_CHECK(kp[i] >= 0, "rollout_plan: k must be >= 0, got k[", i, "] = ", kp[i]);
    kmax = std::max(kmax, kp[i]);
  }
  const int64_t steps_out = kmax_in.value_or(kmax);
  // hist[v] = #{k_i == v}; start[v] = first rank of value v in descending order.
  std::vector<int64_t> hist(kmax + 1, 0);
  for (int64_t i = 0; i < b; ++i) hist[kp[i]] += 1;
  std::vector<int64_t> start(kmax + 2, 0);
  for (int64_t v = kmax; v >= 0; --v) start[v] = start[v + 1] + hist[v];
  // start[v] now counts #{k_i >= v}; the first rank of v is #{k_i > v} = start[v + 1].
  at::Tensor order = at::empty({b}, k.options());
  at::Tensor counts = at::empty({steps_out}, k.options());
  int64_t* op = order.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  for (int64_t j = 0; j < steps_out; ++j) cp[j] = j < kmax ? start[j + 1] : 0;
  std::vector<int64_t> next(kmax + 1);
  for (int64_t v = 0; v <= kmax; ++v) next[v] = start[v + 1];
  for (int64_t i = 0; i < b; ++i) op[next[kp[i]]++] = i;

  const at::Tensor t0 = t0_in.contiguous();
  const at::Tensor step = step_in.contiguous();
  at::Tensor times = at::empty({steps_out, b}, t0.options());
  at::Tensor steps = at::empty({b}, step.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t0.scalar_type(), "rollout_plan", [&] {
    const scalar_t* tp = t0.data_ptr<scalar_t>();
    const scalar_t* hp = step.data_ptr<scalar_t>();
    scalar_t* sp = steps.data_ptr<scalar_t>();
    scalar_t* tt = times.data_ptr<scalar_t>();
    for (int64_t r = 0; r < b; ++r) {
      const int64_t i = op[r];
      sp[r] = hp[i];
      scalar_t tau = tp[i];
      // the same accumulation as the loop: tau = tau + h, j times
      for (int64_t j = 0; j < steps_out; ++j) {
        tt[j * b + r] = tau;
        tau = static_cast<scalar_t>(tau + hp[i]);
      }
    }
  });
  return {order, counts, times, steps};
}

// Output cast. float -> bfloat16 is c10's round-to-nearest-even written without a branch
// (NaN by a select), so that the compiler can vectorise the loop; the rest: static_cast.
template <typename O, typename S>
inline O cast_out(S x) {
  return static_cast<O>(x);
}

template <>
inline c10::BFloat16 cast_out<c10::BFloat16, float>(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = static_cast<uint16_t>(x != x ? 0x7FC0u : rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// s[j] = s[j] + h_r * S(v[j]) (product rounded, then sum rounded: no FMA, like
// `state += h * v` in PyTorch), optionally o[j] = O(s[j]). MASKED: only the rows r with
// k[r] > j_step; the other rows are not touched.
template <typename S, typename V, typename O, bool WRITE, bool MASKED>
void euler_rows(S* __restrict__ s, const V* __restrict__ v, const S* __restrict__ h,
                int64_t h_stride, O* __restrict__ o, int64_t n, int64_t row,
                const int64_t* __restrict__ k, int64_t j_step) {
  const int64_t total = n * row;
  const int64_t grain = std::max<int64_t>(row, 32768);
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) {
    int64_t i = begin;
    while (i < end) {
      const int64_t r = i / row;
      const int64_t stop = std::min(end, (r + 1) * row);
      if constexpr (MASKED) {
        if (k[r] <= j_step) {
          i = stop;
          continue;
        }
      }
      const S hr = h[r * h_stride];
      S* __restrict__ sr = s + i;
      const V* __restrict__ vr = v + i;
      O* __restrict__ orow = WRITE ? o + i : nullptr;
      const int64_t len = stop - i;
#pragma GCC ivdep
      for (int64_t c = 0; c < len; ++c) {
        const S prod = hr * static_cast<S>(vr[c]);
        const S x = sr[c] + prod;
        sr[c] = x;
        if constexpr (WRITE) orow[c] = cast_out<O, S>(x);
      }
      i = stop;
    }
  });
}

// Dispatch of euler_rows over (state, v, next_input) dtypes; k == nullptr: unmasked.
void euler_dispatch(at::Tensor& state, const at::Tensor& v, const at::Tensor& h,
                    const c10::optional<at::Tensor>& next_input, const int64_t* k,
                    int64_t j_step) {
  const int64_t n = state.size(0);
  const int64_t row = state.numel() / n;
  const int64_t h_stride = h.numel() == 1 ? 0 : 1;
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "euler_update_state", [&] {
    using S = scalar_t;
    S* sp = state.data_ptr<S>();
    const S* hp = h.data_ptr<S>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                    "euler_update_v", [&] {
      using V = scalar_t;
      const V* vp = v.data_ptr<V>();
      if (!next_input.has_value()) {
        if (k == nullptr) {
          euler_rows<S, V, S, false, false>(sp, vp, hp, h_stride, nullptr, n, row, k, j_step);
        } else {
          euler_rows<S, V, S, false, true>(sp, vp, hp, h_stride, nullptr, n, row, k, j_step);
        }
        return;
      }
      at::Tensor o = *next_input;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(),
                                      "euler_update_out", [&] {
        using O = scalar_t;
        O* outp = o.data_ptr<O>();
        if (k == nullptr) {
          euler_rows<S, V, O, true, false>(sp, vp, hp, h_stride, outp, n, row, k, j_step);
        } else {
          euler_rows<S, V, O, true, true>(sp, vp, hp, h_stride, outp, n, row, k, j_step);
        }
      });
    });
  });
}

void euler_update_cpu(at::Tensor& state, const at::Tensor& v_in, const at::Tensor& h_in,
                      const c10::optional<at::Tensor>& next_input) {
  const at::Tensor h = check_euler_args(state, v_in, h_in, next_input);
  if (state.numel() == 0) return;
  const at::Tensor v = v_in.contiguous();  // a copy only when v is not contiguous
  euler_dispatch(state, v, h, next_input, nullptr, 0);
}

void euler_update_masked_cpu(at::Tensor& state, at::Tensor& tau, const at::Tensor& v_in,
                             const at::Tensor& h_in, const at::Tensor& k_in, int64_t j,
                             const c10::optional<at::Tensor>& next_input) {
  const at::Tensor h = check_euler_args(state, v_in, h_in, next_input);
  check_masked_args(state, tau, k_in, j);
  const int64_t n = state.size(0);
  const at::Tensor k = k_in.contiguous();
  const int64_t* kp = k.data_ptr<int64_t>();
  if (state.numel() > 0) {
    const at::Tensor v = v_in.contiguous();
    euler_dispatch(state, v, h, next_input, kp, j);
  }
  const int64_t h_stride = h.numel() == 1 ? 0 : 1;
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "euler_update_masked_tau", [&] {
    scalar_t* tp = tau.data_ptr<scalar_t>();
    const scalar_t* hp = h.data_ptr<scalar_t>();
    for (int64_t r = 0; r < n; ++r) {
      if (kp[r] > j) tp[r] = tp[r] + hp[r * h_stride];
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(reflexflow, CPU, m) {
  m.impl("rollout_plan", &rollout_plan_cpu);
  m.impl("euler_update_", &euler_update_cpu);
  m.impl("euler_update_masked_", &euler_update_masked_cpu);
}

}  // namespace reflexflow
