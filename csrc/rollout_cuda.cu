// CUDA kernels of the reflexflow rollout ops (schemas in ops.cpp).
// Reference twin: reflexflow/rollout.py. Same semantics as rollout.cpp: the product
// h * v and the sum are rounded separately (no FMA contraction), like PyTorch's
// `state += h * v`, so the CUDA path matches the CPU path bit for bit.
//
// Launch rules: every kernel runs on the current stream of its tensors' device (under a
// device guard), so it is ordered with PyTorch's work and captured by CUDA graphs; grids
// are 1-D (x up to 2^31 - 1, capped here at 65535 blocks with grid-stride loops), offsets
// are int64; every launch is checked. Only the plan op with kmax=None reads the device
// (one transfer of (min k, max k)); the update ops never synchronise.
#include "rollout.h"

#include <ATen/Dispatch.h>
#include <ATen/ops/aminmax.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/stack.h>
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/VirtualGuardImpl.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

// Only device-generic c10 headers (no c10/cuda): the file then also compiles against a
// CPU wheel's headers, which is how CI proves it compiles without a GPU.
#include <cuda_runtime.h>

#include <algorithm>

#define RF_CUDA_CHECK_LAUNCH()                                                        \
  do {                                                                                \
    const cudaError_t err_ = cudaGetLastError();                                      \
    TORCH_CHECK(err_ == cudaSuccess, "reflexflow CUDA kernel launch failed: ",         \
                cudaGetErrorString(err_));                                            \
  } while (0)

namespace reflexflow {
namespace {

cudaStream_t current_stream(const at::Device& device) {
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(device).native_handle());
}

__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
template <typename T>
__device__ __forceinline__ T add_rn(T a, T b) { return static_cast<T>(add_rn(float(a), float(b))); }

constexpr int kPlanThreads = 1024;
constexpr int kEulerThreads = 256;
constexpr int64_t kMaxBlocks = 65535;

// One block. rank_i = #{k_j > k_i} + #{j < i : k_j == k_i} (a stable descending sort,
// O(B^2 / threads): training batches are small); then steps, times and counts for the
// first kmax steps. __launch_bounds__ caps registers so that 1024 threads always launch.
template <typename T>
__global__ void __launch_bounds__(kPlanThreads)
    plan_kernel(const int64_t* __restrict__ k, const T* __restrict__ t0,
                const T* __restrict__ step, int64_t b, int64_t kmax,
                int64_t* __restrict__ order, int64_t* __restrict__ counts,
                T* __restrict__ times, T* __restrict__ steps) {
  for (int64_t i = threadIdx.x; i < b; i += blockDim.x) {
    const int64_t ki = k[i];
    int64_t rank = 0;
    for (int64_t j = 0; j < b; ++j) {
      const int64_t kj = k[j];
      rank += (kj > ki) || (kj == ki && j < i);
    }
    order[rank] = i;
    steps[rank] = step[i];
    T tau = t0[i];
    for (int64_t j = 0; j < kmax; ++j) {
      times[j * b + rank] = tau;
      tau = add_rn(tau, step[i]);
    }
  }
  for (int64_t j = threadIdx.x; j < kmax; j += blockDim.x) {
    int64_t c = 0;
    for (int64_t i = 0; i < b; ++i) c += k[i] > j;
    counts[j] = c;
  }
}

PlanResult rollout_plan_cuda(const at::Tensor& k_in, const at::Tensor& t0_in,
                             const at::Tensor& step_in, c10::optional<int64_t> kmax_in) {
  check_plan_args(k_in, t0_in, step_in, kmax_in);
  const c10::DeviceGuard guard(k_in.device());
  const at::Tensor k = k_in.contiguous();
  const int64_t b = k.size(0);
  int64_t kmax = kmax_in.value_or(0);
  if (!kmax_in.has_value() && b > 0) {  // one host read: (min k, max k) in one transfer
    const auto mm = at::aminmax(k);
    const at::Tensor host = at::stack({std::get<0>(mm), std::get<1>(mm)}).to(at::kCPU);
    const int64_t* hp = host.data_ptr<int64_t>();
    TORCH_CHECK(hp[0] >= 0, "rollout_plan: k must be >= 0, got min ", hp[0]);
    kmax = hp[1];
  }
  const at::Tensor t0 = t0_in.contiguous();
  const at::Tensor step = step_in.contiguous();
  at::Tensor order = at::empty({b}, k.options());
  at::Tensor counts = at::empty({kmax}, k.options());
  at::Tensor times = at::empty({kmax, b}, t0.options());
  at::Tensor steps = at::empty({b}, step.options());
  if (b == 0) {
    counts.zero_();
    return {order, counts, times, steps};
  }
  cudaStream_t stream = current_stream(k.device());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t0.scalar_type(), "rollout_plan", [&] {
    plan_kernel<scalar_t><<<1, kPlanThreads, 0, stream>>>(
        k.data_ptr<int64_t>(), t0.data_ptr<scalar_t>(), step.data_ptr<scalar_t>(), b, kmax,
        order.data_ptr<int64_t>(), counts.data_ptr<int64_t>(), times.data_ptr<scalar_t>(),
        steps.data_ptr<scalar_t>());
    RF_CUDA_CHECK_LAUNCH();
  });
  return {order, counts, times, steps};
}

// s[i] = s[i] + h[r] * S(v[i]) for the element i of row r; optionally o[i] = O(s[i]).
// MASKED: only on the rows with k[r] > j_step, and then tau[r] += h[r] for those rows.
// Grid-stride loop; the row of i is advanced incrementally (no 64-bit division per element).
template <typename S, typename V, typename O, bool WRITE, bool MASKED>
__global__ void __launch_bounds__(kEulerThreads)
    euler_kernel(S* __restrict__ s, const V* __restrict__ v, const S* __restrict__ h,
                 int64_t h_stride, O* __restrict__ o, int64_t total, int64_t row,
                 const int64_t* __restrict__ k, int64_t j_step, S* __restrict__ tau, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row_step = stride / row;
  const int64_t col_step = stride % row;
  int64_t r = first / row;
  int64_t c = first % row;
  for (int64_t i = first; i < total; i += stride) {
    if (!MASKED || k[r] > j_step) {
      const S x = add_rn(s[i], mul_rn(h[r * h_stride], static_cast<S>(v[i])));
      s[i] = x;
      if constexpr (WRITE) o[i] = static_cast<O>(x);
    }
    r += row_step;
    c += col_step;
    if (c >= row) {
      c -= row;
      ++r;
    }
  }
  if constexpr (MASKED) {
    for (int64_t q = first; q < n; q += stride) {
      if (k[q] > j_step) tau[q] = add_rn(tau[q], h[q * h_stride]);
    }
  }
}

template <typename S, typename V, typename O, bool WRITE, bool MASKED>
void launch_euler(S* s, const V* v, const S* h, int64_t h_stride, O* o, int64_t total,
                  int64_t row, const int64_t* k, int64_t j_step, S* tau, int64_t n,
                  cudaStream_t stream) {
  const int64_t work = std::max<int64_t>(total, MASKED ? n : 0);
  const int64_t want = (work + kEulerThreads - 1) / kEulerThreads;
  const int blocks = static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(want, kMaxBlocks)));
  euler_kernel<S, V, O, WRITE, MASKED><<<blocks, kEulerThreads, 0, stream>>>(
      s, v, h, h_stride, o, total, row, k, j_step, tau, n);
  RF_CUDA_CHECK_LAUNCH();
}

// Dispatch over (state, v, next_input) dtypes; k == nullptr: the unmasked update.
void euler_dispatch(at::Tensor& state, const at::Tensor& v, const at::Tensor& h,
                    const c10::optional<at::Tensor>& next_input, const int64_t* k,
                    int64_t j_step, at::Tensor* tau) {
  const int64_t n = state.size(0);
  const int64_t total = state.numel();
  const int64_t row = total > 0 ? total / n : 1;
  const int64_t h_stride = h.numel() == 1 ? 0 : 1;
  cudaStream_t stream = current_stream(state.device());
  AT_DISPATCH_FLOATING_TYPES(state.scalar_type(), "euler_update_state", [&] {
    using S = scalar_t;
    S* sp = state.data_ptr<S>();
    const S* hp = h.data_ptr<S>();
    S* tp = tau == nullptr ? nullptr : tau->data_ptr<S>();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, v.scalar_type(),
                                    "euler_update_v", [&] {
      using V = scalar_t;
      const V* vp = v.data_ptr<V>();
      if (!next_input.has_value()) {
        if (k == nullptr) {
          launch_euler<S, V, S, false, false>(sp, vp, hp, h_stride, nullptr, total, row, k,
                                              j_step, tp, n, stream);
        } else {
          launch_euler<S, V, S, false, true>(sp, vp, hp, h_stride, nullptr, total, row, k,
                                             j_step, tp, n, stream);
        }
        return;
      }
      at::Tensor o = *next_input;
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(),
                                      "euler_update_out", [&] {
        using O = scalar_t;
        O* outp = o.data_ptr<O>();
        if (k == nullptr) {
          launch_euler<S, V, O, true, false>(sp, vp, hp, h_stride, outp, total, row, k, j_step,
                                             tp, n, stream);
        } else {
          launch_euler<S, V, O, true, true>(sp, vp, hp, h_stride, outp, total, row, k, j_step,
                                            tp, n, stream);
        }
      });
    });
  });
}

void euler_update_cuda(at::Tensor& state, const at::Tensor& v_in, const at::Tensor& h_in,
                       const c10::optional<at::Tensor>& next_input) {
  const at::Tensor h = check_euler_args(state, v_in, h_in, next_input);
  if (state.numel() == 0) return;
  const c10::DeviceGuard guard(state.device());
  const at::Tensor v = v_in.contiguous();  // a copy only when v is not contiguous
  euler_dispatch(state, v, h, next_input, nullptr, 0, nullptr);
}

void euler_update_masked_cuda(at::Tensor& state, at::Tensor& tau, const at::Tensor& v_in,
                              const at::Tensor& h_in, const at::Tensor& k_in, int64_t j,
                              const c10::optional<at::Tensor>& next_input) {
  const at::Tensor h = check_euler_args(state, v_in, h_in, next_input);
  check_masked_args(state, tau, k_in, j);
  if (state.size(0) == 0) return;
  const c10::DeviceGuard guard(state.device());
  const at::Tensor v = v_in.contiguous();
  const at::Tensor k = k_in.contiguous();
  euler_dispatch(state, v, h, next_input, k.data_ptr<int64_t>(), j, &tau);
}

}  // namespace

TORCH_LIBRARY_IMPL(reflexflow, CUDA, m) {
  m.impl("rollout_plan", &rollout_plan_cuda);
  m.impl("euler_update_", &euler_update_cuda);
  m.impl("euler_update_masked_", &euler_update_masked_cuda);
}

}  // namespace reflexflow
