"""Toy models, batches and hand-written references shared by the test_pruning_* files.

Expected values come from explicit formulas (SGD: d = g + wd·p; b = μ·b + d; p −= lr·b) and, for
the gradients of the small reference networks, from plain PyTorch autograd on a functional copy
of the model — never from bip_fast code.
"""

import torch
import torch.nn.functional as F
from torch import nn


# ----------------------------------------------------------------------------- toy models
W1 = torch.tensor([[0.50, -0.10, 0.30], [-0.70, 0.20, 0.05], [0.15, -0.40, 0.90], [0.25, 0.60, -0.35]])
W2 = torch.tensor([[0.80, -0.30, 0.45, -0.12], [-0.55, 0.65, 0.08, 0.33]])
B2 = torch.tensor([0.1, -0.2])


class Counting(nn.Module):
    """Wraps a network and counts forward calls."""

    def __init__(self, net):
        super().__init__()
        self.net = net
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return self.net(x)


def linear_toy(bn=False, relu=False):
    """x -> W1 (no bias) [-> BatchNorm1d] [-> ReLU] -> W2 + b2, with the hand-set weights."""
    layers = [nn.Linear(3, 4, bias=False)]
    if bn:
        layers.append(nn.BatchNorm1d(4))
    if relu:
        layers.append(nn.ReLU())
    layers.append(nn.Linear(4, 2))
    net = nn.Sequential(*layers)
    with torch.no_grad():
        net[0].weight.copy_(W1)
        net[-1].weight.copy_(W2)
        net[-1].bias.copy_(B2)
        if bn:
            net[1].weight.copy_(torch.tensor([1.1, 0.9, 1.2, 0.8]))
            net[1].bias.copy_(torch.tensor([0.05, -0.05, 0.1, 0.0]))
    return Counting(net)


def lin_loss(out, t):
    """Linear loss: dℓ/dout = t, so the gradients of the linear toy have closed forms."""
    return (out * t).sum()


def batches(seed, n, b=5):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, generator=g), torch.randn(b, 2, generator=g)) for _ in range(n)]


def cls_batches(seed, n, b=6):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, generator=g), torch.randint(0, 2, (b,), generator=g)) for _ in range(n)]


def global_topk(scores, keep):
    """Reference global top-K of |s|: ties to the earlier tensor, then the lower flat index."""
    flat = torch.cat([s.detach().abs().reshape(-1) for s in scores])
    order = torch.sort(flat, descending=True, stable=True).indices[:keep]
    m = torch.zeros_like(flat, dtype=torch.bool)
    m[order] = True
    out, i = [], 0
    for s in scores:
        out.append(m[i:i + s.numel()].view(s.shape))
        i += s.numel()
    return out


def sgn(s):
    return torch.where(s >= 0, torch.ones_like(s), -torch.ones_like(s))


def ref_grads(params, masks, batch, loss_fn, bn=False, relu=False):
    """dℓ/dz for z = m⊙θ of both layers, plus grads of b2 and the BN affine parameters (autograd
    on a functional copy of the toy)."""
    x, t = batch
    z1 = (masks[0] * params["W1"]).detach().requires_grad_()
    z2 = (masks[1] * params["W2"]).detach().requires_grad_()
    leaves = [z1, z2]
    b2 = params["b2"].detach().clone().requires_grad_()
    leaves.append(b2)
    h = x @ z1.T
    if bn:
        bw = params["bn_w"].detach().clone().requires_grad_()
        bb = params["bn_b"].detach().clone().requires_grad_()
        leaves += [bw, bb]
        h = F.batch_norm(h, None, None, bw, bb, training=True)
    if relu:
        h = h.relu()
    out = h @ z2.T + b2
    grads = torch.autograd.grad(loss_fn(out, t), leaves)
    names = ["g1", "g2", "b2"] + (["bn_w", "bn_b"] if bn else [])
    return dict(zip(names, grads))


# ----------------------------------------------------------------------------- conv models
def conv_net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4),
    )


def img_batches(seed, n, b=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(b, 3, 6, 6, generator=g), torch.randint(0, 4, (b,), generator=g)) for _ in range(n)]
