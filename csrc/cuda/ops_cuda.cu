// Host wrappers and CUDA registrations of the bip_fast ops (schemas: csrc/ops.cpp; semantics:
// docs/design.md "Ops"). Validation, .contiguous() views, output allocation, segment tables;
// the kernels and their launchers are in topk.cu, fused_sgd.cu and masked_weight.cu.
//
// This file holds host code only. Everything below is skipped by the device compilation passes
// (__CUDA_ARCH__ defined), so the PyTorch headers are parsed once for the host instead of once
// per -gencode target; the kernel files include no PyTorch header at all.
//
// No op synchronises with the host: scalars decided on the device (the top-K threshold) stay
// on the device; segment tables go up with one asynchronous copy from pinned memory.
#if !defined(__CUDA_ARCH__)
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <utility>

#include "cuda_utils.cuh"

namespace bip_fast {
namespace cuda {
namespace {

using radix::kRadixBins;

// ---------------------------------------------------------------- topk / radix_histogram ----
struct PreparedScores {
  std::vector<at::Tensor> contig;  // keeps the .contiguous() copies alive until launched
  std::vector<TopkSeg> segs;
  int64_t total = 0;
  int64_t nchunks = 0;
};

PreparedScores prepare_scores(at::TensorList scores, const char* op,
                              std::vector<at::Tensor>* masks) {
  PreparedScores p;
  const at::Device dev = scores[0].device();
  p.contig.reserve(scores.size());
  p.segs.reserve(scores.size());
  for (const auto i : c10::irange(scores.size())) {
    const at::Tensor& s = scores[i];
    check_cuda_tensor(s, dev, op, "scores", static_cast<int64_t>(i));
    const int32_t code = dtype_code(s, op, "scores", static_cast<int64_t>(i));
    at::Tensor c = s.contiguous();
    TopkSeg seg{};
    seg.in = c.const_data_ptr();
    seg.numel = c.numel();
    seg.chunk_begin = p.nchunks;
    seg.dtype = code;
    seg.vec_ok = aligned_to(seg.in, 4 * dtype_size(code)) ? 1 : 0;
    seg.out = nullptr;
    if (masks != nullptr) {
      masks->push_back(at::empty(s.sizes(), s.options().dtype(at::kBool).memory_format(
                                                at::MemoryFormat::Contiguous)));
      seg.out = masks->back().data_ptr<bool>();
      TORCH_CHECK(seg.numel == 0 || aligned_to(seg.out, 4), op,
                  ": internal error: mask allocation is not 4-byte aligned");
    }
    p.total += seg.numel;
    p.nchunks += chunks_of(seg.numel);
    p.segs.push_back(seg);
    p.contig.push_back(std::move(c));
  }
  return p;
}

std::vector<at::Tensor> topk_impl(at::TensorList scores, int64_t keep, const at::Tensor* hist1,
                                  const char* op) {
  std::vector<at::Tensor> masks;
  if (scores.empty()) {
    TORCH_CHECK(keep == 0, op, ": keep must be 0 for an empty list of scores, got ", keep);
    return masks;
  }
  const at::Device dev = scores[0].device();
  check_cuda_tensor(scores[0], dev, op, "scores", 0);
  const c10::cuda::CUDAGuard guard(dev);
  masks.reserve(scores.size());
  PreparedScores p = prepare_scores(scores, op, &masks);
  TORCH_CHECK(keep >= 0 && keep <= p.total, op, ": keep must be in [0, ", p.total,
              "] (total number of scores), got ", keep);
  at::Tensor hist1_c;
  if (hist1 != nullptr) {
    check_cuda_tensor(*hist1, dev, op, "hist1");
    TORCH_CHECK(hist1->scalar_type() == at::kLong, op, ": hist1 must be int64, got ",
                hist1->scalar_type());
    TORCH_CHECK(hist1->dim() == 1 && hist1->numel() == kRadixBins, op,
                ": hist1 must have shape (", kRadixBins, ",), got ", hist1->sizes());
    hist1_c = hist1->contiguous();
  }
  if (p.total == 0) return masks;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor table = upload_table(p.segs, dev);
  const TopkSeg* segs = reinterpret_cast<const TopkSeg*>(table.const_data_ptr());
  const int nseg = static_cast<int>(p.segs.size());
  const int grid = grid_for_chunks(p.nchunks);
  if (keep == 0 || keep == p.total) {
    C10_CUDA_CHECK(launch_topk_fill(segs, nseg, p.nchunks, grid, keep == 0 ? 0 : 1, stream));
    return masks;
  }
  at::Tensor ws = at::empty({topk_workspace_slots(p.nchunks)}, scores[0].options().dtype(at::kLong));
  at::Tensor ch3 = at::empty({p.nchunks * radix::kD3Bins}, scores[0].options().dtype(at::kInt));
  C10_CUDA_CHECK(launch_topk_select(segs, nseg, p.nchunks, grid, keep,
                                    hist1 != nullptr ? hist1_c.const_data_ptr<int64_t>() : nullptr,
                                    ws.data_ptr<int64_t>(), ch3.data_ptr<int32_t>(), stream));
  return masks;
}

std::vector<at::Tensor> topk_masks_cuda(at::TensorList scores, int64_t keep) {
  return topk_impl(scores, keep, nullptr, "bip_fast::topk_masks");
}

std::vector<at::Tensor> topk_masks_hist_cuda(at::TensorList scores, int64_t keep,
                                             const at::Tensor& hist1) {
  return topk_impl(scores, keep, &hist1, "bip_fast::topk_masks_hist");
}

at::Tensor radix_histogram_cuda(at::TensorList scores, int64_t shift, int64_t bits,
                                int64_t prefix, int64_t prefix_shift) {
  const char* op = "bip_fast::radix_histogram";
  TORCH_CHECK(bits >= 1 && bits <= radix::kD1Bits, op, ": bits must be in [1, 12], got ", bits);
  TORCH_CHECK(shift >= 0 && shift <= 31, op, ": shift must be in [0, 31], got ", shift);
  TORCH_CHECK(prefix_shift >= 0, op, ": prefix_shift must be >= 0, got ", prefix_shift);
  TORCH_CHECK(prefix >= 0 && prefix <= 0xffffffffLL, op, ": prefix must be in [0, 2^32), got ",
              prefix);
  TORCH_CHECK(!scores.empty(), op,
              ": scores must hold at least one tensor (the output device is scores[0]'s)");
  const at::Device dev = scores[0].device();
  check_cuda_tensor(scores[0], dev, op, "scores", 0);
  const c10::cuda::CUDAGuard guard(dev);
  PreparedScores p = prepare_scores(scores, op, nullptr);
  at::Tensor out = at::zeros({kRadixBins}, scores[0].options().dtype(at::kLong));
  if (p.total == 0) return out;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor table = upload_table(p.segs, dev);
  const int ps = prefix_shift >= radix::kNoPrefixShift ? radix::kNoPrefixShift
                                                       : static_cast<int>(prefix_shift);
  C10_CUDA_CHECK(launch_radix_histogram(
      reinterpret_cast<const TopkSeg*>(table.const_data_ptr()), static_cast<int>(p.segs.size()),
      p.nchunks, grid_for_chunks(p.nchunks), static_cast<int>(shift), static_cast<int>(bits), ps,
      static_cast<uint32_t>(prefix), out.data_ptr<int64_t>(), stream));
  return out;
}

// ------------------------------------------------------------------------------ fused_sgd_ ----
bool same_layout(const at::Tensor& a, const at::Tensor& ref) {
  return a.is_non_overlapping_and_dense() && a.strides() == ref.strides();
}

void fused_sgd_cuda(at::TensorList params, at::TensorList grads, at::TensorList bufs, double lr,
                    double momentum, double weight_decay, const std::optional<at::Tensor>& hist1,
                    const std::optional<at::Tensor>& skip) {
  const char* op = "bip_fast::fused_sgd_";
  TORCH_CHECK(grads.size() == params.size(), op, ": grads must have one tensor per param (",
              params.size(), "), got ", grads.size());
  TORCH_CHECK(bufs.size() == params.size(), op,
              ": momentum_buffers must have one tensor per param (", params.size(), "), got ",
              bufs.size());
  if (params.empty()) return;
  const at::Device dev = params[0].device();
  check_cuda_tensor(params[0], dev, op, "params", 0);
  const c10::cuda::CUDAGuard guard(dev);
  const bool has_hist = hist1.has_value() && hist1->defined();
  if (has_hist) {
    check_cuda_tensor(*hist1, dev, op, "hist1");
    TORCH_CHECK(hist1->scalar_type() == at::kLong, op, ": hist1 must be int64, got ",
                hist1->scalar_type());
    TORCH_CHECK(hist1->dim() == 1 && hist1->numel() == kRadixBins, op,
                ": hist1 must have shape (", kRadixBins, ",), got ", hist1->sizes());
    TORCH_CHECK(hist1->is_contiguous(), op, ": hist1 must be contiguous (it is updated in place)");
  }
  const bool has_skip = skip.has_value() && skip->defined();
  if (has_skip) {  // read on the device by every block: no host synchronisation
    check_cuda_tensor(*skip, dev, op, "skip");
    TORCH_CHECK(skip->scalar_type() == at::kBool && skip->numel() == 1, op,
                ": skip must be a one-element bool tensor, got ", skip->scalar_type(), " ",
                skip->sizes());
  }

  std::vector<SgdSeg> segs;
  segs.reserve(params.size());
  std::vector<at::Tensor> keep_alive;                         // working tensors of the kernel
  std::vector<std::pair<at::Tensor, at::Tensor>> write_back;  // (user tensor, working copy)
  int64_t nchunks = 0;
  for (const auto i : c10::irange(params.size())) {
    const int64_t idx = static_cast<int64_t>(i);
    const at::Tensor& P = params[i];
    const at::Tensor& G = grads[i];
    const at::Tensor& B = bufs[i];
    check_cuda_tensor(P, dev, op, "params", idx);
    check_cuda_tensor(G, dev, op, "grads", idx);
    check_cuda_tensor(B, dev, op, "momentum_buffers", idx);
    const int32_t code = dtype_code(P, op, "params", idx);
    TORCH_CHECK(G.scalar_type() == P.scalar_type(), op, ": grads[", i, "] must have dtype ",
                P.scalar_type(), " like params[", i, "], got ", G.scalar_type());
    TORCH_CHECK(B.scalar_type() == P.scalar_type(), op, ": momentum_buffers[", i,
                "] must have dtype ", P.scalar_type(), " like params[", i, "], got ",
                B.scalar_type());
    TORCH_CHECK(G.sizes() == P.sizes(), op, ": grads[", i, "] must have shape ", P.sizes(),
                " like params[", i, "], got ", G.sizes());
    TORCH_CHECK(B.sizes() == P.sizes(), op, ": momentum_buffers[", i, "] must have shape ",
                P.sizes(), " like params[", i, "], got ", B.sizes());
    if (P.numel() == 0) continue;
    // Dense tensors with equal strides are updated in memory order (elementwise update,
    // order-independent histogram); anything else goes through copies in the param's layout.
    at::Tensor pw = P;
    if (!P.is_non_overlapping_and_dense()) {
      pw = P.contiguous();
      write_back.emplace_back(P, pw);
    }
    at::Tensor bw = B;
    if (!same_layout(B, pw)) {
      bw = at::empty_like(pw);
      bw.copy_(B);
      write_back.emplace_back(B, bw);
    }
    at::Tensor gw = G;
    if (!same_layout(G, pw)) {
      gw = at::empty_like(pw);
      gw.copy_(G);
    }
    SgdSeg s{};
    s.p = pw.data_ptr();
    s.g = gw.const_data_ptr();
    s.b = bw.data_ptr();
    s.numel = pw.numel();
    s.chunk_begin = nchunks;
    s.dtype = code;
    const int64_t vb = 4 * dtype_size(code);
    s.vec_ok = (aligned_to(s.p, vb) && aligned_to(s.g, vb) && aligned_to(s.b, vb)) ? 1 : 0;
    nchunks += chunks_of(s.numel);
    segs.push_back(s);
    keep_alive.push_back(pw);
    keep_alive.push_back(gw);
    keep_alive.push_back(bw);
  }
  if (nchunks == 0) return;

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const at::Tensor table = upload_table(segs, dev);
  C10_CUDA_CHECK(launch_fused_sgd(reinterpret_cast<const SgdSeg*>(table.const_data_ptr()),
                                  static_cast<int>(segs.size()), nchunks,
                                  grid_for_chunks(nchunks), static_cast<float>(lr),
                                  static_cast<float>(momentum), static_cast<float>(weight_decay),
                                  has_hist ? hist1->data_ptr<int64_t>() : nullptr,
                                  has_skip ? skip->const_data_ptr<bool>() : nullptr, stream));
  for (auto& wb : write_back) wb.first.copy_(wb.second);
}

// ----------------------------------------------------------------------- masked_weight ----
void check_mask(const at::Tensor& mask, const at::Tensor& theta, const char* op) {
  check_cuda_tensor(mask, theta.device(), op, "mask");
  TORCH_CHECK(mask.scalar_type() == at::kBool, op, ": mask must be bool, got ",
              mask.scalar_type());
  TORCH_CHECK(mask.sizes() == theta.sizes(), op, ": mask must have shape ", theta.sizes(),
              " like theta, got ", mask.sizes());
}

at::Tensor masked_weight_cuda(const at::Tensor& theta, const at::Tensor& mask) {
  const char* op = "bip_fast::masked_weight";
  check_cuda_tensor(theta, theta.device(), op, "theta");
  const int32_t code = dtype_code(theta, op, "theta", -1);
  check_mask(mask, theta, op);
  const c10::cuda::CUDAGuard guard(theta.device());
  const at::Tensor t = theta.contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor out =
      at::empty(theta.sizes(), theta.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t n = t.numel();
  if (n == 0) return out;
  const int64_t vb = 4 * dtype_size(code);
  const bool vec_ok = aligned_to(t.const_data_ptr(), vb) && aligned_to(m.const_data_ptr(), 4) &&
                      aligned_to(out.data_ptr(), vb);
  C10_CUDA_CHECK(launch_masked_weight(code, t.const_data_ptr(), m.const_data_ptr<bool>(),
                                      out.data_ptr(), n, vec_ok,
                                      grid_for_items(vec_ok ? (n + 3) / 4 : n),
                                      c10::cuda::getCurrentCUDAStream()));
  return out;
}

std::tuple<at::Tensor, at::Tensor> masked_weight_backward_cuda(
    const at::Tensor& grad, const at::Tensor& theta, const at::Tensor& mask,
    const at::Tensor& scores, double ig_scale, bool need_theta, bool need_scores) {
  const char* op = "bip_fast::masked_weight_backward";
  check_cuda_tensor(theta, theta.device(), op, "theta");
  const int32_t tcode = dtype_code(theta, op, "theta", -1);
  check_cuda_tensor(grad, theta.device(), op, "grad");
  dtype_code(grad, op, "grad", -1);
  TORCH_CHECK(grad.sizes() == theta.sizes(), op, ": grad must have shape ", theta.sizes(),
              " like theta, got ", grad.sizes());
  check_mask(mask, theta, op);
  check_cuda_tensor(scores, theta.device(), op, "scores");
  const int32_t scode = dtype_code(scores, op, "scores", -1);
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

  // grad has theta's dtype in every autograd use; another dtype is converted (one copy).
  const at::Tensor g = grad.to(theta.scalar_type()).contiguous();
  const at::Tensor m = mask.contiguous();
  at::Tensor t, s;  // only read for gscores
  if (need_scores) {
    t = theta.contiguous();
    s = scores.contiguous();
  }
  const void* tp = need_scores ? t.const_data_ptr() : nullptr;
  const void* sp = need_scores ? s.const_data_ptr() : nullptr;
  void* dp = need_theta ? dtheta.data_ptr() : nullptr;
  void* gp = need_scores ? gscores.data_ptr() : nullptr;
  const int64_t vt = 4 * dtype_size(tcode);
  const int64_t vs = 4 * dtype_size(scode);
  const bool vec_ok = aligned_to(g.const_data_ptr(), vt) && aligned_to(m.const_data_ptr(), 4) &&
                      (tp == nullptr || aligned_to(tp, vt)) &&
                      (sp == nullptr || aligned_to(sp, vs)) &&
                      (dp == nullptr || aligned_to(dp, vt)) &&
                      (gp == nullptr || aligned_to(gp, vs));
  C10_CUDA_CHECK(launch_masked_weight_backward(
      tcode, scode, g.const_data_ptr(), tp, m.const_data_ptr<bool>(), sp,
      static_cast<float>(ig_scale), dp, gp, n, vec_ok, grid_for_items(vec_ok ? (n + 3) / 4 : n),
      c10::cuda::getCurrentCUDAStream()));
  return {dtheta, gscores};
}

}  // namespace

TORCH_LIBRARY_IMPL(bip_fast, CUDA, m) {
  m.impl("radix_histogram", &radix_histogram_cuda);
  m.impl("topk_masks", &topk_masks_cuda);
  m.impl("topk_masks_hist", &topk_masks_hist_cuda);
  m.impl("fused_sgd_", &fused_sgd_cuda);
  m.impl("masked_weight", &masked_weight_cuda);
  m.impl("masked_weight_backward", &masked_weight_backward_cuda);
}

}  // namespace cuda
}  // namespace bip_fast
#endif  // !__CUDA_ARCH__
