"""Plain-PyTorch expectations shared by the kernel test files.

Written independently of bip_fast.ops.reference (a stable sort of the concatenated radix keys),
so the kernel tests do not rest on the code under test.
"""

import torch


def keys_of(xs):
    """uint32 radix keys of |x| (as int64, on the CPU) of every score: logical row-major order,
    tensors in order."""
    if not xs:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([(x.detach().cpu().float().contiguous().view(torch.int32).flatten().long() & 0x7FFFFFFF)
                      for x in xs])


def topk_plain(xs, keep):
    """Bool masks of the `keep` largest |x| over all tensors; ties to the earlier flat position."""
    keys = keys_of(xs)
    order = torch.sort(-keys, stable=True).indices
    flat = torch.zeros(keys.numel(), dtype=torch.bool)
    flat[order[:keep]] = True
    out, off = [], 0
    for x in xs:
        out.append(flat[off:off + x.numel()].view(x.shape))
        off += x.numel()
    return out


def hist_plain(xs, shift, bits, prefix, prefix_shift):
    """Histogram (4096 bins) of one radix digit over the keys that match the prefix."""
    keys = keys_of(xs)
    if prefix_shift < 31:
        keys = keys[(keys >> prefix_shift) == prefix]
    return torch.bincount((keys >> shift) & ((1 << bits) - 1), minlength=4096)


def scores_of_kind(kind, shapes, dtype, seed=0):
    """Score tensors for kernel tests: "randn", "int" (heavy ties, mixed signs, zeros included)
    or "equal" (every score -0.5)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "randn":
        xs = [torch.randn(s, generator=g) for s in shapes]
    elif kind == "int":
        xs = [torch.randint(-3, 4, s, generator=g).float() for s in shapes]
    elif kind == "equal":
        xs = [torch.full(s, -0.5) for s in shapes]
    else:
        raise AssertionError(kind)
    return [x.to(dtype) for x in xs]
