// CUDA elementwise kernels of the masked weight: masked_weight and masked_weight_backward
// (host wrappers and op registration: ops_cuda.cu).
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
// written; backward 4 + 4 + 1 + 4 read, 4 + 4 written (outputs skipped when not needed; theta
// and scores are not read when gscores is not needed). No FLOP concern (< 10 flops/element).
// Inputs are read through .contiguous(); outputs are contiguous tensors of the input shape.
//
// Why MaskedConv2d keeps the convolution in cuDNN/ATen and fuses only around it: a conv layer's
// weight is tiny next to its activations (ResNet-18's largest, 2.4M weights, against 128 x 512 x
// 4 x 4 x 2 activations per pass at batch 128), so masking costs one weight-sized pass in each
// direction while the convolution itself is bound by cuDNN's tuned implicit-GEMM/Winograd/FFT
// kernels, tensor cores and layouts. Re-implementing those to save one weight-sized read
// would lose far more than it saves; what remains is to make every weight-sized step a single
// fused pass: this forward (one read of theta and mask), and this backward, which turns cuDNN's
// weight gradient g into both dtheta and the score gradient G_s in one pass.
#include "kernels.cuh"

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

// Conversions to/from the accumulation type (explicit intrinsics: PyTorch builds with the
// implicit __half / __nv_bfloat16 conversions disabled).
template <typename A, typename T> struct Cvt;
template <typename A> struct Cvt<A, float> {
  __device__ __forceinline__ static A to(float x) { return static_cast<A>(x); }
  __device__ __forceinline__ static float from(A x) { return static_cast<float>(x); }
};
template <typename A> struct Cvt<A, double> {
  __device__ __forceinline__ static A to(double x) { return static_cast<A>(x); }
  __device__ __forceinline__ static double from(A x) { return static_cast<double>(x); }
};
template <typename A> struct Cvt<A, __half> {
  __device__ __forceinline__ static A to(__half x) { return static_cast<A>(__half2float(x)); }
  __device__ __forceinline__ static __half from(A x) {
    return __float2half_rn(static_cast<float>(x));
  }
};
template <typename A> struct Cvt<A, __nv_bfloat16> {
  __device__ __forceinline__ static A to(__nv_bfloat16 x) {
    return static_cast<A>(__uint_as_float(static_cast<unsigned>(__bfloat16_as_ushort(x)) << 16));
  }
  __device__ __forceinline__ static __nv_bfloat16 from(A x) {
    return __float2bfloat16_rn(static_cast<float>(x));
  }
};

template <typename A, typename B>
using acc_type_t = typename std::conditional<std::is_same<A, double>::value ||
                                                 std::is_same<B, double>::value,
                                             double, float>::type;

// ---- forward ----
template <typename T>
__global__ void __launch_bounds__(kThreads)
masked_weight_kernel(const T* __restrict__ theta, const bool* __restrict__ mask,
                     T* __restrict__ out, int64_t n, bool vec_ok) {
  using acc_t = acc_type_t<T, T>;
  using C = Cvt<acc_t, T>;
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
      z.v[j] = C::from(C::to(t.v[j]) * mj);
    }
    store_pack(out, i, z);
  }
  for (int64_t i = 4 * ngroups + tid; i < n; i += stride) {
    const acc_t mj = mask[i] ? acc_t(1) : acc_t(0);
    out[i] = C::from(C::to(theta[i]) * mj);
  }
}

// ---- backward ----
template <typename T, typename S>
__device__ __forceinline__ void backward_one(T g, T th, bool mk, S s, float ig, T* dth_out,
                                             S* gs_out) {
  using acc_t = acc_type_t<T, S>;
  const acc_t gf = Cvt<acc_t, T>::to(g);
  const acc_t mf = mk ? acc_t(1) : acc_t(0);
  if (dth_out != nullptr) *dth_out = Cvt<acc_t, T>::from(mf * gf);
  if (gs_out != nullptr) {
    const acc_t r = Cvt<acc_t, T>::to(th) * gf - static_cast<acc_t>(ig) * mf * gf * gf;
    *gs_out = Cvt<acc_t, S>::from(Cvt<acc_t, S>::to(s) >= acc_t(0) ? r : -r);
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
    Pack4<T> tv = gv;  // placeholder values when gscores is not needed (never stored)
    Pack4<S> sv;
    if (need_scores) {
      tv = load_pack(theta, i);
      sv = load_pack(scores, i);
    }
    Pack4<T> dt;
    Pack4<S> gs;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      backward_one<T, S>(gv.v[j], tv.v[j], ((m >> (8 * j)) & 0xffu) != 0u, sv.v[j], ig,
                         &dt.v[j], need_scores ? &gs.v[j] : nullptr);
    }
    if (dtheta != nullptr) store_pack(dtheta, i, dt);
    if (need_scores) store_pack(gscores, i, gs);
  }
  for (int64_t i = 4 * ngroups + tid; i < n; i += stride) {
    const T gi = grad[i];
    backward_one<T, S>(gi, need_scores ? theta[i] : gi, mask[i],
                       need_scores ? scores[i] : S(), ig,
                       dtheta != nullptr ? dtheta + i : nullptr,
                       need_scores ? gscores + i : nullptr);
  }
}

// Calls f(T*) with a null pointer of the element type of a dtype code (host side).
template <typename F>
void host_with_type(int32_t code, const F& f) {
  switch (code) {
    case kF32: f(static_cast<float*>(nullptr)); break;
    case kF16: f(static_cast<__half*>(nullptr)); break;
    case kBF16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: f(static_cast<double*>(nullptr)); break;
  }
}

}  // namespace

cudaError_t launch_masked_weight(int32_t dtype, const void* theta, const bool* mask, void* out,
                                 int64_t n, bool vec_ok, int grid, cudaStream_t stream) {
  host_with_type(dtype, [&](auto* tag) {
    using T = typename std::remove_pointer<decltype(tag)>::type;
    masked_weight_kernel<T><<<grid, kThreads, 0, stream>>>(
        static_cast<const T*>(theta), mask, static_cast<T*>(out), n, vec_ok);
  });
  return cudaGetLastError();
}

cudaError_t launch_masked_weight_backward(int32_t theta_dtype, int32_t score_dtype,
                                          const void* grad, const void* theta, const bool* mask,
                                          const void* scores, float ig, void* dtheta,
                                          void* gscores, int64_t n, bool vec_ok, int grid,
                                          cudaStream_t stream) {
  host_with_type(theta_dtype, [&](auto* ttag) {
    using T = typename std::remove_pointer<decltype(ttag)>::type;
    host_with_type(score_dtype, [&](auto* stag) {
      using S = typename std::remove_pointer<decltype(stag)>::type;
      masked_weight_backward_kernel<T, S><<<grid, kThreads, 0, stream>>>(
          static_cast<const T*>(grad), static_cast<const T*>(theta), mask,
          static_cast<const S*>(scores), ig, static_cast<T*>(dtheta), static_cast<S*>(gscores),
          n, vec_ok);
    });
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bip_fast
