// Radix key and digit layout shared by every C++/CUDA backend of bip_fast.
//
// key(x) = bits(float32(|x|)) as uint32 = float_as_uint(float(x)) & 0x7fffffff.
// key is monotone in |x|; non-finite x has key >= 0x7f800000 (NaN above +inf).
// Three digit passes select the keep-th largest key exactly:
//   D1 = key >> 19           (12 bits, 4096 bins)
//   D2 = (key >> 7) & 0xfff  (12 bits, 4096 bins)
//   D3 = key & 0x7f          ( 7 bits,  128 bins)
// A histogram is an int64 tensor of kRadixBins (4096) counts; D3 uses the first 128.
// This header is usable from host C++ and from CUDA device code.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define BIP_FAST_HD __host__ __device__ __forceinline__
#else
#define BIP_FAST_HD inline
#endif

namespace bip_fast {
namespace radix {

constexpr int kRadixBins = 4096;  // histogram length for every pass
constexpr uint32_t kAbsMask = 0x7fffffffu;

constexpr int kD1Shift = 19;
constexpr int kD1Bits = 12;
constexpr int kD2Shift = 7;
constexpr int kD2Bits = 12;
constexpr int kD3Shift = 0;
constexpr int kD3Bits = 7;
constexpr int kD3Bins = 1 << kD3Bits;  // 128

// prefix_shift >= kNoPrefixShift means "no prefix filter" in radix_histogram.
constexpr int kNoPrefixShift = 31;

BIP_FAST_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// The radix key of a float32 value (callers upcast half/bfloat16 exactly first).
BIP_FAST_HD uint32_t key_of(float x) { return float_bits(x) & kAbsMask; }

BIP_FAST_HD uint32_t digit1(uint32_t key) { return key >> kD1Shift; }
BIP_FAST_HD uint32_t digit2(uint32_t key) { return (key >> kD2Shift) & ((1u << kD2Bits) - 1u); }
BIP_FAST_HD uint32_t digit3(uint32_t key) { return key & ((1u << kD3Bits) - 1u); }

// Generic digit: ((key >> shift) & ((1 << bits) - 1)), bits in [1, 12], shift in [0, 31].
BIP_FAST_HD uint32_t digit(uint32_t key, int shift, int bits) {
  return (key >> shift) & ((1u << bits) - 1u);
}

// True when key passes the prefix filter (key >> prefix_shift) == prefix.
BIP_FAST_HD bool prefix_match(uint32_t key, uint32_t prefix, int prefix_shift) {
  return prefix_shift >= kNoPrefixShift ? true : ((key >> prefix_shift) == prefix);
}

// Given a histogram (descending scan from the top bin) and `want` >= 1 elements still to
// take, return the bin holding the want-th largest element; *above receives the count of
// elements in strictly higher bins. Requires sum(hist[0..nbins)) >= want.
template <typename Count>
BIP_FAST_HD int select_bin(const Count* hist, int nbins, int64_t want, int64_t* above) {
  int64_t acc = 0;
  for (int b = nbins - 1; b >= 0; --b) {
    const int64_t c = static_cast<int64_t>(hist[b]);
    if (acc + c >= want) {
      *above = acc;
      return b;
    }
    acc += c;
  }
  *above = acc;
  return -1;  // not enough elements (caller bug)
}

}  // namespace radix
}  // namespace bip_fast
