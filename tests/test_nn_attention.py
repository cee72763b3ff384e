"""Masked multi-head attention: nn.MultiheadAttention's forward on masked projections, its
state-dict keys, SPEC §3's gradients, finalize, and the layers that stay dense and named."""
import pytest
import torch
from torch import nn

import bip_fast
from bip_fast.nn import MaskedMultiheadAttention
from bip_fast.pruning import get_algorithm


def _pair(batch_first=False, bias=True, add_bias_kv=False):
    torch.manual_seed(0)
    plain = nn.MultiheadAttention(8, 2, bias=bias, add_bias_kv=add_bias_kv, batch_first=batch_first)
    ref = nn.MultiheadAttention(8, 2, bias=bias, add_bias_kv=add_bias_kv, batch_first=batch_first)
    ref.load_state_dict(plain.state_dict())
    masked = bip_fast.sparsify(nn.Sequential(plain))[0]
    return masked, ref


@pytest.mark.parametrize("batch_first,bias,add_bias_kv", [(False, True, False), (True, False, False),
                                                          (True, True, True)])
def test_masked_attention_is_attention_on_masked_weights(batch_first, bias, add_bias_kv):
    masked, ref = _pair(batch_first, bias, add_bias_kv)
    assert type(masked) is MaskedMultiheadAttention and type(masked.out_proj).__name__ == "MaskedLinear"
    assert set(masked.state_dict()) == set(ref.state_dict()) | {"scores", "mask", "out_proj.scores", "out_proj.mask"}
    m_in = torch.rand(masked.mask.shape) < 0.6
    m_out = torch.rand(masked.out_proj.mask.shape) < 0.6
    masked.set_mask(m_in)
    masked.out_proj.set_mask(m_out)
    with torch.no_grad():
        ref.in_proj_weight.mul_(m_in)
        ref.out_proj.weight.mul_(m_out)
    q = torch.randn(3, 5, 8)
    kv = torch.randn(3, 5, 8)
    for module in (masked, ref):
        module.eval()
    out_m, w_m = masked(q, kv, kv)
    out_r, w_r = ref(q, kv, kv)
    torch.testing.assert_close(out_m, out_r)
    torch.testing.assert_close(w_m, w_r)
    unbatched = torch.randn(4, 8)
    torch.testing.assert_close(masked(unbatched, unbatched, unbatched)[0], ref(unbatched, unbatched, unbatched)[0])


def test_attention_gradients_follow_spec_3():
    masked, ref = _pair()
    masked.set_mask(torch.rand(masked.mask.shape) < 0.5)
    masked.ig_scale = 0.25
    x = torch.randn(4, 2, 8)
    out, _ = masked(x, x, x, need_weights=False)
    g_out = torch.randn_like(out)
    out.backward(g_out)
    with torch.no_grad():
        ref.out_proj.weight.copy_(masked.out_proj.weight * masked.out_proj.mask)
    ref.in_proj_weight = nn.Parameter(masked.in_proj_weight.detach() * masked.mask)
    ref(x, x, x, need_weights=False)[0].backward(g_out)
    g, m, th, s = ref.in_proj_weight.grad, masked.mask, masked.in_proj_weight.detach(), masked.scores.detach()
    sgn = torch.where(s >= 0, 1.0, -1.0)
    torch.testing.assert_close(masked.in_proj_weight.grad, m * g)
    torch.testing.assert_close(masked.scores.grad, sgn * (th * g - 0.25 * m * g * g))
    assert masked.out_proj.scores.grad is not None


def test_attention_finalize_and_plain_state_dict():
    masked, _ = _pair()
    masked.set_mask(torch.rand(masked.mask.shape) < 0.5)
    model = nn.Sequential(masked)
    x = torch.randn(4, 2, 8)
    want = model[0](x, x, x)[0].detach()
    bip_fast.finalize(model)
    assert type(model[0]) is nn.MultiheadAttention
    torch.testing.assert_close(model[0](x, x, x)[0], want)
    fresh = MaskedMultiheadAttention(8, 2)
    fresh.load_state_dict(model[0].state_dict())  # a plain state dict: scores from the weights, full masks
    assert bool(fresh.mask.all()) and bool(fresh.out_proj.mask.all())


def test_bip_prunes_a_transformer_block_to_exact_k():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.att = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 3)

        def forward(self, x):
            return self.head(self.att(x, x, x, need_weights=False)[0].mean(dim=1))

    torch.manual_seed(1)
    alg = get_algorithm("bip")(Block(), 0.8, total_steps=2)
    batch = (torch.randn(4, 5, 8), torch.randint(0, 3, (4,)))
    for _ in range(2):
        alg.step(batch, batch)
    rep = bip_fast.sparsity_report(alg.model)
    assert [l["name"] for l in rep["layers"]] == ["att", "att.out_proj", "head"] and not rep["skipped"]
    assert rep["kept"] == round(0.2 * (24 * 8 + 8 * 8 + 3 * 8))


def test_attention_left_dense_is_named():
    with pytest.raises(ValueError, match="separate q/k/v projections"):
        MaskedMultiheadAttention(8, 2, kdim=4)
    model = nn.Sequential(nn.MultiheadAttention(8, 2, kdim=4, vdim=4))
    with pytest.warns(UserWarning, match="separate q/k/v projection weights"):
        bip_fast.sparsify(model)
    layer = nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, batch_first=True)
    with pytest.warns(UserWarning, match=r"self_attn \(weight read directly by TransformerEncoderLayer"):
        bip_fast.sparsify(layer)
    assert type(layer.self_attn) is nn.MultiheadAttention
