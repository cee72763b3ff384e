"""bip_fast.compact on per-layer filter masks (``structure="filter"``): zero filters whose coupled
group lets them go are cut out, the rest stay as zeros, the function is kept (eval mode), and the
report's counts are right: worked out by hand on a toy residual network, and from each BatchNorm's
constant (an independent walk through the residual stream) on the CIFAR ResNet-20."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bip_fast
from bip_fast.compaction import LAST, LIVE, REACHES, count_macs
from bip_fast.models import ShortcutA, build
from bip_fast.nn import masked_modules

from _compact_helpers import bip_fast_modules, plain_params, randomise_norms, tv


class Toy(nn.Module):
    """stem -> bn0 -> relu -> (conv1 -> bn1 -> relu -> conv2 -> bn2) + identity -> relu -> pool -> fc.
    Groups: the residual stream {stem, bn0, conv2, bn2 | conv1 in, fc in} (5 channels), the block's
    inner channels {conv1, bn1 | conv2 in} (6), and fc's outputs (5, the model's output: whole)."""

    def __init__(self):
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.conv1, self.bn1 = nn.Conv2d(5, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 5, 3, padding=1, bias=False), nn.BatchNorm2d(5)
        self.fc = nn.Linear(5, 5)

    def forward(self, x):
        x = F.relu(self.bn0(self.stem(x)))
        y = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(x + self.bn2(self.conv2(y)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _filter_mask(mod, zero):
    keep = torch.ones(mod.weight.shape[0], dtype=torch.bool)
    keep[list(zero)] = False
    return keep.view(-1, *[1] * (mod.weight.dim() - 1)).expand(mod.weight.shape).contiguous()


def _toy():
    """Running statistics 0 / 1 and scale 1, so a zero filter's BatchNorm output is its shift β."""
    torch.manual_seed(0)
    model = Toy()
    with torch.no_grad():
        model.bn0.bias.copy_(torch.tensor([0.2, 0.1, 0.4, -0.3, 0.4]))
        model.bn1.bias.copy_(torch.tensor([-0.5, 0.0, 0.3, 0.2, 0.1, -0.2]))
        model.bn2.bias.copy_(torch.tensor([0.1, 0.2, -0.1, -0.2, -0.5]))
    bip_fast.sparsify(model, exclude=["fc"])
    m = dict(masked_modules(model))
    m["stem"].set_mask(_filter_mask(m["stem"], [0, 3, 4]))
    m["conv1"].set_mask(_filter_mask(m["conv1"], [0, 1, 2]))
    m["conv2"].set_mask(_filter_mask(m["conv2"], [1, 3, 4]))
    return model.eval()


def test_toy_counts_by_hand():
    """Inner group: conv1's zero filters 0, 1, 2 leave β = -0.5, 0.0, 0.3; the ReLU maps the first
    two to 0 (removed), 0.3 reaches conv2 (stays). Residual stream: channel 0 (stem zero, conv2
    not) and 1 (conv2 zero, stem not) are still produced (stay); channel 3 (both zero) carries
    relu(-0.3) = 0 into conv1 and relu(0 - 0.2) = 0 into fc (removed); channel 4 (both zero)
    carries relu(0.4) = 0.4 into conv1 (stays)."""
    model = _toy()
    x = torch.randn(2, 3, 8, 8)
    small, rep = bip_fast.compact(model, x, return_report=True)
    assert not bip_fast_modules(small)
    assert (rep.channels, rep.channels_removed, rep.channels_zero) == (6 + 5 + 5, 2 + 1, 1 + 3)
    assert (rep.filters, rep.filters_removed, rep.filters_zero) == (5 + 6 + 5 + 5, 1 + 2 + 1, 2 + 1 + 2)
    assert rep.kept_because == {LIVE: 2, REACHES: 2}
    assert rep.layers == {"stem": {"filters": 5, "removed": 1, "zero": 2},
                          "conv1": {"filters": 6, "removed": 2, "zero": 1},
                          "conv2": {"filters": 5, "removed": 1, "zero": 2},
                          "fc": {"filters": 5, "removed": 0, "zero": 0}}
    assert (small.stem.out_channels, small.bn0.num_features, small.conv1.in_channels) == (4, 4, 4)
    assert (small.conv1.out_channels, small.bn1.num_features, small.conv2.in_channels) == (4, 4, 4)
    assert (small.conv2.out_channels, small.bn2.num_features, small.fc.in_features) == (4, 4, 4)
    assert small.fc.out_features == 5
    # the kept zero filters are still zero, the live ones unchanged (stem kept 0, 1, 2, 4)
    assert torch.equal(small.stem.weight[[0, 3]], torch.zeros_like(small.stem.weight[[0, 3]]))
    torch.testing.assert_close(small.stem.weight[[1, 2]], model.stem.weight[[1, 2]].detach())
    xs = torch.randn(3, 3, 8, 8)  # other inputs than the example's
    with torch.no_grad():
        torch.testing.assert_close(small(xs), model(xs), rtol=1e-5, atol=1e-6)


def test_toy_positive_constant_flipped_becomes_removable():
    """The same toy with bn0's β of channel 4 made negative: channel 4 now goes too."""
    model = _toy()
    with torch.no_grad():
        model.bn0.bias[4] = -0.4
    small, rep = bip_fast.compact(model, torch.randn(2, 3, 8, 8), return_report=True)
    assert (rep.channels_removed, rep.channels_zero, rep.kept_because) == (4, 3, {LIVE: 2, REACHES: 1})
    assert small.stem.out_channels == small.conv2.out_channels == small.fc.in_features == 3


def _const(bn: nn.BatchNorm2d) -> torch.Tensor:
    """What an eval-mode BatchNorm outputs on a zero input channel (β − γ·μ/σ)."""
    with torch.no_grad():
        return bn.eval()(torch.zeros(1, bn.num_features, 1, 1)).flatten()


def _zero_filters(model, name) -> torch.Tensor:
    mk = dict(masked_modules(model))[name].mask
    return ~mk.reshape(mk.shape[0], -1).any(dim=1)


def _resnet_expected(model):
    """Independently of compact(): per block, the inner filters that go (zero, and the ReLU maps
    their BatchNorm constant to 0); and the residual stream walked channel by channel (a channel
    whose every producer is zero carries an input-independent value; it goes when every layer that
    reads it reads 0). Returns ({layer: removed filters}, {stage: stream channels removed})."""
    blocks = [(f"layer{s}.{i}", b) for s in (1, 2, 3) for i, b in enumerate(getattr(model, f"layer{s}"))]
    removed = {}
    for name, b in blocks:
        removed[f"{name}.conv1"] = int((_zero_filters(model, f"{name}.conv1") & (F.relu(_const(b.bn1)) == 0)).sum())
    # stream channel ids: (producers, values read) per channel, carried through the pads
    zs = _zero_filters(model, "conv1")
    c0 = F.relu(_const(model.bn1))
    chans = [{"layers": ["conv1"], "zero": bool(zs[j]), "reads": [], "val": float(c0[j]) if zs[j] else None}
             for j in range(zs.numel())]
    stream = list(range(len(chans)))
    stage_of = {}
    for name, b in blocks:
        if isinstance(b.shortcut, ShortcutA):
            new = [len(chans) + k for k in range(b.shortcut.pad_lo)]
            chans += [{"layers": [], "zero": True, "reads": [], "val": 0.0} for _ in new]
            tail = [len(chans) + k for k in range(b.shortcut.pad_hi)]
            chans += [{"layers": [], "zero": True, "reads": [], "val": 0.0} for _ in tail]
            stream = new + stream + tail
        zc, c2 = _zero_filters(model, f"{name}.conv2"), _const(b.bn2)
        for j, cid in enumerate(stream):
            ch = chans[cid]
            ch["reads"].append(ch["val"])  # conv1 of this block reads the stream
            ch["layers"].append(f"{name}.conv2")
            ch["zero"] &= bool(zc[j])
            ch["val"] = float(F.relu(c2[j] + ch["val"])) if ch["zero"] and ch["val"] is not None else None
            stage_of[cid] = name[:6]
    for cid in stream:
        chans[cid]["reads"].append(chans[cid]["val"])  # the classifier reads the last stage (pooled)
    stages = {"layer1": 0, "layer2": 0, "layer3": 0}
    for name in ["conv1"] + [f"{n}.conv2" for n, _ in blocks]:
        removed[name] = 0
    for cid, ch in enumerate(chans):
        if ch["zero"] and all(v == 0.0 for v in ch["reads"]):
            for layer in ch["layers"]:
                removed[layer] += 1
            # the channel leaves every stage it lives in
            for s in [n for n in stages if any(l.startswith(n) for l in ch["layers"])]:
                stages[s] += 1
    return removed, stages


def _zero_stream_channels(masked):
    """Stage-3 stream channels 0-3 (below the pad of layer3.0's shortcut: no earlier stage makes
    them) zeroed in all three layer3 conv2 filters, with BatchNorm constants below 0 except
    channel 3's in layer3.0 (0.5, read by layer3.1.conv1): channels 0-2 can go, 3 cannot."""
    mods = dict(masked_modules(masked))
    for i in range(3):
        conv, bn = mods[f"layer3.{i}.conv2"], masked.layer3[i].bn2
        mk = conv.mask.clone()
        mk[:4] = False
        conv.set_mask(mk)
        with torch.no_grad():
            bn.running_mean[:4] = 0.0
            bn.bias[:4] = torch.tensor([-0.3, -0.2, -0.1, 0.5 if i == 0 else -0.4])


@pytest.mark.parametrize("seed,stream", [(0, False), (1, False), (0, True)], ids=["seed0", "seed1", "stream"])
def test_resnet20_filter_masks(seed, stream):
    torch.manual_seed(seed)
    model = randomise_norms(build("resnet20"), seed=seed)
    alg = bip_fast.OMP(model, 0.5, structure="filter", exclude=["linear"])  # the structured benchmark's masks
    masked = alg.model.eval()
    if stream:
        _zero_stream_channels(masked)
    x = torch.randn(2, 3, 32, 32)
    small, rep = bip_fast.compact(masked, x, return_report=True)
    removed, stages = _resnet_expected(masked)
    for name, n in removed.items():
        assert rep.layers[name]["removed"] == n, name
    zero = {n: int(_zero_filters(masked, n).sum()) for n, _ in masked_modules(masked)}
    for name, row in rep.layers.items():
        assert row["removed"] + row["zero"] == zero.get(name, 0), name  # every zero filter is counted once
        mod = small.get_submodule(name)
        assert getattr(mod, "out_channels", getattr(mod, "out_features", None)) == row["filters"] - row["removed"]
    for s, planes in (("layer1", 16), ("layer2", 32), ("layer3", 64)):
        assert getattr(small, s)[0].conv2.out_channels == planes - stages[s], s
    if stream:
        assert stages["layer3"] == 3
    assert rep.filters_removed == sum(removed.values()) > 0
    assert rep.filters_zero == sum(zero.values()) - rep.filters_removed
    assert rep.channels_zero > 0 and set(rep.kept_because) <= {LIVE, REACHES, LAST}
    assert sum(p.numel() for p in small.parameters()) < plain_params(masked)
    assert count_macs(small, x[:1]) < count_macs(masked, x[:1])
    xs = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref = masked(xs)
        assert float((small(xs) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


@pytest.mark.filterwarnings("ignore:structure='filter'")
@pytest.mark.parametrize("make,shape", [(lambda: tv("resnet18", num_classes=10), (1, 3, 64, 64)),
                                        (lambda: tv("mobilenet_v2", num_classes=10), (1, 3, 32, 32))],
                         ids=["tv_resnet18", "tv_mobilenet_v2"])
def test_torchvision_filter_masks_keep_the_function(make, shape):
    """Projection shortcuts (ResNet-18), depthwise convolutions and linear bottlenecks without a
    ReLU (MobileNet-V2): whatever goes, the function stays and every zero filter is counted once."""
    torch.manual_seed(0)
    model = randomise_norms(make())
    masked = bip_fast.OMP(model, 0.5, structure="filter").model.eval()
    x = torch.randn(*shape)
    small, rep = bip_fast.compact(masked, x, return_report=True)  # checks masked == compacted itself
    zero = {n: int(_zero_filters(masked, n).sum()) for n, _ in masked_modules(masked)}
    assert rep.filters_removed + rep.filters_zero == sum(zero.values())
    assert all(rep.layers[n]["removed"] + rep.layers[n]["zero"] == z for n, z in zero.items())
    assert sum(rep.kept_because.values()) == rep.channels_zero
    xs = torch.randn(2, *shape[1:])
    with torch.no_grad():
        ref = masked(xs)
        assert float((small(xs) - ref).abs().max()) <= 1e-4 * float(ref.abs().max())


def test_group_masks_leave_no_zeros():
    """Group masks zero whole coupled channels, BatchNorm included: every zero filter goes."""
    torch.manual_seed(0)
    model = randomise_norms(build("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    bip_fast.attach_groups(model, x)
    masked = bip_fast.OMP(model, 0.5, structure="group").model.eval()
    small, rep = bip_fast.compact(masked, x, return_report=True)
    zero = sum(int(_zero_filters(masked, n).sum()) for n, _ in masked_modules(masked))
    assert rep.channels_zero == rep.filters_zero == 0 and rep.kept_because == {}
    assert rep.filters_removed == zero > 0 and rep.channels_removed > 0
