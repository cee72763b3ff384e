// Host-side helpers of the bip_fast CUDA ops (used by ops_cuda.cu only): input checks, dtype
// codes, the pinned-memory upload of segment tables, grid sizing. Device code lives in
// kernels.cuh, which includes no PyTorch header.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/util/irange.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <string>
#include <vector>

#include "kernels.cuh"

namespace bip_fast {
namespace cuda {

inline std::string arg_name(const char* what, int64_t idx) {
  return std::string(what) + (idx >= 0 ? "[" + std::to_string(idx) + "]" : std::string());
}

inline int32_t dtype_code(const at::Tensor& t, const char* op, const char* what, int64_t idx) {
  switch (t.scalar_type()) {
    case at::kFloat: return kF32;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kDouble: return kF64;
    default:
      TORCH_CHECK(false, op, ": ", arg_name(what, idx),
                  " must be float32/float16/bfloat16/float64, got ", t.scalar_type());
  }
  return kF32;
}

inline int64_t dtype_size(int32_t code) { return code == kF32 ? 4 : (code == kF64 ? 8 : 2); }

inline void check_cuda_tensor(const at::Tensor& t, const at::Device& dev, const char* op,
                              const char* what, int64_t idx = -1) {
  TORCH_CHECK(t.defined(), op, ": ", arg_name(what, idx), " is undefined");
  TORCH_CHECK(t.is_cuda(), op, ": ", arg_name(what, idx), " must be a CUDA tensor, got ",
              t.device());
  TORCH_CHECK(t.device() == dev, op, ": ", arg_name(what, idx), " must be on ", dev,
              " like the first tensor argument, got ", t.device());
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunk - 1) / kChunk; }

inline bool aligned_to(const void* p, int64_t bytes) {
  return (reinterpret_cast<uintptr_t>(p) % static_cast<uintptr_t>(bytes)) == 0;
}

// Multiprocessor count of the current device, cached per device.
inline int sm_count() {
  static int cache[64] = {0};
  const int dev = static_cast<int>(c10::cuda::current_device());
  if (dev >= 0 && dev < 64 && cache[dev] > 0) return cache[dev];
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev));
  if (dev >= 0 && dev < 64) cache[dev] = n;
  return n;
}

// Grid size for a chunk-walking kernel: every chunk gets a block, up to kBlocksPerSM per SM.
inline int grid_for_chunks(int64_t nchunks) {
  const int64_t cap = static_cast<int64_t>(sm_count()) * kBlocksPerSM;
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(nchunks, cap)));
}

// Grid size for a grid-stride elementwise kernel over `items` work items (one per thread).
inline int grid_for_items(int64_t items) {
  const int64_t need = (items + kThreads - 1) / kThreads;
  const int64_t cap = static_cast<int64_t>(sm_count()) * kBlocksPerSM;
  return static_cast<int>(std::max<int64_t>(1, std::min(need, cap)));
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

}  // namespace cuda
}  // namespace bip_fast
