// Helpers shared by the CUDA kernels of bip_fast: input checks, the multi-tensor segment table,
// per-dtype 1- and 4-element loads/stores with float32 math, and block-wide scans.
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
// for 16-bit floats, 32 B for float64) is read 4 elements per load; chunk starts are multiples
// of kChunk, so every group of 4 inside a chunk is aligned too. Misaligned tensors and the
// (numel % 4) tail of a tensor use scalar accesses. All element indices are int64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/util/irange.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "../common/radix.h"

namespace bip_fast {
namespace cuda {

constexpr int kChunk = 8192;         // elements per work chunk (multiple of 4)
constexpr int kThreads = 256;        // threads per block of the streaming kernels
constexpr int kBlocksPerSM = 8;      // resident blocks per SM the grids are sized for
constexpr int kScanThreads = 1024;   // threads of the single-block select/scan kernel

// Element type codes stored in the segment tables (runtime dtype per tensor).
enum DTypeCode : int32_t { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

inline int32_t dtype_code(const at::Tensor& t, const char* op, const char* what, int64_t idx) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default:
      TORCH_CHECK(false, op, ": ", what, (idx >= 0 ? "[" + std::to_string(idx) + "]" : ""),
                  " must be float32/float16/bfloat16/float64, got ", t.scalar_type());
  }
  return kF32;
}

inline int64_t dtype_size(int32_t code) { return code == kF32 ? 4 : (code == kF64 ? 8 : 2); }

inline void check_cuda_tensor(const at::Tensor& t, const at::Device& dev, const char* op,
                              const char* what, int64_t idx = -1) {
  const std::string name =
      std::string(what) + (idx >= 0 ? "[" + std::to_string(idx) + "]" : std::string());
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got ", t.device());
  TORCH_CHECK(t.device() == dev, op, ": ", name, " must be on ", dev, " like the first input, got ",
              t.device());
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

inline bool aligned_to(const void* p, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// Grid size for a chunk-walking kernel: every chunk gets a block, up to kBlocksPerSM per SM.
inline int grid_for_chunks(int64_t nchunks) {
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t cap = static_cast<int64_t>(sms) * kBlocksPerSM;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nchunks, cap)));
}

// Copies a host vector of POD entries to a device byte tensor through pinned memory (one
// cudaMemcpyAsync on the current stream; the caching host allocator keeps the pinned block
// until the copy is done, the caching device allocator keeps the device block stream-ordered).
template <typename Entry>
at::Tensor upload_table(const std::vector<Entry>& entries, const at::Device& dev) {
  const int64_t bytes = static_cast<int64_t>(entries.size() * sizeof(Entry));
  at::Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), entries.data(), static_cast<size_t>(bytes));
  return host.to(dev, /*non_blocking=*/true);
}

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

}  // namespace cuda
}  // namespace bip_fast
