// CUDA multi-tensor SGD with momentum and weight decay, in place: fused_sgd_ (host wrapper and
// op registration: ops_cuda.cu).
//
// Per element (PyTorch SGD, dampening 0, no nesterov), float32 math, one rounding per stored
// value:  d = g + wd * p ;  b = mom * b + d ;  p = p - lr * b.
// Explicit __fmul_rn/__fadd_rn keep the compiler from contracting to FMA, so float32 results
// match the op-by-op PyTorch computation bit for bit (16-bit params differ from PyTorch's
// op-by-op rounding by at most one rounding step, since intermediates stay float32 here).
//
// One launch for all tensors: the segment table (cuda_utils.cuh) maps 8192-element chunks to
// tensors; each block walks chunks grid-stride, 4 elements per access (16 B for float32) with
// two groups of 3 loads in flight per thread. Optional hist1 (int64[4096], zeroed by the
// caller) receives the D1 histogram (key >> 19) of the *stored* (rounded) updated params:
// a per-block 4096-bin shared histogram (dynamic shared memory, only when hist1 is given),
// non-zero bins merged with global 64-bit atomics at the end. topk_masks_hist then skips its
// first pass.
//
// Optional skip (one bool on the device, e.g. a found-non-finite flag computed on the device):
// every thread reads it once; when true nothing is stored (params and buffers keep their
// values, no host synchronisation) and hist1, when given, receives the histogram of the
// unchanged params, so the caller's next topk_masks_hist stays exact.
//
// Bytes moved per element: read p, g, b + write p, b = 5 x sizeof(T) (20 B for float32); no
// FLOP concern (5 flops/element). Target >= 70% of DRAM bandwidth on H100.
//
// Layout: params/buffers that are not dense (non-overlapping, no gaps) are updated through
// contiguous copies that are copied back (extra traffic, correct); grads/buffers whose strides
// differ from the param's (e.g. channels_last param, contiguous grad) are first copied into the
// param's layout. Dense tensors with equal strides (the normal case, channels_last included)
// are processed in memory order, which is fine for an elementwise update and an
// order-independent histogram. grads and momentum_buffers must have the dtype of their param.
#include "kernels.cuh"

namespace bip_fast {
namespace cuda {
namespace {

using radix::kRadixBins;
constexpr int kSgdUnroll = 2;

struct SgdCoef {
  float lr, mom, wd;
};

__device__ __forceinline__ void sgd_math(float& p, float g, float& b, const SgdCoef& c) {
  const float d = __fadd_rn(g, __fmul_rn(c.wd, p));
  b = __fadd_rn(__fmul_rn(c.mom, b), d);
  p = __fsub_rn(p, __fmul_rn(c.lr, b));
}

template <typename T, bool HIST>
__device__ __forceinline__ void sgd_chunk(T* __restrict__ p, const T* __restrict__ g,
                                          T* __restrict__ b, bool vec_ok, int64_t cs, int64_t ce,
                                          const SgdCoef& c, bool upd, unsigned int* sh) {
  int64_t scalar_from = cs;
  if (vec_ok) {
    const int64_t ngroups = (ce - cs) >> 2;
    const int64_t step = static_cast<int64_t>(blockDim.x) * kSgdUnroll;
    for (int64_t g0 = threadIdx.x; g0 < ngroups; g0 += step) {
      float pv[kSgdUnroll][4], gv[kSgdUnroll][4], bv[kSgdUnroll][4];
#pragma unroll
      for (int u = 0; u < kSgdUnroll; ++u) {
        const int64_t gi = g0 + static_cast<int64_t>(u) * blockDim.x;
        if (gi < ngroups) {
          const int64_t i = cs + 4 * gi;
          Elem<T>::load4(p, i, pv[u]);
          Elem<T>::load4(g, i, gv[u]);
          Elem<T>::load4(b, i, bv[u]);
        }
      }
#pragma unroll
      for (int u = 0; u < kSgdUnroll; ++u) {
        const int64_t gi = g0 + static_cast<int64_t>(u) * blockDim.x;
        if (gi < ngroups) {
          const int64_t i = cs + 4 * gi;
          if (upd) {
#pragma unroll
            for (int j = 0; j < 4; ++j) sgd_math(pv[u][j], gv[u][j], bv[u][j], c);
            Elem<T>::store4(p, i, pv[u]);
            Elem<T>::store4(b, i, bv[u]);
          }
          if (HIST) {
#pragma unroll
            for (int j = 0; j < 4; ++j) {
              atomicAdd(&sh[radix::digit1(key_of(Elem<T>::round(pv[u][j])))], 1u);
            }
          }
        }
      }
    }
    scalar_from = cs + 4 * ngroups;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < ce; i += blockDim.x) {
    float pv = Elem<T>::load(p, i);
    if (upd) {
      float bv = Elem<T>::load(b, i);
      sgd_math(pv, Elem<T>::load(g, i), bv, c);
      Elem<T>::store(p, i, pv);
      Elem<T>::store(b, i, bv);
    }
    if (HIST) atomicAdd(&sh[radix::digit1(key_of(Elem<T>::round(pv)))], 1u);
  }
}

template <bool HIST>
__global__ void __launch_bounds__(kThreads)
fused_sgd_kernel(const SgdSeg* __restrict__ segs, int nseg, int64_t nchunks, SgdCoef c,
                 int64_t* __restrict__ hist1, const bool* __restrict__ skip) {
  extern __shared__ unsigned int sh[];  // kRadixBins entries when HIST, else unused
  const bool upd = skip == nullptr || !*skip;
  if (!HIST && !upd) return;
  if (HIST) {
    for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x) sh[i] = 0u;
    __syncthreads();
  }
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const SgdSeg seg = segs[find_seg(segs, nseg, chunk)];
    const int64_t cs = (chunk - seg.chunk_begin) * kChunk;
    const int64_t ce = min(seg.numel, cs + kChunk);
    with_elem_type(seg.dtype, [&](auto* tag) {
      using T = typename std::remove_pointer<decltype(tag)>::type;
      sgd_chunk<T, HIST>(static_cast<T*>(seg.p), static_cast<const T*>(seg.g),
                         static_cast<T*>(seg.b), seg.vec_ok != 0, cs, ce, c, upd, sh);
    });
  }
  if (HIST) {
    __syncthreads();
    for (int i = threadIdx.x; i < kRadixBins; i += blockDim.x) {
      const unsigned int n = sh[i];
      if (n != 0u) {
        atomicAdd(reinterpret_cast<unsigned long long*>(hist1 + i),
                  static_cast<unsigned long long>(n));
      }
    }
  }
}

}  // namespace

cudaError_t launch_fused_sgd(const SgdSeg* segs, int nseg, int64_t nchunks, int grid, float lr,
                             float momentum, float weight_decay, int64_t* hist1,
                             const bool* skip, cudaStream_t stream) {
  const SgdCoef c{lr, momentum, weight_decay};
  if (hist1 != nullptr) {
    fused_sgd_kernel<true><<<grid, kThreads, kRadixBins * sizeof(unsigned int), stream>>>(
        segs, nseg, nchunks, c, hist1, skip);
  } else {
    fused_sgd_kernel<false><<<grid, kThreads, 0, stream>>>(segs, nseg, nchunks, c, nullptr, skip);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bip_fast
