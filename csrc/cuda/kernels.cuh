// Device-side building blocks of the bip_fast CUDA kernels, shared by topk.cu, fused_sgd.cu
// and masked_weight.cu, plus the launcher declarations that the host wrappers (ops_cuda.cu)
// call. This header includes no PyTorch header on purpose: the kernel translation units then
// compile in a few seconds per architecture instead of re-parsing ATen for every -gencode.
//
// Multi-tensor layout. Every multi-tensor op (topk passes, fused_sgd_) splits each tensor into
// chunks of kChunk elements (the last chunk of a tensor may be shorter) and numbers the chunks
// consecutively over the tensors in argument order. A segment table (one POD entry per tensor:
// data pointers, numel, dtype, first chunk number) is built on the host once per call, staged in
// pinned memory and copied to the device with one cudaMemcpyAsync on the current stream. Each
// pass is then ONE launch: block b walks chunks b, b + gridDim.x, ... and finds a chunk's tensor
// by a binary search over the table (log2(#tensors) cached loads per 8192 elements). Chunk
// order equals (tensor index, flat index) order, which is the tie-break order of topk_masks.
//
// Vector access. A tensor whose base pointer is aligned to 4 elements (16 B for float32, 8 B
// for 16-bit floats, 32 B for float64) is read 4 elements per access; chunk starts are multiples
// of kChunk, so every group of 4 inside a chunk is aligned too. Misaligned tensors and the
// (numel % 4) tail of a tensor use scalar accesses. All element indices are int64.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../common/radix.h"

namespace bip_fast {
namespace cuda {

constexpr int kChunk = 8192;        // elements per work chunk (multiple of 4)
constexpr int kThreads = 256;       // threads per block of the streaming kernels
constexpr int kBlocksPerSM = 8;     // resident blocks per SM the grids are sized for
constexpr int kScanThreads = 1024;  // threads of the single-block select/scan kernel

// Element type codes stored in the segment tables (runtime dtype per tensor).
enum DTypeCode : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

// One tensor of topk_masks / topk_masks_hist / radix_histogram.
struct TopkSeg {
  const void* in;
  bool* out;  // mask (contiguous, 4-byte aligned), nullptr for radix_histogram
  int64_t numel;
  int64_t chunk_begin;
  int32_t dtype;
  int32_t vec_ok;
};

// One (param, grad, momentum buffer) triple of fused_sgd_ (same dtype, same memory layout).
struct SgdSeg {
  void* p;
  const void* g;
  void* b;
  int64_t numel;
  int64_t chunk_begin;
  int32_t dtype;
  int32_t vec_ok;
};

// ---- launchers (defined next to their kernels; return cudaGetLastError()) ----
// topk: the whole select pipeline after the segment table upload. ws: int64 workspace of
// topk_workspace_slots(nchunks) entries; chunk_hist3: int32[nchunks * 128]; hist1: the D1
// histogram to use (given) or nullptr (computed into ws). keep in (0, total).
int64_t topk_workspace_slots(int64_t nchunks);
cudaError_t launch_topk_select(const TopkSeg* segs, int nseg, int64_t nchunks, int grid,
                               int64_t keep, const int64_t* hist1, int64_t* ws,
                               int32_t* chunk_hist3, cudaStream_t stream);
// Writes all-false (value 0) or all-true (value 1) masks.
cudaError_t launch_topk_fill(const TopkSeg* segs, int nseg, int64_t nchunks, int grid, int value,
                             cudaStream_t stream);
cudaError_t launch_radix_histogram(const TopkSeg* segs, int nseg, int64_t nchunks, int grid,
                                   int shift, int bits, int prefix_shift, uint32_t prefix,
                                   int64_t* hist, cudaStream_t stream);
cudaError_t launch_fused_sgd(const SgdSeg* segs, int nseg, int64_t nchunks, int grid, float lr,
                             float momentum, float weight_decay, int64_t* hist1,
                             const bool* skip, cudaStream_t stream);
cudaError_t launch_masked_weight(int32_t dtype, const void* theta, const bool* mask, void* out,
                                 int64_t n, bool vec_ok, int grid, cudaStream_t stream);
// theta/scores may be nullptr when !need_scores; dtheta nullptr when !need_theta.
cudaError_t launch_masked_weight_backward(int32_t theta_dtype, int32_t score_dtype,
                                          const void* grad, const void* theta, const bool* mask,
                                          const void* scores, float ig, void* dtheta,
                                          void* gscores, int64_t n, bool vec_ok, int grid,
                                          cudaStream_t stream);

#if defined(__CUDACC__)
// Index of the table entry owning `chunk`: the last entry with chunk_begin <= chunk (entries of
// empty tensors share chunk_begin with the next entry and are skipped by the upper bound).
template <typename Seg>
__device__ __forceinline__ int find_seg(const Seg* __restrict__ segs, int nseg, int64_t chunk) {
  int lo = 0, hi = nseg;  // upper_bound over chunk_begin
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (segs[mid].chunk_begin <= chunk) {
      lo = mid + 1;
    } else {
      hi = mid;
    }
  }
  return lo - 1;
}

// ---- typed element access (math in float32) -------------------------------------------------
template <typename T> struct Elem;

template <> struct Elem<float> {
  static constexpr int kVecBytes = 16;
  __device__ __forceinline__ static float load(const float* p, int64_t i) { return p[i]; }
  __device__ __forceinline__ static void load4(const float* p, int64_t i, float (&v)[4]) {
    const float4 x = *reinterpret_cast<const float4*>(p + i);
    v[0] = x.x; v[1] = x.y; v[2] = x.z; v[3] = x.w;
  }
  __device__ __forceinline__ static float round(float x) { return x; }
  __device__ __forceinline__ static void store(float* p, int64_t i, float x) { p[i] = x; }
  __device__ __forceinline__ static void store4(float* p, int64_t i, const float (&v)[4]) {
    *reinterpret_cast<float4*>(p + i) = make_float4(v[0], v[1], v[2], v[3]);
  }
};

template <> struct Elem<__half> {
  static constexpr int kVecBytes = 8;
  __device__ __forceinline__ static float load(const __half* p, int64_t i) {
    return __half2float(p[i]);
  }
  __device__ __forceinline__ static void load4(const __half* p, int64_t i, float (&v)[4]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p + i);
    v[0] = __half2float(__ushort_as_half(static_cast<unsigned short>(u.x & 0xffffu)));
    v[1] = __half2float(__ushort_as_half(static_cast<unsigned short>(u.x >> 16)));
    v[2] = __half2float(__ushort_as_half(static_cast<unsigned short>(u.y & 0xffffu)));
    v[3] = __half2float(__ushort_as_half(static_cast<unsigned short>(u.y >> 16)));
  }
  __device__ __forceinline__ static unsigned bits(float x) {
    return static_cast<unsigned>(__half_as_ushort(__float2half_rn(x)));
  }
  __device__ __forceinline__ static float round(float x) {
    return __half2float(__float2half_rn(x));
  }
  __device__ __forceinline__ static void store(__half* p, int64_t i, float x) {
    p[i] = __float2half_rn(x);
  }
  __device__ __forceinline__ static void store4(__half* p, int64_t i, const float (&v)[4]) {
    uint2 u;
    u.x = bits(v[0]) | (bits(v[1]) << 16);
    u.y = bits(v[2]) | (bits(v[3]) << 16);
    *reinterpret_cast<uint2*>(p + i) = u;
  }
};

template <> struct Elem<__nv_bfloat16> {
  static constexpr int kVecBytes = 8;
  __device__ __forceinline__ static float load(const __nv_bfloat16* p, int64_t i) {
    return __uint_as_float(static_cast<unsigned>(__bfloat16_as_ushort(p[i])) << 16);
  }
  __device__ __forceinline__ static void load4(const __nv_bfloat16* p, int64_t i, float (&v)[4]) {
    const uint2 u = *reinterpret_cast<const uint2*>(p + i);
    v[0] = __uint_as_float(u.x << 16);
    v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16);
    v[3] = __uint_as_float(u.y & 0xffff0000u);
  }
  __device__ __forceinline__ static unsigned bits(float x) {
    return static_cast<unsigned>(__bfloat16_as_ushort(__float2bfloat16_rn(x)));
  }
  __device__ __forceinline__ static float round(float x) {
    return __uint_as_float(bits(x) << 16);
  }
  __device__ __forceinline__ static void store(__nv_bfloat16* p, int64_t i, float x) {
    p[i] = __float2bfloat16_rn(x);
  }
  __device__ __forceinline__ static void store4(__nv_bfloat16* p, int64_t i,
                                                const float (&v)[4]) {
    uint2 u;
    u.x = bits(v[0]) | (bits(v[1]) << 16);
    u.y = bits(v[2]) | (bits(v[3]) << 16);
    *reinterpret_cast<uint2*>(p + i) = u;
  }
};

// float64 is accepted for completeness (the radix key is defined on float32(x)); math stays
// float32 as everywhere else.
template <> struct Elem<double> {
  static constexpr int kVecBytes = 32;
  __device__ __forceinline__ static float load(const double* p, int64_t i) {
    return static_cast<float>(p[i]);
  }
  __device__ __forceinline__ static void load4(const double* p, int64_t i, float (&v)[4]) {
    const double2 a = *reinterpret_cast<const double2*>(p + i);
    const double2 b = *reinterpret_cast<const double2*>(p + i + 2);
    v[0] = static_cast<float>(a.x); v[1] = static_cast<float>(a.y);
    v[2] = static_cast<float>(b.x); v[3] = static_cast<float>(b.y);
  }
  __device__ __forceinline__ static float round(float x) { return x; }
  __device__ __forceinline__ static void store(double* p, int64_t i, float x) {
    p[i] = static_cast<double>(x);
  }
  __device__ __forceinline__ static void store4(double* p, int64_t i, const float (&v)[4]) {
    *reinterpret_cast<double2*>(p + i) = make_double2(v[0], v[1]);
    *reinterpret_cast<double2*>(p + i + 2) = make_double2(v[2], v[3]);
  }
};

// Calls f(T{}) -- a typed tag -- for a runtime dtype code (warp-uniform in every caller).
template <typename F>
__device__ __forceinline__ void with_elem_type(int32_t code, const F& f) {
  switch (code) {
    case kF32: f(static_cast<float*>(nullptr)); break;
    case kF16: f(static_cast<__half*>(nullptr)); break;
    case kBF16: f(static_cast<__nv_bfloat16*>(nullptr)); break;
    default: f(static_cast<double*>(nullptr)); break;
  }
}

__device__ __forceinline__ uint32_t key_of(float x) { return radix::key_of(x); }

// Walks the elements [cs, ce) of one typed buffer with the whole block: groups of 4 elements
// (vector loads, UNROLL groups in flight per thread) when vec_ok, then the scalar tail.
// fv(i, v[4]) gets the first index of a group, fs(i, v) a single element.
template <typename T, int UNROLL, typename FV, typename FS>
__device__ __forceinline__ void block_walk(const T* __restrict__ p, bool vec_ok, int64_t cs,
                                           int64_t ce, const FV& fv, const FS& fs) {
  int64_t scalar_from = cs;
  if (vec_ok) {
    const int64_t ngroups = (ce - cs) >> 2;
    const int64_t step = static_cast<int64_t>(blockDim.x) * UNROLL;
    for (int64_t g0 = threadIdx.x; g0 < ngroups; g0 += step) {
      float v[UNROLL][4];
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t g = g0 + static_cast<int64_t>(u) * blockDim.x;
        if (g < ngroups) Elem<T>::load4(p, cs + 4 * g, v[u]);
      }
#pragma unroll
      for (int u = 0; u < UNROLL; ++u) {
        const int64_t g = g0 + static_cast<int64_t>(u) * blockDim.x;
        if (g < ngroups) fv(cs + 4 * g, v[u]);
      }
    }
    scalar_from = cs + 4 * ngroups;
  }
  for (int64_t i = scalar_from + threadIdx.x; i < ce; i += blockDim.x) {
    fs(i, Elem<T>::load(p, i));
  }
}

// Block-wide exclusive prefix sum of one value per thread (blockDim.x a multiple of 32, at
// most 1024). `warp_sums` is shared scratch of 32 entries. Returns the exclusive prefix and
// stores the block total in *total. Contains __syncthreads(): call from all threads.
template <typename V>
__device__ __forceinline__ V block_exclusive_scan(V x, V* warp_sums, V* total) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  V incl = x;
#pragma unroll
  for (int off = 1; off < 32; off <<= 1) {
    const V y = __shfl_up_sync(0xffffffffu, incl, off);
    if (lane >= off) incl += y;
  }
  __syncthreads();  // warp_sums may still be read by a previous call
  if (lane == 31) warp_sums[warp] = incl;
  __syncthreads();
  if (warp == 0) {
    V w = lane < nwarps ? warp_sums[lane] : V(0);
#pragma unroll
    for (int off = 1; off < 32; off <<= 1) {
      const V y = __shfl_up_sync(0xffffffffu, w, off);
      if (lane >= off) w += y;
    }
    if (lane < nwarps) warp_sums[lane] = w;  // inclusive over warps
  }
  __syncthreads();
  const V warp_prefix = warp == 0 ? V(0) : warp_sums[warp - 1];
  *total = warp_sums[nwarps - 1];
  return warp_prefix + incl - x;
}

#endif  // __CUDACC__

}  // namespace cuda
}  // namespace bip_fast
