"""Tied weights: a layer whose weight Parameter another module also holds (a language model's
decoder and its word embeddings) is left dense by sparsify, named in its warning and in
sparsity_report's skipped list, so that finalize cannot untie them."""

import pytest
import torch
from torch import nn

import bip_fast


class TiedLM(nn.Module):
    def __init__(self, vocab=11, dim=6):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.mix = nn.Linear(dim, dim)
        self.decoder = nn.Linear(dim, vocab, bias=False)
        self.decoder.weight = self.embed.weight  # tied

    def forward(self, ids):
        return self.decoder(torch.relu(self.mix(self.embed(ids))))


def test_tied_decoder_is_left_dense_and_named():
    torch.manual_seed(0)
    model = TiedLM()
    ids = torch.randint(0, 11, (3, 5))
    with pytest.warns(UserWarning, match=r"decoder \(weight tied to embed"):
        bip_fast.sparsify(model)
    assert isinstance(model.mix, bip_fast.nn.MaskedLinear) and type(model.decoder) is nn.Linear
    assert model.decoder.weight is model.embed.weight
    skipped = {s["name"]: s["reason"] for s in bip_fast.sparsity_report(model)["skipped"]}
    assert skipped["decoder"].startswith("weight tied to embed")
    # pruning and finalize keep the tie: the reloaded plain model computes the same function
    bip_fast.OMP(model, 0.5)
    plain = bip_fast.finalize(model)
    assert plain.decoder.weight is plain.embed.weight
    fresh = TiedLM()
    fresh.load_state_dict(plain.state_dict())
    assert torch.equal(fresh(ids), plain(ids))


def test_include_naming_a_tied_layer_is_refused_or_skipped():
    model = TiedLM()
    with pytest.raises(ValueError, match="decoder"):
        bip_fast.sparsify(model, include=["decoder"])
