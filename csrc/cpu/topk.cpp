// CPU multi-tensor radix select: topk_masks, topk_masks_hist, radix_histogram.
//
// Algorithm (docs/design.md "Radix key"): the keep-th largest radix key T over all tensors is
// found digit by digit, without concatenating or sorting anything:
//   pass 1  full read of all scores -> D1 histogram (4096 bins), bucket b1 holding the keep-th
//           largest key (skipped by topk_masks_hist, which is handed the D1 histogram);
//   pass 2  full read -> D2 histogram of the keys with D1 == b1, and those keys are gathered
//           per chunk (typically ~N/1000 of them);
//   pass 3  over the gathered keys only (or a 3rd read of the scores when bucket b1 holds
//           over 1/4 of all keys, e.g. heavy ties) -> per-chunk D3 histograms; T is now
//           exact, and the per-chunk counts of keys == T give, by a prefix sum over chunks,
//           how many of the tied keys each chunk may keep (ties go to the earlier tensor,
//           then the lower flat index);
//   mask    full read + 1 byte/element write: key > T, or key == T within the chunk's quota.
// Traffic: 3 reads of the scores (4 B/elem for fp32) + 1 B/elem of mask writes (4 reads in
// the heavy-tie case). Parallel over fixed chunks balanced by element count
// (at::parallel_for); thread-local histograms are merged under a mutex and tie quotas are
// per chunk, so the result never depends on the thread count. Scores are read through .contiguous() views, so
// flat index = logical row-major index (channels_last inputs are reordered by the copy).
#include <torch/library.h>

#include <mutex>
#include <string>

#include "cpu_utils.h"

namespace bip_fast {
namespace cpu {
namespace {

using radix::kRadixBins;

struct Prepared {
  std::vector<at::Tensor> contig;
  std::vector<int64_t> numels;
  int64_t total = 0;
};

Prepared prepare(at::TensorList scores, const char* op) {
  Prepared p;
  p.contig.reserve(scores.size());
  const std::string what = std::string(op) + ": scores";
  for (const auto i : c10::irange(scores.size())) {
    check_float_cpu(scores[i], what.c_str(), static_cast<int64_t>(i));
    p.contig.push_back(scores[i].contiguous());
    p.numels.push_back(scores[i].numel());
    p.total += scores[i].numel();
  }
  return p;
}

// Calls f(const scalar_t* data) for the tensor's element type.
template <typename F>
inline void with_data(const at::Tensor& t, const F& f) {
  BIP_FAST_DISPATCH_FLOATS(t.scalar_type(), "bip_fast_cpu", [&] { f(t.const_data_ptr<scalar_t>()); });
}

// Histogram of ((key >> shift) & mask) over [b, e) for keys passing the prefix filter.
// Four interleaved sub-histograms (h + j * kRadixBins) cut store-to-load stalls when
// neighbouring elements hit the same bin (trained weights crowd a few D1 bins).
constexpr int kSubHists = 4;

template <typename T>
void hist_range(const T* x, int64_t b, int64_t e, int shift, uint32_t mask, bool use_prefix,
                uint32_t prefix, int prefix_shift, uint32_t* h) {
  int64_t i = b;
  if (!use_prefix) {
    uint32_t* h0 = h;
    uint32_t* h1 = h + kRadixBins;
    uint32_t* h2 = h + 2 * kRadixBins;
    uint32_t* h3 = h + 3 * kRadixBins;
    for (; i + 3 < e; i += 4) {
      const uint32_t k0 = key_at(x, i), k1 = key_at(x, i + 1);
      const uint32_t k2 = key_at(x, i + 2), k3 = key_at(x, i + 3);
      h0[(k0 >> shift) & mask]++;
      h1[(k1 >> shift) & mask]++;
      h2[(k2 >> shift) & mask]++;
      h3[(k3 >> shift) & mask]++;
    }
    for (; i < e; ++i) h0[(key_at(x, i) >> shift) & mask]++;
  } else {
    for (; i < e; ++i) {
      const uint32_t k = key_at(x, i);
      if ((k >> prefix_shift) == prefix) h[(k >> shift) & mask]++;
    }
  }
}

// Global histogram (int64[4096]) of a digit over all scores, optionally prefix-filtered.
void global_hist(const Prepared& p, const std::vector<Chunk>& chunks, int shift, int bits,
                 bool use_prefix, uint32_t prefix, int prefix_shift, int64_t* out) {
  std::mutex mu;
  const uint32_t mask = (1u << bits) - 1u;
  parallel_chunks(chunks, p.total, p.total, [&](int64_t cb, int64_t ce) {
    std::vector<uint32_t> h(kSubHists * kRadixBins, 0);
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      with_data(p.contig[ch.tensor], [&](auto* x) {
        hist_range(x, ch.begin, ch.end, shift, mask, use_prefix, prefix, prefix_shift, h.data());
      });
    }
    std::lock_guard<std::mutex> lock(mu);
    for (int i = 0; i < kRadixBins; ++i) {
      int64_t sum = 0;
      for (int j = 0; j < kSubHists; ++j) sum += h[j * kRadixBins + i];
      out[i] += sum;
    }
  });
}

// Writes masks for threshold key T: key > T true; key == T true for the first allowed[c]
// such keys of chunk c.
template <typename T>
void write_mask(const T* x, bool* out, int64_t b, int64_t e, uint32_t thr, int64_t allowed,
                int64_t eq_count) {
  // Keys are < 2^31, so a signed compare equals the unsigned one and vectorises on SSE2.
  const int32_t sthr = static_cast<int32_t>(thr);
  uint8_t* o = reinterpret_cast<uint8_t*>(out);
  if (allowed == 0) {
    for (int64_t i = b; i < e; ++i) o[i] = static_cast<int32_t>(key_at(x, i)) > sthr;
  } else if (allowed == eq_count) {
    for (int64_t i = b; i < e; ++i) o[i] = static_cast<int32_t>(key_at(x, i)) >= sthr;
  } else {
    int64_t left = allowed;
    for (int64_t i = b; i < e; ++i) {
      const uint32_t k = key_at(x, i);
      bool m = k > thr;
      if (k == thr && left > 0) {
        m = true;
        --left;
      }
      out[i] = m;
    }
  }
}

std::vector<at::Tensor> topk_impl(at::TensorList scores, int64_t keep, const at::Tensor* hist1,
                                  const char* op) {
  Prepared p = prepare(scores, op);
  TORCH_CHECK(keep >= 0 && keep <= p.total, op, ": keep must be in [0, ", p.total,
              "] (total number of scores), got ", keep);
  std::vector<at::Tensor> masks;
  masks.reserve(scores.size());
  for (const auto& s : scores) {
    masks.push_back(at::empty(s.sizes(), s.options().dtype(at::kBool).memory_format(
                                             at::MemoryFormat::Contiguous)));
  }

  std::vector<int64_t> h1(kRadixBins, 0);
  if (hist1 != nullptr) {
    const at::Tensor& h = *hist1;
    TORCH_CHECK(h.device().is_cpu(), op, ": hist1 must be a CPU tensor, got ", h.device());
    TORCH_CHECK(h.scalar_type() == at::kLong, op, ": hist1 must be int64, got ", h.scalar_type());
    TORCH_CHECK(h.dim() == 1 && h.numel() == kRadixBins, op, ": hist1 must have shape (",
                kRadixBins, ",), got ", h.sizes());
    const at::Tensor hc = h.contiguous();
    const int64_t* hp = hc.const_data_ptr<int64_t>();
    int64_t sum = 0;
    for (int i = 0; i < kRadixBins; ++i) {
      TORCH_CHECK(hp[i] >= 0, op, ": hist1[", i, "] is negative (", hp[i], ")");
      h1[i] = hp[i];
      sum += hp[i];
    }
    TORCH_CHECK(sum == p.total, op, ": hist1 counts ", sum,
                " elements but scores hold ", p.total,
                " (hist1 must be the D1 histogram of exactly these scores)");
  }

  if (keep == 0 || keep == p.total) {
    for (auto& m : masks) m.fill_(keep != 0);
    return masks;
  }

  const std::vector<Chunk> chunks = make_chunks(p.numels);
  const int64_t nchunks = static_cast<int64_t>(chunks.size());

  // Pass 1: D1 histogram.
  if (hist1 == nullptr) {
    global_hist(p, chunks, radix::kD1Shift, radix::kD1Bits, false, 0, radix::kNoPrefixShift,
                h1.data());
  }
  int64_t above = 0;
  const int b1 = radix::select_bin(h1.data(), kRadixBins, keep, &above);
  TORCH_CHECK(b1 >= 0, op, ": internal error (D1 histogram too small)");
  const int64_t want2 = keep - above;

  // Pass 2: D2 histogram of bucket b1; its keys are gathered per chunk unless the bucket
  // holds a large share of all keys (heavy ties), in which case pass 3 re-reads the scores.
  const bool gather = h1[b1] <= std::max<int64_t>(p.total / 4, kSerialNumel);
  std::vector<std::vector<uint32_t>> cand(gather ? nchunks : 0);
  std::vector<int64_t> h2(kRadixBins, 0);
  {
    std::mutex mu;
    const uint32_t ub1 = static_cast<uint32_t>(b1);
    parallel_chunks(chunks, p.total, p.total, [&](int64_t cb, int64_t ce) {
      std::vector<uint32_t> h(kRadixBins, 0);
      for (int64_t c = cb; c < ce; ++c) {
        const Chunk& ch = chunks[c];
        with_data(p.contig[ch.tensor], [&](auto* x) {
          if (gather) {
            auto& v = cand[c];
            for (int64_t i = ch.begin; i < ch.end; ++i) {
              const uint32_t k = key_at(x, i);
              if (radix::digit1(k) == ub1) {
                h[radix::digit2(k)]++;
                v.push_back(k);
              }
            }
          } else {
            for (int64_t i = ch.begin; i < ch.end; ++i) {
              const uint32_t k = key_at(x, i);
              if (radix::digit1(k) == ub1) h[radix::digit2(k)]++;
            }
          }
        });
      }
      std::lock_guard<std::mutex> lock(mu);
      for (int i = 0; i < kRadixBins; ++i) h2[i] += h[i];
    });
  }
  int64_t above2 = 0;
  const int b2 = radix::select_bin(h2.data(), kRadixBins, want2, &above2);
  TORCH_CHECK(b2 >= 0, op, ": internal error (D2 histogram too small)");
  const int64_t want3 = want2 - above2;
  const uint32_t prefix23 = (static_cast<uint32_t>(b1) << radix::kD2Bits) | static_cast<uint32_t>(b2);

  // Pass 3: per-chunk D3 histograms of the keys with (key >> 7) == prefix23, from the
  // gathered keys or from the scores.
  std::vector<int64_t> h3c(nchunks * radix::kD3Bins, 0);
  int64_t work = p.total;
  if (gather) {
    work = 0;
    for (const auto& v : cand) work += static_cast<int64_t>(v.size());
  }
  parallel_chunks(chunks, p.total, work, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      int64_t* h = h3c.data() + c * radix::kD3Bins;
      if (gather) {
        for (const uint32_t k : cand[c]) {
          if ((k >> radix::kD2Shift) == prefix23) h[radix::digit3(k)]++;
        }
      } else {
        const Chunk& ch = chunks[c];
        with_data(p.contig[ch.tensor], [&](auto* x) {
          for (int64_t i = ch.begin; i < ch.end; ++i) {
            const uint32_t k = key_at(x, i);
            if ((k >> radix::kD2Shift) == prefix23) h[radix::digit3(k)]++;
          }
        });
      }
    }
  });
  cand.clear();
  cand.shrink_to_fit();
  std::vector<int64_t> h3(radix::kD3Bins, 0);
  for (int64_t c = 0; c < nchunks; ++c)
    for (int i = 0; i < radix::kD3Bins; ++i) h3[i] += h3c[c * radix::kD3Bins + i];
  int64_t above3 = 0;
  const int b3 = radix::select_bin(h3.data(), radix::kD3Bins, want3, &above3);
  TORCH_CHECK(b3 >= 0, op, ": internal error (D3 histogram too small)");
  const int64_t need = want3 - above3;  // keys == T to keep, >= 1
  const uint32_t thr = (prefix23 << radix::kD2Shift) | static_cast<uint32_t>(b3);

  // Tie quota per chunk: the first `need` keys == T in chunk order.
  std::vector<int64_t> allowed(nchunks), eq(nchunks);
  int64_t before = 0;
  for (int64_t c = 0; c < nchunks; ++c) {
    eq[c] = h3c[c * radix::kD3Bins + b3];
    allowed[c] = std::min(eq[c], std::max<int64_t>(0, need - before));
    before += eq[c];
  }

  // Mask pass.
  parallel_chunks(chunks, p.total, p.total, [&](int64_t cb, int64_t ce) {
    for (int64_t c = cb; c < ce; ++c) {
      const Chunk& ch = chunks[c];
      bool* out = masks[ch.tensor].data_ptr<bool>();
      with_data(p.contig[ch.tensor], [&](auto* x) {
        write_mask(x, out, ch.begin, ch.end, thr, allowed[c], eq[c]);
      });
    }
  });
  return masks;
}

std::vector<at::Tensor> topk_masks_cpu(at::TensorList scores, int64_t keep) {
  return topk_impl(scores, keep, nullptr, "bip_fast::topk_masks");
}

std::vector<at::Tensor> topk_masks_hist_cpu(at::TensorList scores, int64_t keep,
                                            const at::Tensor& hist1) {
  return topk_impl(scores, keep, &hist1, "bip_fast::topk_masks_hist");
}

at::Tensor radix_histogram_cpu(at::TensorList scores, int64_t shift, int64_t bits, int64_t prefix,
                               int64_t prefix_shift) {
  const char* op = "bip_fast::radix_histogram";
  TORCH_CHECK(bits >= 1 && bits <= radix::kD1Bits, op, ": bits must be in [1, 12], got ", bits);
  TORCH_CHECK(shift >= 0 && shift <= 31, op, ": shift must be in [0, 31], got ", shift);
  TORCH_CHECK(prefix_shift >= 0, op, ": prefix_shift must be >= 0, got ", prefix_shift);
  TORCH_CHECK(prefix >= 0 && prefix <= 0xffffffffLL, op,
              ": prefix must be in [0, 2^32), got ", prefix);
  Prepared p = prepare(scores, op);
  at::Tensor out = at::zeros({kRadixBins}, at::TensorOptions().dtype(at::kLong));
  const std::vector<Chunk> chunks = make_chunks(p.numels);
  const bool use_prefix = prefix_shift < radix::kNoPrefixShift;
  global_hist(p, chunks, static_cast<int>(shift), static_cast<int>(bits), use_prefix,
              static_cast<uint32_t>(prefix), static_cast<int>(prefix_shift),
              out.data_ptr<int64_t>());
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(bip_fast, CPU, m) {
  m.impl("radix_histogram", &radix_histogram_cpu);
  m.impl("topk_masks", &topk_masks_cpu);
  m.impl("topk_masks_hist", &topk_masks_hist_cpu);
}

}  // namespace cpu
}  // namespace bip_fast
