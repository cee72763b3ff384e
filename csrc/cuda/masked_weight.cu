// CUDA elementwise kernels of the masked weight: masked_weight and masked_weight_backward.
//
//   forward   z = theta * mask                          (mask bool; dtype of theta)
//   backward  dtheta  = mask * g                        (dtype of theta; skipped if !need_theta)
//             gscores = sgn(s) * (theta*g - ig * mask * g*g), sgn(0) = +1
//                                                       (dtype of scores; skipped if !need_scores)
// Math in float32 (float64 when theta or scores is float64). The products are real
// multiplications by 0/1, so masked-out entries are signed zeros (and NaN*0 stays NaN) exactly
// as in `theta * mask` in PyTorch.
//
// One pass each, grid-stride over groups of 4 elements: 16 B loads/stores for float32, 8 B for
// 16-bit types, 4 B (4 bools) for the mask; scalar path when any pointer is not aligned to a
// group, and for the (numel % 4) tail. Bytes per element (float32): forward 4 + 1 read, 4
// written; backward 4 + 4 + 1 + 4 read, 4 + 4 written (outputs skipped when not needed).
// Inputs are read through .contiguous(); outputs are contiguous tensors of the input shape.
// grad is converted to theta's dtype first if it differs (one extra copy).
#include <torch/library.h>

#include <ATen/Dispatch.h>
#include <type_traits>

#include "cuda_utils.cuh"

namespace bip_fast {
namespace cuda {
namespace {

template <typename T>
struct alignas(4 * sizeof(T)) Pack4 {
  T v[4];
};

template <typename T>
__device__ __forceinline__ Pack4<T> load_pack(const T* p, int64_t i) {
  return *reinterpret_cast<const Pack4<T>*>(p + i);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, int64_t i, const Pack4<T>& x) {
  *reinterpret_cast<Pack4<T>*>(p + i) = x;
}

template <typename A, typename B>
using acc_type_t = typename std::conditional<std::is_same<A, double>::value ||
                                                 std::is_same<B, double>::value,
                                             double, float>::type;

int elementwise_grid(int64_t work_items) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t need = (work_items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSM;
  return static_cast<int>(std::max<int64_t>(1, std::min(need, cap)));
}

// ---- forward ----
template <typename T>
__global__ void __launch_bounds__(kThreads)
masked_weight_kernel(const T* __restrict__ theta, const bool* __restrict__ mask,
                     T* __restrict__ out, int64_t n, bool vec_ok) {
  using acc_t = acc_type_t<T, T>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t ngroups = vec_ok ? (n >> 2) : 0;
  for (int64_t g = tid; g < ngroups; g += stride) {
    const int64_t i = 4 * g;
    const Pack4<T> t = load_pack(theta, i);
    const uint32_t m = *reinterpret_cast<const uint32_t*>(mask + i);
    Pack4<T> z;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const acc_t mj = ((m >> (8 * j)) & 0xffu) ? acc_t(1) : acc_t(0);
      z.v[j] = static_cast<T>(static_cast<acc_t>(t.v[j]) * mj);
    }
    store_pack(out, i, z);
  }
  for (int64_t i = 4 * ngroups + tid; i < n; i += stride) {
    const acc_t mj = mask[i] ? acc_t(1) : acc_t(0);
    out[i] = static_cast<T>(static_cast<acc_t>(theta[i]) * mj);
  }
}

// ---- backward ----
template <typename T, typename S>
__device__ __forceinline__ void backward_one(T g, T th, bool mk, S s, float ig, T* dth_out,
                                             S* gs_out) {
  using acc_t = acc_type_t<T, S>;
  const acc_t gf = static_cast<acc_t>(g);
  const acc_t mf = mk ? acc_t(1) : acc_t(0);
  if (dth_out != nullptr) *dth_out = static_cast<T>(mf * gf);
  if (gs_out != nullptr) {
    const acc_t r = static_cast<acc_t>(th) * gf - static_cast<acc_t>(ig) * mf * gf * gf;
    *gs_out = static_cast<S>(static_cast<acc_t>(s) >= acc_t(0) ? r : -r);
  }
}

template <typename T, typename S>
__global__ void __launch_bounds__(kThreads)
masked_weight_backward_kernel(const T* __restrict__ grad, const T* __restrict__ theta,
                              const bool* __restrict__ mask, const S* __restrict__ scores,
                              float ig, T* __restrict__ dtheta, S* __restrict__ gscores,
                              int64_t n, bool vec_ok) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t ngroups = vec_ok ? (n >> 2) : 0;
  const bool need_scores = gscores != nullptr;
  for (int64_t g = tid; g < ngroups; g += stride) {
    const int64_t i = 4 * g;
    const Pack4<T> gv = load_pack(grad, i);
    const uint32_t m = *reinterpret_cast<const uint32_t*>(mask + i);
    Pack4<T> tv{};
    Pack4<S> sv{};
    if (need_scores) {
      tv = load_pack(theta, i);
      sv = load_pack(scores, i);
    }
    Pack4<T> dt;
    Pack4<S> gs;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      backward_one<T, S>(gv.v[j], tv.v[j], ((m >> (8 * j)) & 0xffu) != 0u, sv.v[j], ig,
                         &dt.v[j], &gs.v[j]);
    }
    if (dtheta != nullptr) store_pack(dtheta, i, dt);
    if (need_scores) store_pack(gscores, i, gs);
  }
  for (int64_t i = 4 * ngroups + tid; i < n; i += stride) {
    const T th = need_scores ? theta[i] : T(0);
    const S s = need_scores ? scores[i] : S(0);
    backward_one<T, S>(grad[i], th, mask[i], s, ig, dtheta != nullptr ? dtheta + i : nullptr,
                       need_scores ? gscores + i : nullptr);
  }
}

// ---- host side ----
void check_mask(const at::Tensor& mask, const at::Tensor& theta, const char* op) {
  check_cuda_tensor(mask, theta.device(), op, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.sizes() == theta.sizes(), op, ": mask must have shape ", theta.sizes(),
              " like theta, got ", mask.sizes());
}

#define BIP_FAST_CUDA_DISPATCH_FLOATS(TYPE, NAME, ...)                                  \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::ScalarType::Half, at::ScalarType::BFloat16, TYPE, \
                                  NAME, __VA_ARGS__)

at::Tensor masked_weight_cuda(const at::Tensor& theta, const at::Tensor& mask) {
  const char* op = "bip_fast::masked_weight";
  check_cuda_tensor(theta, theta.device(), op, "theta");
  dtype_code(theta, op, "theta", -1);
  check_mask(mask, theta, op);
  const c10::cuda::CUDAGuard guard(theta.device());
  const at::Tensor t = theta.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out = at::empty(theta.sizes(), theta.options().memory_format(
                                                at::MemoryFormat::Contiguous));
  const int64_t n = t.numel();
  if (n == 0) return out;
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  BIP_FAST_CUDA_DISPATCH_FLOATS(t.scalar_type(), "bip_fast_masked_weight_cuda", [&] {
    const bool vec_ok = aligned_to(t.const_data_ptr(), 4 * sizeof(scalar_t)) &&
                        aligned_to(m.const_data_ptr(), 4) &&
                        aligned_to(out.data_ptr(), 4 * sizeof(scalar_t));
    masked_weight_kernel<scalar_t><<<elementwise_grid(vec_ok ? (n + 3) / 4 : n), kThreads, 0,
                                     stream>>>(t.const_data_ptr<scalar_t>(),
                                               m.const_data_ptr<bool>(),
                                               out.data_ptr<scalar_t>(), n, vec_ok);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_weight_backward_cuda(
    const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& mask,
    const at::Tensor& scores, double ig_scale, bool need_theta, bool need_scores) {
  const char* op = "bip_fast::masked_weight_backward";
  check_cuda_tensor(theta, theta.device(), op, "theta");
  dtype_code(theta, op, "theta", -1);
  check_cuda_tensor(grad, theta.device(), op, "grad");
  dtype_code(grad, op, "grad", -1);
  TORCH_CHECK(grad.sizes() == theta.sizes(), op, ": grad must have shape ", theta.sizes(),
              " like theta, got ", grad.sizes());
  check_mask(mask, theta, op);
  check_cuda_tensor(scores, theta.device(), op, "scores");
  dtype_code(scores, op, "scores", -1);
  TORCH_CHECK(scores.sizes() == theta.sizes(), op, ": scores must have shape ", theta.sizes(),
              " like theta, got ", scores.sizes());
  const c10::cuda::CUDAGuard guard(theta.device());

  const auto contig = at::MemoryFormat::Contiguous;
  at::Tensor dtheta = need_theta ? at::empty(theta.sizes(), theta.options().memory_format(contig))
                                 : at::empty({0}, theta.options());
  at::Tensor gscores = need_scores
                           ? at::empty(scores.sizes(), scores.options().memory_format(contig))
                           : at::empty({0}, scores.options());
  const int64_t n = theta.numel();
  if (n == 0 || (!need_theta && !need_scores)) return {dtheta, gscores};

  const at::Tensor g = grad.to(theta.scalar_type()).contiguous();
  const at::Tensor m = mask.contiguous();
  // theta and scores are only read for gscores.
  const at::Tensor t = need_scores ? theta.contiguous() : theta;
  const at::Tensor s = need_scores ? scores.contiguous() : scores;
  const float ig = static_cast<float>(ig_scale);
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();

  BIP_FAST_CUDA_DISPATCH_FLOATS(t.scalar_type(), "bip_fast_masked_weight_backward_cuda", [&] {
    using theta_t = scalar_t;
    BIP_FAST_CUDA_DISPATCH_FLOATS(s.scalar_type(), "bip_fast_masked_weight_backward_cuda", [&] {
      using score_t = scalar_t;
      const theta_t* tp = need_scores ? t.const_data_ptr<theta_t>() : nullptr;
      const score_t* sp = need_scores ? s.const_data_ptr<score_t>() : nullptr;
      theta_t* dp = need_theta ? dtheta.data_ptr<theta_t>() : nullptr;
      score_t* gp = need_scores ? gscores.data_ptr<score_t>() : nullptr;
      const int64_t vt = 4 * sizeof(theta_t);
      const int64_t vs = 4 * sizeof(score_t);
      const bool vec_ok = aligned_to(g.const_data_ptr(), vt) && aligned_to(m.const_data_ptr(), 4) &&
                          (tp == nullptr || aligned_to(tp, vt)) &&
                          (sp == nullptr || aligned_to(sp, vs)) &&
                          (dp == nullptr || aligned_to(dp, vt)) &&
                          (gp == nullptr || aligned_to(gp, vs));
      masked_weight_backward_kernel<theta_t, score_t>
          <<<elementwise_grid(vec_ok ? (n + 3) / 4 : n), kThreads, 0, stream>>>(
              g.const_data_ptr<theta_t>(), tp, m.const_data_ptr<bool>(), sp, ig, dp, gp, n,
              vec_ok);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return {dtheta, gscores};
}

}  // namespace

TORCH_LIBRARY_IMPL(bip_fast, CUDA, m) {
  m.impl("masked_weight", &masked_weight_cuda);
  m.impl("masked_weight_backward", &masked_weight_backward_cuda);
}

}  // namespace cuda
}  // namespace bip_fast
