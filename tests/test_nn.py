"""Drop-in masked modules, sparsify / finalize / sparsity_report."""

import copy
import inspect

import pytest
import torch
from torch import nn

import bip_fast
from bip_fast.nn import MaskedConv2d, MaskedLinear, masked_modules


def _net():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 10),
    )


def test_constructor_signatures_and_state_dict_keys():
    for masked, plain in ((MaskedConv2d, nn.Conv2d), (MaskedLinear, nn.Linear)):
        sig_m = list(inspect.signature(masked.__init__).parameters)
        sig_p = list(inspect.signature(plain.__init__).parameters)
        assert sig_m == sig_p
    conv = MaskedConv2d(3, 4, 3, padding=1)
    assert set(conv.state_dict()) == {"weight", "bias", "scores", "mask"}
    assert conv.mask.dtype == torch.bool and conv.mask.all()
    assert conv.scores.dtype == torch.float32 and torch.equal(conv.scores, conv.weight)
    lin = MaskedLinear(5, 2, bias=False)
    assert set(lin.state_dict()) == {"weight", "scores", "mask"}
    # a plain nn.Linear state dict loads (scores from the weight, full mask)
    plain = nn.Linear(5, 2, bias=False)
    lin.load_state_dict(plain.state_dict())
    assert torch.equal(lin.weight, plain.weight) and torch.equal(lin.scores, plain.weight) and lin.mask.all()


def test_forward_equals_dense_with_masked_weight_and_gradients():
    conv = MaskedConv2d(3, 4, 3, padding=1)
    ref = nn.Conv2d(3, 4, 3, padding=1)
    ref.load_state_dict({"weight": conv.weight.detach().clone(), "bias": conv.bias.detach().clone()})
    m = torch.rand(conv.weight.shape) > 0.5
    conv.set_mask(m)
    conv.ig_scale = 0.5
    with torch.no_grad():
        ref.weight.mul_(m)
    x = torch.randn(2, 3, 6, 6)
    y, yr = conv(x), ref(x)
    torch.testing.assert_close(y, yr)
    y.square().sum().backward()
    yr.square().sum().backward()
    g = ref.weight.grad  # ∂ℓ/∂z
    torch.testing.assert_close(conv.weight.grad, g * m)
    sgn = torch.where(conv.scores.detach() < 0, -1.0, 1.0)
    torch.testing.assert_close(conv.scores.grad, sgn * (conv.weight.detach() * g - 0.5 * m * g * g), rtol=1e-4, atol=1e-5)


def test_sparsify_finalize_roundtrip_and_report():
    model = _net()
    w0 = model[0].weight
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    y_dense = model(x)
    bip_fast.sparsify(model)
    assert isinstance(model[0], MaskedConv2d) and isinstance(model[6], MaskedLinear)
    assert model[0].weight is w0  # the same Parameter object is kept
    torch.testing.assert_close(model(x), y_dense)
    names = [n for n, _ in masked_modules(model)]
    assert names == ["0", "3", "6"]
    masks = [torch.rand(m.weight.shape) > 0.7 for _, m in masked_modules(model)]
    for (_, m), mk in zip(masked_modules(model), masks):
        m.set_mask(mk)
    rep = bip_fast.sparsity_report(model)
    kept = sum(int(mk.sum()) for mk in masks)
    assert rep["kept"] == kept and rep["numel"] == sum(mk.numel() for mk in masks)
    assert rep["layers"][1]["kept"] == int(masks[1].sum())
    y_sparse = model(x)
    bip_fast.finalize(model)
    assert type(model[0]) is nn.Conv2d and type(model[6]) is nn.Linear
    torch.testing.assert_close(model(x), y_sparse)
    assert int((model[3].weight == 0).sum()) >= int((~masks[1]).sum())


def test_sparsify_include_exclude():
    model = bip_fast.sparsify(_net(), exclude=["6"])
    assert isinstance(model[0], MaskedConv2d) and type(model[6]) is nn.Linear
    model = bip_fast.sparsify(_net(), include="3")
    assert type(model[0]) is nn.Conv2d and isinstance(model[3], MaskedConv2d)
    with pytest.raises(ValueError, match="include"):
        bip_fast.sparsify(_net(), include=["nonexistent"])
    with pytest.raises(TypeError, match="model"):
        bip_fast.sparsify("not a model")
    single = bip_fast.sparsify(nn.Linear(3, 2))
    assert isinstance(single, MaskedLinear)


def test_deepcopy_and_channels_last_and_autocast():
    model = bip_fast.sparsify(_net())
    for _, m in masked_modules(model):
        m.set_mask(torch.rand(m.weight.shape) > 0.5)
    clone = copy.deepcopy(model)
    x = torch.randn(2, 3, 8, 8)
    model.eval()
    clone.eval()
    torch.testing.assert_close(clone(x), model(x))
    assert clone[0].mask.data_ptr() != model[0].mask.data_ptr()
    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    y = cl(x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(y, model(x), rtol=1e-4, atol=1e-4)
    y.sum().backward()
    assert cl[0].scores.grad is not None and cl[0].weight.grad.shape == cl[0].weight.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):
        yb = model(x)
    assert yb.dtype == torch.bfloat16
    yb.float().sum().backward()
    assert model[0].weight.grad.dtype == torch.float32 and model[0].scores.grad.dtype == torch.float32


def test_torch_compile_no_recompile_on_mask_change():
    torch._dynamo.reset()
    model = bip_fast.sparsify(_net()).eval()
    counts = {"n": 0}

    def backend(gm, example_inputs):
        counts["n"] += 1
        return gm.forward

    compiled = torch.compile(model, backend=backend)
    x = torch.randn(2, 3, 8, 8)
    y1 = compiled(x)
    for _, m in masked_modules(model):
        m.set_mask(torch.rand(m.weight.shape) > 0.5)
    y2 = compiled(x)
    torch.testing.assert_close(y2, model(x))
    assert not torch.allclose(y1, y2)
    assert counts["n"] == 1


def test_ddp_single_process_gloo(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = bip_fast.sparsify(_net())
        ddp = nn.parallel.DistributedDataParallel(model)
        ddp(torch.randn(2, 3, 8, 8)).sum().backward()
        assert all(m.scores.grad is not None and m.weight.grad is not None for _, m in masked_modules(model))
    finally:
        dist.destroy_process_group()
