# Multi-tensor global top-K mask by radix select (Triton).
#
# Algorithm. key(x) = bits(float32(|x|)) as uint32 (monotone in |x|; see docs/design.md). The
# K-th largest key T is found digit by digit, most significant first, without concatenating or
# sorting the scores:
#   pass 1: histogram of D1 = key >> 19 (4096 bins) over every element of every tensor;
#   pass 2: histogram of D2 = (key >> 7) & 0xfff over the elements whose D1 equals the chosen
#           bucket;
#   pass 3: histogram of D3 = key & 0x7f over the elements whose key >> 7 equals the chosen
#           prefix.
# After each pass a handful of small torch ops on the histogram (a suffix cumsum from the top,
# a count of buckets whose suffix still reaches k) pick the bucket holding the k-th largest key
# and the number k' of keys still needed inside it. Bucket, prefix, k and finally T and `need`
# (how many keys equal to T are kept) stay in device memory: the kernels read them through
# pointers, so the whole op has no host synchronisation and is traceable with fake tensors.
# Ties at T are broken by (tensor order, row-major flat index): a count kernel writes the number
# of keys == T of every block of BLOCK elements, an exclusive cumsum over the blocks of all
# tensors gives each block its rank offset, and the write kernel keeps key > T, plus key == T
# when block offset + in-block exclusive cumsum (tl.cumsum) < need.
#
# Traffic (N elements of b bytes over all tensors, fp32: b = 4): 3 histogram passes read 3Nb,
# the count pass reads Nb, the write pass reads Nb and writes N bytes of mask: about 5Nb + N
# bytes, plus 4096-entry histograms (one int64 atomic per non-empty bin per program) and one
# int32 per BLOCK elements for the tie counts. topk_masks_hist skips pass 1 (4Nb + N). No FLOPs
# worth counting, but tl.histogram with 4096 bins lowers (Triton <= 3.6 on NVIDIA) to a
# warp-ballot scheme costing ~30 warp instructions per element, so the histogram passes are
# instruction bound at a few tens of Gelem/s (well below HBM bandwidth); the count and write
# passes are bandwidth bound. Global atomics per element would be cheaper for the filtered
# passes but serialise badly when many scores share a bucket (e.g. constant initial scores).
#
# Limits / trade-offs. One launch per tensor per pass (no pointer tables, so that torch.compile
# can trace the op with fake tensors): 5 launches per tensor (4 with a precomputed D1
# histogram); fine for the tens of layers of a CNN, launch-bound for thousands of tiny tensors.
# Passes 2 and 3 reread all of the data even though few elements match the prefix; a compaction
# of candidates would save bandwidth when the top bucket is small, at the cost of a variable-size
# buffer. Non-contiguous inputs are made contiguous first (the logical row-major order defines
# ties), which costs a copy for them. Sizes up to 2**31 elements per tensor are handled with int64
# offsets; counts are int32 per block, int64 across blocks.

from typing import List

import torch
import triton
import triton.language as tl

from . import launch, register_triton_op

D1_SHIFT, D1_BITS = 19, 12
D2_SHIFT, D2_BITS = 7, 12
D3_SHIFT, D3_BITS = 0, 7
NUM_BINS = 4096

# Elements per histogram program = HIST_BLOCK * HIST_ITERS; one 4096-bin histogram flush each.
HIST_BLOCK = 1024
HIST_ITERS = 8
# Elements per tie-count / write program (the unit of the block-offset scan).
MASK_BLOCK = 2048


@triton.jit
def _abs_key(x):
    # float32 bits of |x| as a non-negative int32 (monotone in |x|).
    return x.to(tl.float32).to(tl.int32, bitcast=True) & 0x7FFFFFFF


@triton.jit
def _radix_hist_kernel(
    x_ptr, hist_ptr, prefix_ptr, n,
    SHIFT: tl.constexpr, BITS: tl.constexpr, PREFIX_SHIFT: tl.constexpr,
    HAS_PREFIX: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr,
):
    NBINS: tl.constexpr = 1 << BITS
    pid = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([NBINS], dtype=tl.int32)
    if HAS_PREFIX:
        prefix = tl.load(prefix_ptr).to(tl.int32)
    base = pid * (BLOCK * ITERS)
    for it in range(ITERS):
        offs = base + it * BLOCK + tl.arange(0, BLOCK)
        inb = offs < n
        key = _abs_key(tl.load(x_ptr + offs, mask=inb, other=0.0))
        sel = inb
        if HAS_PREFIX:
            sel = sel & ((key >> PREFIX_SHIFT) == prefix)
        digit = (key >> SHIFT) & (NBINS - 1)
        acc += tl.histogram(digit, NBINS, mask=sel)
    bins = tl.arange(0, NBINS)
    tl.atomic_add(hist_ptr + bins, acc.to(tl.int64), mask=acc != 0, sem="relaxed")


@triton.jit
def _tie_count_kernel(x_ptr, count_ptr, thr_ptr, n, block_start, BLOCK: tl.constexpr):
    # Block slots of this tensor start at count_ptr + block_start.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    thr = tl.load(thr_ptr).to(tl.int32)
    key = _abs_key(tl.load(x_ptr + offs, mask=inb, other=0.0))
    eq = (key == thr) & inb
    tl.store(count_ptr + block_start + pid, tl.sum(eq.to(tl.int32), axis=0))


@triton.jit
def _mask_write_kernel(
    x_ptr, out_ptr, offset_ptr, thr_ptr, need_ptr, n, block_start, BLOCK: tl.constexpr
):
    # offset_ptr + block_start: this tensor's first block slot (exclusive scan of tie counts).
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < n
    thr = tl.load(thr_ptr).to(tl.int32)
    need = tl.load(need_ptr)
    block_off = tl.load(offset_ptr + block_start + pid)
    key = _abs_key(tl.load(x_ptr + offs, mask=inb, other=0.0))
    eq = ((key == thr) & inb).to(tl.int32)
    rank = block_off + (tl.cumsum(eq, axis=0) - eq).to(tl.int64)
    keep = (key > thr) | ((eq != 0) & (rank < need))
    tl.store(out_ptr + offs, keep, mask=inb)


def _flat(scores: List[torch.Tensor]) -> List[torch.Tensor]:
    return [s.contiguous().view(-1) for s in scores]


def _accumulate_hist(flat, hist, prefix, shift, bits, prefix_shift):
    has_prefix = prefix_shift < 31
    per_prog = HIST_BLOCK * HIST_ITERS
    for x in flat:
        n = x.numel()
        if n == 0:
            continue
        launch(
            _radix_hist_kernel, (triton.cdiv(n, per_prog),),
            x, hist, prefix, n,
            SHIFT=shift, BITS=bits, PREFIX_SHIFT=prefix_shift if has_prefix else 0,
            HAS_PREFIX=has_prefix, BLOCK=HIST_BLOCK, ITERS=HIST_ITERS,
        )


def _choose_bucket(hist: torch.Tensor, k):
    """Bucket b holding the k-th largest key and k' = k - (#keys in buckets above b).

    hist: int64 [nbins]; k: int or int64 tensor of shape [1]. Both results are int64 [1]
    tensors on hist's device (no host synchronisation).
    """
    suffix = hist.flip(0).cumsum(0).flip(0)  # suffix[b] = #keys with digit >= b
    b = (suffix >= k).sum(0, keepdim=True) - 1  # suffix is non-increasing and suffix[0] >= k
    above = suffix.gather(0, b) - hist.gather(0, b)
    return b, k - above


def _select(flat, keep: int, hist1: torch.Tensor):
    """Threshold key T and the number `need` of keys == T to keep (int64 [1] tensors)."""
    dev = hist1.device
    b1, k2 = _choose_bucket(hist1, keep)
    hist2 = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)
    _accumulate_hist(flat, hist2, b1, D2_SHIFT, D2_BITS, D1_SHIFT)
    b2, k3 = _choose_bucket(hist2, k2)
    prefix2 = b1 * (1 << D2_BITS) + b2  # == key >> 7
    hist3 = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)
    _accumulate_hist(flat, hist3, prefix2, D3_SHIFT, D3_BITS, D2_SHIFT)
    b3, need = _choose_bucket(hist3[: 1 << D3_BITS], k3)
    thr = prefix2 * (1 << D3_BITS) + b3
    return thr, need


def _write_masks(flat, shapes, thr, need):
    dev = thr.device
    nblocks = [triton.cdiv(x.numel(), MASK_BLOCK) for x in flat]
    starts = [0]
    for nb in nblocks:
        starts.append(starts[-1] + nb)
    counts = torch.zeros(max(starts[-1], 1), dtype=torch.int32, device=dev)
    for x, nb, st in zip(flat, nblocks, starts):
        if nb:
            launch(_tie_count_kernel, (nb,), x, counts, thr, x.numel(), st, BLOCK=MASK_BLOCK)
    counts64 = counts.to(torch.int64)
    offsets = counts64.cumsum(0) - counts64
    masks = []
    for x, shape, nb, st in zip(flat, shapes, nblocks, starts):
        out = torch.empty(shape, dtype=torch.bool, device=dev)
        if nb:
            launch(
                _mask_write_kernel, (nb,),
                x, out, offsets, thr, need, x.numel(), st, BLOCK=MASK_BLOCK
            )
        masks.append(out)
    return masks


def _trivial(scores, keep: int):
    n = sum(s.numel() for s in scores)
    if keep <= 0:
        return [torch.zeros(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    if keep >= n:
        return [torch.ones(s.shape, dtype=torch.bool, device=s.device) for s in scores]
    return None


def radix_histogram_triton(
    scores: List[torch.Tensor], shift: int, bits: int, prefix: int, prefix_shift: int
) -> torch.Tensor:
    dev = scores[0].device if len(scores) else torch.device("cpu")
    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)
    if not scores:
        return hist
    pref = torch.full((1,), prefix, dtype=torch.int64, device=dev)
    _accumulate_hist(_flat(scores), hist, pref, shift, bits, prefix_shift)
    return hist


def topk_masks_triton(scores: List[torch.Tensor], keep: int) -> List[torch.Tensor]:
    trivial = _trivial(scores, keep)
    if trivial is not None:
        return trivial
    flat = _flat(scores)
    dev = flat[0].device
    hist1 = torch.zeros(NUM_BINS, dtype=torch.int64, device=dev)
    no_prefix = torch.zeros(1, dtype=torch.int64, device=dev)
    _accumulate_hist(flat, hist1, no_prefix, D1_SHIFT, D1_BITS, 31)
    thr, need = _select(flat, keep, hist1)
    return _write_masks(flat, [s.shape for s in scores], thr, need)


def topk_masks_hist_triton(
    scores: List[torch.Tensor], keep: int, hist1: torch.Tensor
) -> List[torch.Tensor]:
    trivial = _trivial(scores, keep)
    if trivial is not None:
        return trivial
    flat = _flat(scores)
    thr, need = _select(flat, keep, hist1.to(torch.int64))
    return _write_masks(flat, [s.shape for s in scores], thr, need)


_ops = {}


def register() -> None:
    if _ops:
        return
    _ops["radix_histogram"] = register_triton_op(
        "bip_fast::radix_histogram_triton", radix_histogram_triton, mutates_args=()
    )
    _ops["topk_masks"] = register_triton_op(
        "bip_fast::topk_masks_triton", topk_masks_triton, mutates_args=()
    )
    _ops["topk_masks_hist"] = register_triton_op(
        "bip_fast::topk_masks_hist_triton", topk_masks_hist_triton, mutates_args=()
    )
