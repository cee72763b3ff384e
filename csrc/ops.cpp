// Every C++ op schema of bip_fast, in one TORCH_LIBRARY block (docs/design.md, "Ops").
// Kernels: csrc/cpu/*.cpp (CPU key), csrc/cuda/*.cu (CUDA key); fake (meta) kernels for
// torch.compile live in bip_fast/ops/_cpp_fake.py.
#include <torch/library.h>

TORCH_LIBRARY(bip_fast, m) {
  m.def(
      "radix_histogram(Tensor[] scores, int shift, int bits, int prefix, int prefix_shift) "
      "-> Tensor");
  m.def("topk_masks(Tensor[] scores, int keep) -> Tensor[]");
  m.def("topk_masks_hist(Tensor[] scores, int keep, Tensor hist1) -> Tensor[]");
  m.def("masked_weight(Tensor theta, Tensor mask) -> Tensor");
  m.def(
      "masked_weight_backward(Tensor grad, Tensor theta, Tensor mask, Tensor scores, "
      "float ig_scale, bool need_theta, bool need_scores) -> (Tensor, Tensor)");
  m.def(
      "fused_sgd_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
      "float lr, float momentum, float weight_decay, Tensor(c!)? hist1, Tensor? skip=None) -> ()");
}
