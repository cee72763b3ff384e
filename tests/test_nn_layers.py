"""Masked 1-D/3-D and transposed convolutions: the plain layer's forward, state-dict keys and
constructor, SPEC §3's gradients, finalize, filter-wise masks on the output channels."""
import pytest
import torch
from torch import nn

import bip_fast
from bip_fast.masks import project
from bip_fast.nn import MASKED_OF
from bip_fast.nn.convert import _ctor_kwargs
from bip_fast.pruning import get_algorithm

LAYERS = [
    (nn.Conv1d(4, 6, 3, stride=2, padding=1, groups=2), (2, 4, 9)),
    (nn.Conv3d(2, 4, (1, 3, 3), padding=(0, 1, 1), bias=False), (2, 2, 3, 5, 5)),
    (nn.ConvTranspose1d(4, 6, 3, stride=2, output_padding=1), (2, 4, 7)),
    (nn.ConvTranspose2d(4, 6, 3, stride=2, padding=1, output_padding=1, groups=2, dilation=1), (2, 4, 5, 5)),
    (nn.ConvTranspose3d(2, 3, 2, stride=2), (1, 2, 3, 3, 3)),
    (nn.Conv2d(3, 5, 3), (2, 3, 6, 6)),
    (nn.Linear(7, 5), (3, 7)),
]
IDS = [type(m).__name__ for m, _ in LAYERS]


def _masked(plain):
    torch.manual_seed(0)
    m = bip_fast.sparsify(nn.Sequential(plain))[0]
    assert type(m) is MASKED_OF[type(plain)]
    return m


def _plain_with(plain, weight):
    """A plain layer like ``plain`` whose weight is the tensor ``weight``."""
    ref = type(plain)(**_ctor_kwargs(plain))
    ref.load_state_dict(plain.state_dict())
    ref.weight = nn.Parameter(weight)
    return ref


@pytest.mark.parametrize("plain,shape", LAYERS, ids=IDS)
def test_masked_layer_is_the_plain_layer_on_masked_weights(plain, shape):
    torch.manual_seed(1)
    x = torch.randn(shape)
    ref_keys = set(plain.state_dict())
    masked = _masked(plain)
    assert set(masked.state_dict()) == ref_keys | {"scores", "mask"}
    mask = torch.rand(masked.weight.shape) < 0.6
    masked.set_mask(mask)
    ref = _plain_with(plain, masked.weight.detach() * mask)
    torch.testing.assert_close(masked(x), ref(x))
    # a plain state dict loads into the masked layer (scores from the weight, a full mask)
    fresh = MASKED_OF[type(plain)](**_ctor_kwargs(plain))
    fresh.load_state_dict(plain.state_dict())
    assert bool(fresh.mask.all()) and torch.equal(fresh.scores, plain.weight.detach().float())


@pytest.mark.parametrize("plain,shape", LAYERS, ids=IDS)
def test_gradients_follow_spec_3(plain, shape):
    torch.manual_seed(2)
    x = torch.randn(shape)
    masked = _masked(plain)
    masked.set_mask(torch.rand(masked.weight.shape) < 0.5)
    masked.ig_scale = 0.5
    out = masked(x)
    g_out = torch.randn_like(out)
    out.backward(g_out)
    # g = dl/dz for z = m * theta, by autograd through the plain layer
    ref = _plain_with(plain, masked.weight.detach() * masked.mask)
    ref(x).backward(g_out)
    g, m, th, s = ref.weight.grad, masked.mask, masked.weight.detach(), masked.scores.detach()
    sgn = torch.where(s >= 0, 1.0, -1.0)
    torch.testing.assert_close(masked.weight.grad, m * g)
    torch.testing.assert_close(masked.scores.grad, sgn * (th * g - 0.5 * m * g * g))


@pytest.mark.parametrize("plain,shape", LAYERS, ids=IDS)
def test_finalize_gives_the_plain_type_with_zeros(plain, shape):
    torch.manual_seed(3)
    x = torch.randn(shape)
    model = bip_fast.sparsify(nn.Sequential(plain))
    mask = torch.rand(model[0].weight.shape) < 0.5
    model[0].set_mask(mask)
    want = model(x).detach()
    bip_fast.finalize(model)
    assert type(model[0]) is type(plain) and bool((model[0].weight[~mask] == 0).all())
    torch.testing.assert_close(model(x), want)


def test_transposed_output_size_argument():
    m = _masked(nn.ConvTranspose2d(3, 2, 3, stride=2))
    x = torch.randn(1, 3, 4, 4)
    assert m(x, output_size=[10, 10]).shape[-2:] == (10, 10)
    assert m(x).shape[-2:] == (9, 9)


def test_filter_wise_masks_follow_the_output_channels():
    conv = _masked(nn.Conv2d(4, 6, 3))
    tconv = _masked(nn.ConvTranspose2d(4, 6, 3))  # weight (in 4, out 6, 3, 3)
    scores = [conv.scores.detach(), tconv.scores.detach()]
    masks = project(scores, 0.5, "filter", out_dims=[conv.out_dim, tconv.out_dim])
    # whole output channels kept or dropped: dimension 0 for a conv, 1 for a transposed conv
    per_out = masks[1].transpose(0, 1).reshape(6, -1)
    assert bool((per_out.all(dim=1) | ~per_out.any(dim=1)).all()) and int(per_out.all(dim=1).sum()) == 3
    per_in = masks[1].reshape(4, -1)
    assert not bool((per_in.all(dim=1) | ~per_in.any(dim=1)).all())
    chan = project(scores, 0.5, "channel", out_dims=[0, 1])[1].reshape(4, -1)
    assert bool((chan.all(dim=1) | ~chan.any(dim=1)).all())
    with pytest.raises(ValueError, match="out_dims"):
        project(scores, 0.5, "filter", out_dims=[0])


@pytest.mark.parametrize("structure", ["global", "filter"])
def test_bip_prunes_a_1d_and_3d_convnet_to_exact_k(structure):
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv1d(3, 8, 3, padding=1), nn.ReLU(), nn.ConvTranspose1d(8, 8, 2, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 16, 4))
    alg = get_algorithm("bip")(model, 0.75, structure=structure, total_steps=3)
    batch = (torch.randn(4, 3, 8), torch.randint(0, 4, (4,)))
    for _ in range(3):
        alg.step(batch, batch)
    rep = bip_fast.sparsity_report(alg.model)
    assert not rep["skipped"]
    if structure == "global":
        assert rep["kept"] == round(0.25 * rep["numel"])
    else:  # whole output channels of the transposed conv: its weight's dimension 1
        m = alg.model[2].mask.transpose(0, 1).reshape(8, -1)
        assert bool((m.all(dim=1) | ~m.any(dim=1)).all())
    model3 = nn.Sequential(nn.Conv3d(1, 4, 3, padding=1), nn.Flatten(), nn.Linear(4 * 27, 2))
    alg3 = get_algorithm("omp")(model3, 0.5, total_steps=1)
    alg3.step((torch.randn(2, 1, 3, 3, 3), torch.randint(0, 2, (2,))))
    assert bip_fast.sparsity_report(alg3.model)["kept"] == round(0.5 * (4 * 27 + 4 * 27 * 2))
