// CUDA multi-tensor radix select kernels: radix_histogram, topk_masks, topk_masks_hist
// (host wrappers and op registration: ops_cuda.cu).
//
// Algorithm (docs/design.md "Radix key"). The keep-th largest radix key T over all tensors is
// found digit by digit (D1 = key>>19, D2 = (key>>7)&0xfff, D3 = key&0x7f) without concatenating
// or sorting, and without any host synchronisation: every decision is taken on the device and
// handed to the next launch through a small int64 state buffer.
//   hist1   full read -> D1 histogram (skipped by topk_masks_hist, which receives it, e.g. from
//           fused_sgd_); per-block shared histogram (4096 x u32), non-zero bins merged with
//           global 64-bit atomics.
//   select  1 block x 1024 threads: descending block scan of the 4096 bins, picks the bin that
//           holds the k-th largest key, writes (prefix, remaining rank k) to the state.
//   hist2   full read, keys with D1 == prefix -> D2 histogram.  select (same kernel).
//   hist3   full read, keys with key>>7 == prefix -> D3 histogram (128 bins) AND the per-chunk
//           D3 histograms (128 x i32 per 8192-element chunk, written unconditionally).
//   select3 T is now exact; need = rank left in T's bin, eq = #keys == T (the bin count). If
//           need == eq (all equal keys kept: the common case) nothing else is needed; otherwise
//           the same single block scans the per-chunk counts of keys == T (read from the
//           per-chunk D3 histograms) into per-chunk exclusive bases -- no extra pass over data.
//   write   full read + 1 B/element write: key > T -> true; key == T -> true if all ties are kept,
//           or if the chunk's base + in-chunk rank < need. Chunks whose tied keys lie entirely
//           below / above `need` take the vector path; only the single chunk that straddles
//           `need` ranks its tied keys in flat-index order (block scan per 1024 elements).
// Ties therefore go to the earlier tensor, then the lower row-major flat index (SPEC §2).
//
// Traffic for N float32 scores: 4 reads of 4N bytes (3 when hist1 is given) + N bytes of mask
// writes + 512 B per chunk (1/64 of the data) of per-chunk histograms; 7 launches + 1 memset +
// 1 small H2D copy of the segment table. At N = 11.2M (45 MB) the data mostly stays in H100's
// 50 MB L2 between passes. keep == 0 and keep == N launch only the write kernel.
// Launch overhead (~2-4 us per dependent launch) dominates for small N.
//
// Limits: 64-bit element indices everywhere; a block counts at most 2^32 - 1 elements per
// shared bin (i.e. < 2^32 * gridDim elements in total). topk_masks_hist trusts hist1 to be
// the D1 histogram of exactly these scores (checking it would need a device->host sync): a
// wrong hist1 gives a wrong (but memory-safe) mask. Scores are read through .contiguous(), so
// channels_last inputs are copied first; masks are returned contiguous.
// Trade-off: hist2 and hist3 re-read all data instead of compacting candidate keys; this keeps
// the kernels simple and deterministic; the extra reads mostly hit L2 at the sizes of interest.
#include "kernels.cuh"

namespace bip_fast {
namespace cuda {
namespace {

using radix::kRadixBins;

constexpr int kD3Bins = radix::kD3Bins;  // 128
constexpr int kUnroll = 4;

// Device state written by the select kernel (int64 slots).
enum StateSlot : int {
  kK = 0,        // rank still to take among the keys matching `prefix`
  kPrefix = 1,   // key bits fixed so far, right-aligned
  kDone = 2,     // 1: selection finished early (nothing selected); later passes skip
  kT = 3,        // final threshold key
  kNeed = 4,     // number of keys == T to keep
  kEq = 5,       // number of keys == T
  kAllTies = 6,  // 1 when need == eq (every key == T is kept)
  kStateSlots = 8,
};

// ---- histogram of ((key >> shift) & mask) over keys with (key >> prefix_shift) == prefix ----
// prefix comes from the host (radix_histogram) or from state[kPrefix] (topk pass 2).
__global__ void __launch_bounds__(kThreads)
hist_kernel(const TopkSeg* __restrict__ segs, int nseg, int64_t nchunks, int shift, int bits,
            int prefix_shift, uint32_t host_prefix, const int64_t* __restrict__ state,
            int64_t* __restrict__ hist) {
  __shared__ unsigned int sh[kRadixBins];
  uint32_t prefix = host_prefix;
  if (state != nullptr) {
    if (state[kDone] != 0) return;  // uniform over the grid
    prefix = static_cast<uint32_t>(state[kPrefix]);
  }
  const int nbins = 1 << bits;
  const uint32_t mask = static_cast<uint32_t>(nbins - 1);
  const bool use_prefix = prefix_shift < radix::kNoPrefixShift;
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) sh[b] = 0u;
  __syncthreads();

  auto add = [&](float v) {
    const uint32_t key = key_of(v);
    if (!use_prefix || (key >> prefix_shift) == prefix) atomicAdd(&sh[(key >> shift) & mask], 1u);
  };
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const TopkSeg seg = segs[find_seg(segs, nseg, chunk)];
    const int64_t cs = (chunk - seg.chunk_begin) * kChunk;
    const int64_t ce = min(seg.numel, cs + kChunk);
    with_elem_type(seg.dtype, [&](auto* tag) {
      using T = typename std::remove_pointer<decltype(tag)>::type;
      block_walk<T, kUnroll>(
          static_cast<const T*>(seg.in), seg.vec_ok != 0, cs, ce,
          [&](int64_t, const float(&v)[4]) {
#pragma unroll
            for (int j = 0; j < 4; ++j) add(v[j]);
          },
          [&](int64_t, float v) { add(v); });
    });
  }
  __syncthreads();
  for (int b = threadIdx.x; b < nbins; b += blockDim.x) {
    const unsigned int c = sh[b];
    if (c != 0u) {
      atomicAdd(reinterpret_cast<unsigned long long*>(hist + b), static_cast<unsigned long long>(c));
    }
  }
}

// ---- pass 3: D3 histogram of keys with key>>7 == prefix, globally and per chunk ----
__global__ void __launch_bounds__(kThreads)
hist3_kernel(const TopkSeg* __restrict__ segs, int nseg, int64_t nchunks,
             const int64_t* __restrict__ state, int64_t* __restrict__ hist3,
             int32_t* __restrict__ chunk_hist3) {
  __shared__ unsigned int sh[kD3Bins];
  if (state[kDone] != 0) return;
  const uint32_t prefix = static_cast<uint32_t>(state[kPrefix]);
  auto add = [&](float v) {
    const uint32_t key = key_of(v);
    if ((key >> radix::kD2Shift) == prefix) atomicAdd(&sh[key & (kD3Bins - 1)], 1u);
  };
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    for (int b = threadIdx.x; b < kD3Bins; b += blockDim.x) sh[b] = 0u;
    __syncthreads();
    const TopkSeg seg = segs[find_seg(segs, nseg, chunk)];
    const int64_t cs = (chunk - seg.chunk_begin) * kChunk;
    const int64_t ce = min(seg.numel, cs + kChunk);
    with_elem_type(seg.dtype, [&](auto* tag) {
      using T = typename std::remove_pointer<decltype(tag)>::type;
      block_walk<T, kUnroll>(
          static_cast<const T*>(seg.in), seg.vec_ok != 0, cs, ce,
          [&](int64_t, const float(&v)[4]) {
#pragma unroll
            for (int j = 0; j < 4; ++j) add(v[j]);
          },
          [&](int64_t, float v) { add(v); });
    });
    __syncthreads();
    for (int b = threadIdx.x; b < kD3Bins; b += blockDim.x) {
      const unsigned int c = sh[b];
      chunk_hist3[chunk * kD3Bins + b] = static_cast<int32_t>(c);
      if (c != 0u) {
        atomicAdd(reinterpret_cast<unsigned long long*>(hist3 + b),
                  static_cast<unsigned long long>(c));
      }
    }
    __syncthreads();  // sh is zeroed again for the next chunk
  }
}

// ---- single-block bucket selection (levels 1, 2, 3) ----
// Finds the bin d (scanning from the top) with above(d) < k <= above(d) + hist[d] and narrows
// the state to it. Level 3 finalises T/need/eq and, when not every tie is kept, turns the
// per-chunk counts of keys == T into exclusive bases chunk_base[c].
__global__ void __launch_bounds__(kScanThreads)
select_kernel(const int64_t* __restrict__ hist, int bits, int level, int64_t keep,
              int64_t* __restrict__ state, const int32_t* __restrict__ chunk_hist3,
              int64_t* __restrict__ chunk_base, int64_t nchunks) {
  __shared__ int64_t warp_sums[32];
  __shared__ int s_digit;
  __shared__ int64_t s_k, s_eq;
  int64_t k;
  uint32_t prefix;
  if (level == 1) {
    k = keep;
    prefix = 0u;
  } else {
    if (state[kDone] != 0) return;
    k = state[kK];
    prefix = static_cast<uint32_t>(state[kPrefix]);
  }
  const int nbins = 1 << bits;
  const int bpt = nbins >= static_cast<int>(blockDim.x) ? nbins / static_cast<int>(blockDim.x) : 1;
  const int top = nbins - 1 - static_cast<int>(threadIdx.x) * bpt;  // highest bin of this thread
  int64_t c[4];
  int64_t sum = 0;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    c[j] = (j < bpt && top - j >= 0) ? hist[top - j] : 0;
    sum += c[j];
  }
  if (threadIdx.x == 0) s_digit = -1;
  int64_t total;
  const int64_t above = block_exclusive_scan(sum, warp_sums, &total);  // syncs: s_digit visible
  if (k > total) k = total;  // defensive: an inconsistent histogram cannot select past its end
  if (k > 0 && above < k && k <= above + sum) {
    int64_t acc = above;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      if (j < bpt && top - j >= 0) {
        if (acc + c[j] >= k) {
          s_digit = top - j;
          s_k = k - acc;
          s_eq = c[j];
          break;
        }
        acc += c[j];
      }
    }
  }
  __syncthreads();
  const int digit = s_digit;
  if (digit < 0) {  // keep == 0 (or an empty / inconsistent histogram): select nothing
    if (threadIdx.x == 0) {
      state[kDone] = 1;
      state[kT] = 0x80000000LL;  // above every key
      state[kNeed] = 0;
      state[kEq] = 0;
      state[kAllTies] = 1;
    }
    return;
  }
  if (level < 3) {
    if (threadIdx.x == 0) {
      state[kK] = s_k;
      state[kPrefix] = level == 1 ? static_cast<int64_t>(digit)
                                  : static_cast<int64_t>((prefix << radix::kD2Bits) | digit);
      state[kDone] = 0;
    }
    return;
  }
  const int64_t need = s_k;
  const int64_t eq = s_eq;
  const bool all_ties = need == eq;
  if (threadIdx.x == 0) {
    state[kT] = static_cast<int64_t>((prefix << radix::kD3Bits) | static_cast<uint32_t>(digit));
    state[kNeed] = need;
    state[kEq] = eq;
    state[kAllTies] = all_ties ? 1 : 0;
    state[kDone] = 0;
  }
  if (all_ties) return;
  int64_t carry = 0;
  for (int64_t base = 0; base < nchunks; base += blockDim.x) {
    const int64_t i = base + threadIdx.x;
    const int64_t v = i < nchunks ? static_cast<int64_t>(chunk_hist3[i * kD3Bins + digit]) : 0;
    int64_t tile_total;
    const int64_t ex = block_exclusive_scan(v, warp_sums, &tile_total);
    if (i < nchunks) chunk_base[i] = carry + ex;
    carry += tile_total;
  }
}

// ---- final pass: write the masks ----
// forced: -1 use the state, 0 all false, 1 all true (keep == 0 / keep == N without any pass).
__global__ void __launch_bounds__(kThreads)
write_masks_kernel(const TopkSeg* __restrict__ segs, int nseg, int64_t nchunks,
                   const int64_t* __restrict__ state, const int32_t* __restrict__ chunk_hist3,
                   const int64_t* __restrict__ chunk_base, int forced) {
  __shared__ int warp_sums[32];
  uint32_t T;
  int64_t need = 0;
  bool all_ties = true;
  if (forced < 0) {
    T = static_cast<uint32_t>(state[kT]);
    need = state[kNeed];
    all_ties = state[kAllTies] != 0;
  } else {
    T = forced ? 0u : 0x80000000u;  // key >= 0 always true; key >= 2^31 never
  }
  for (int64_t chunk = blockIdx.x; chunk < nchunks; chunk += gridDim.x) {
    const TopkSeg seg = segs[find_seg(segs, nseg, chunk)];
    const int64_t cs = (chunk - seg.chunk_begin) * kChunk;
    const int64_t ce = min(seg.numel, cs + kChunk);
    bool incl_eq = true;  // keep keys == T in this chunk
    int64_t take = -1;    // >= 0: keep only the first `take` keys == T of this chunk
    if (!all_ties) {
      const int64_t cnt = chunk_hist3[chunk * kD3Bins + (T & (kD3Bins - 1))];
      const int64_t base = chunk_base[chunk];
      if (cnt == 0 || base + cnt <= need) {
        incl_eq = true;
      } else if (base >= need) {
        incl_eq = false;
      } else {
        take = need - base;
      }
    }
    bool* __restrict__ out = seg.out;
    if (take < 0) {
      with_elem_type(seg.dtype, [&](auto* tag) {
        using T_ = typename std::remove_pointer<decltype(tag)>::type;
        block_walk<T_, kUnroll>(
            static_cast<const T_*>(seg.in), seg.vec_ok != 0, cs, ce,
            [&](int64_t i, const float(&v)[4]) {
              uint32_t w = 0u;
#pragma unroll
              for (int j = 0; j < 4; ++j) {
                const uint32_t key = key_of(v[j]);
                const bool m = key > T || (incl_eq && key == T);
                w |= static_cast<uint32_t>(m) << (8 * j);
              }
              *reinterpret_cast<uint32_t*>(out + i) = w;  // i % 4 == 0, masks are 4-aligned
            },
            [&](int64_t i, float v) {
              const uint32_t key = key_of(v);
              out[i] = key > T || (incl_eq && key == T);
            });
      });
    } else {
      // The one chunk that straddles `need`: rank its keys == T in flat-index order.
      // Uniform trip count over the block (every thread runs every tile: the scan syncs).
      with_elem_type(seg.dtype, [&](auto* tag) {
        using T_ = typename std::remove_pointer<decltype(tag)>::type;
        const T_* __restrict__ p = static_cast<const T_*>(seg.in);
        int64_t taken = 0;
        const int64_t tile = static_cast<int64_t>(blockDim.x) * 4;
        for (int64_t t0 = cs; t0 < ce; t0 += tile) {
          const int64_t i0 = t0 + 4 * static_cast<int64_t>(threadIdx.x);
          uint32_t keys[4];
          int cnt = 0;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            keys[j] = (i0 + j < ce) ? key_of(Elem<T_>::load(p, i0 + j)) : 0u;
            cnt += (i0 + j < ce && keys[j] == T) ? 1 : 0;
          }
          int tile_ties;
          const int ex = block_exclusive_scan(cnt, warp_sums, &tile_ties);
          int64_t r = taken + ex;
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            if (i0 + j < ce) {
              bool m = keys[j] > T;
              if (keys[j] == T) {
                m = r < take;
                ++r;
              }
              out[i0 + j] = m;
            }
          }
          taken += tile_ties;
        }
      });
    }
  }
}

// ---- launchers ----
// Workspace: [hist1 4096 | hist2 4096 | hist3 128 | state 8] (zeroed here), then chunk_base.
constexpr int64_t kZeroedSlots = 2 * kRadixBins + kD3Bins + kStateSlots;

}  // namespace

int64_t topk_workspace_slots(int64_t nchunks) { return kZeroedSlots + nchunks; }

cudaError_t launch_topk_select(const TopkSeg* segs, int nseg, int64_t nchunks, int grid,
                               int64_t keep, const int64_t* hist1, int64_t* ws,
                               int32_t* chunk_hist3, cudaStream_t stream) {
  cudaError_t err = cudaMemsetAsync(ws, 0, kZeroedSlots * sizeof(int64_t), stream);
  if (err != cudaSuccess) return err;
  int64_t* h1 = ws;
  int64_t* h2 = ws + kRadixBins;
  int64_t* h3 = ws + 2 * kRadixBins;
  int64_t* state = h3 + kD3Bins;
  int64_t* chunk_base = ws + kZeroedSlots;
  if (hist1 == nullptr) {
    hist_kernel<<<grid, kThreads, 0, stream>>>(segs, nseg, nchunks, radix::kD1Shift,
                                               radix::kD1Bits, radix::kNoPrefixShift, 0u,
                                               nullptr, h1);
    hist1 = h1;
  }
  select_kernel<<<1, kScanThreads, 0, stream>>>(hist1, radix::kD1Bits, 1, keep, state, nullptr,
                                                nullptr, 0);
  hist_kernel<<<grid, kThreads, 0, stream>>>(segs, nseg, nchunks, radix::kD2Shift,
                                             radix::kD2Bits, radix::kD1Shift, 0u, state, h2);
  select_kernel<<<1, kScanThreads, 0, stream>>>(h2, radix::kD2Bits, 2, keep, state, nullptr,
                                                nullptr, 0);
  hist3_kernel<<<grid, kThreads, 0, stream>>>(segs, nseg, nchunks, state, h3, chunk_hist3);
  select_kernel<<<1, kScanThreads, 0, stream>>>(h3, radix::kD3Bits, 3, keep, state, chunk_hist3,
                                                chunk_base, nchunks);
  write_masks_kernel<<<grid, kThreads, 0, stream>>>(segs, nseg, nchunks, state, chunk_hist3,
                                                    chunk_base, -1);
  return cudaGetLastError();
}

cudaError_t launch_topk_fill(const TopkSeg* segs, int nseg, int64_t nchunks, int grid, int value,
                             cudaStream_t stream) {
  write_masks_kernel<<<grid, kThreads, 0, stream>>>(segs, nseg, nchunks, nullptr, nullptr,
                                                    nullptr, value != 0 ? 1 : 0);
  return cudaGetLastError();
}

cudaError_t launch_radix_histogram(const TopkSeg* segs, int nseg, int64_t nchunks, int grid,
                                   int shift, int bits, int prefix_shift, uint32_t prefix,
                                   int64_t* hist, cudaStream_t stream) {
  hist_kernel<<<grid, kThreads, 0, stream>>>(segs, nseg, nchunks, shift, bits, prefix_shift,
                                             prefix, nullptr, hist);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace bip_fast
