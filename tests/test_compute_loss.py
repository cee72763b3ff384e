"""compute_loss(model, batch): models that take and return dicts, two-input models and a small
transformer, through BiP (both schedules), IMP, OMP, Hydra, SNIP and GraSP, with exactly K kept
weights after every step; the (inputs, targets) path is the same computation as before."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bip_fast
from bip_fast.nn import MaskedLinear, MaskedMultiheadAttention, masked_modules, sparsify
from bip_fast.ops import keep_count
from bip_fast.pruning import IMP, OMP, SNIP, BiP, Dense, GraSP, Hydra, SynFlow
from bip_fast.pruning.base import NonFiniteError

from _pruning_helpers import cls_batches, linear_toy


# ----------------------------------------------------------------------------- models and data
class DictNet(nn.Module):
    """forward({"x": (B, 3), "extra": {"z": (B, 2)}}) -> {"logits": (B, 2), "features": (B, 4)}."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(2, 4, bias=False)
        self.head = nn.Linear(4, 2)

    def forward(self, inputs):
        h = torch.relu(self.a(inputs["x"]) + self.b(inputs["extra"]["z"]))
        return {"logits": self.head(h), "features": h}


def dict_loss(model, batch):
    return F.cross_entropy(model(batch["inputs"])["logits"], batch["label"])


def dict_batches(seed, n, b=6):
    g = torch.Generator().manual_seed(seed)
    return [{"inputs": {"x": torch.randn(b, 3, generator=g), "extra": {"z": torch.randn(b, 2, generator=g)}},
             "label": torch.randint(0, 2, (b,), generator=g)} for _ in range(n)]


class TwoInputNet(nn.Module):
    """forward(a, b) -> (B, 1): a regression on two inputs."""

    def __init__(self):
        super().__init__()
        self.fa = nn.Linear(3, 5)
        self.fb = nn.Linear(4, 5)
        self.out = nn.Linear(5, 1)

    def forward(self, a, b):
        return self.out(torch.tanh(self.fa(a) + self.fb(b)))


def two_input_loss(model, batch):
    (a, b), y = batch
    return F.mse_loss(model(a, b), y)


def two_input_batches(seed, n, bs=6):
    g = torch.Generator().manual_seed(seed)
    return [((torch.randn(bs, 3, generator=g), torch.randn(bs, 4, generator=g)), torch.randn(bs, 1, generator=g))
            for _ in range(n)]


VOCAB, SEQ, EMB = 8, 6, 16


class TinyEncoder(nn.Module):
    """Token classifier: embedding, one pre-norm encoder block (masked attention + MLP), a head."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, EMB)
        self.pos = nn.Parameter(torch.randn(SEQ, EMB) * 0.1)
        self.norm1 = nn.LayerNorm(EMB)
        self.attn = MaskedMultiheadAttention(EMB, 2, batch_first=True)
        self.norm2 = nn.LayerNorm(EMB)
        self.mlp = nn.Sequential(nn.Linear(EMB, 2 * EMB), nn.GELU(), nn.Linear(2 * EMB, EMB))
        self.head = nn.Linear(EMB, VOCAB)

    def forward(self, tokens, padding_mask=None):
        h = self.embed(tokens) + self.pos
        q = self.norm1(h)
        h = h + self.attn(q, q, q, key_padding_mask=padding_mask, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return {"logits": self.head(h)}


def token_loss(model, batch):
    """Every position predicts the sequence's first token (needs attention to position 0)."""
    logits = model(batch["tokens"], padding_mask=batch["padding_mask"])["logits"]
    return F.cross_entropy(logits.reshape(-1, VOCAB), batch["labels"].reshape(-1))


def token_batches(seed, n, b=16):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        tok = torch.randint(0, VOCAB, (b, SEQ), generator=g)
        out.append({"tokens": tok, "labels": tok[:, :1].expand(b, SEQ).clone(),
                    "padding_mask": torch.zeros(b, SEQ, dtype=torch.bool)})
    return out


CASES = {
    "dict": (DictNet, dict_loss, dict_batches),
    "two_input": (TwoInputNet, two_input_loss, two_input_batches),
    # the block's own MaskedMultiheadAttention, its MLP and head sparsified around it
    "transformer": (lambda: sparsify(TinyEncoder()), token_loss, token_batches),
}


def kept(alg):
    return int(sum(int(m.sum()) for m in alg.masks()))


def prunable(alg):
    return sum(m.numel() for m in alg.masks())


# ----------------------------------------------------------------------------- exact K, every algorithm
@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("schedule", ["alternating", "fused"])
def test_bip_exact_k_every_step(case, schedule):
    make, loss, data = CASES[case]
    torch.manual_seed(0)
    alg = bip_fast.BiP(make(), 0.5, schedule=schedule, compute_loss=loss, total_steps=6, score_lr=1.0)
    k = keep_count(prunable(alg), 0.5)
    assert kept(alg) == k
    bs = data(1, 12)
    for lower, upper in zip(bs[0::2], bs[1::2]):
        out = alg.step(lower, upper)
        assert kept(alg) == k
        assert set(out) == ({"loss", "skipped", "upper_loss"} if schedule == "alternating" else {"loss", "skipped"})
        assert out["loss"].dim() == 0 and math.isfinite(float(out["loss"]))


@pytest.mark.parametrize("case", sorted(CASES))
def test_imp_exact_k_every_step(case):
    make, loss, data = CASES[case]
    torch.manual_seed(0)
    alg = IMP(make(), rewind_step=1, lr=0.05, compute_loss=loss, total_steps=3)
    n = prunable(alg)
    k = n
    for r in range(3):
        for b in data(10 + r, 3):
            out = alg.step(b)
            assert kept(alg) == k and set(out) == {"loss", "skipped"}
        alg.next_round()
        k = keep_count(k, 0.8)
        assert kept(alg) == k
    assert k < n


@pytest.mark.parametrize("case", sorted(CASES))
def test_omp_and_hydra_exact_k_every_step(case):
    make, loss, data = CASES[case]
    torch.manual_seed(0)
    omp = OMP(make(), 0.7, lr=0.05, compute_loss=loss)
    k = keep_count(prunable(omp), 0.3)
    for b in data(2, 4):
        omp.step(b)
        assert kept(omp) == k
    torch.manual_seed(0)
    hydra = Hydra(make(), 0.7, structure="global", compute_loss=loss, total_steps=4)
    for b in data(3, 4):
        hydra.step(b)
        assert kept(hydra) == k
    hydra.finetune(2)
    for b in data(4, 2):
        hydra.step(b)
        assert kept(hydra) == k


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("cls", [SNIP, GraSP])
def test_snip_grasp_score_with_compute_loss(case, cls):
    make, loss, data = CASES[case]
    torch.manual_seed(0)
    alg = cls(make(), 0.6, compute_loss=loss)
    alg.prepare(data(5, 2))
    k = keep_count(prunable(alg), 0.4)
    assert kept(alg) == k
    alg.step(data(6, 1)[0])
    assert kept(alg) == k


def test_target_bip_prunes_a_dict_model():
    """The issue's target: BiP(model, 0.5, compute_loss=f) on a model whose forward takes and returns dicts."""
    torch.manual_seed(1)
    model = DictNet()
    alg = bip_fast.BiP(model, 0.5, compute_loss=dict_loss)
    k = keep_count(prunable(alg), 0.5)
    for b in dict_batches(9, 5):
        alg.step(b)
        assert kept(alg) == k
    assert alg.model is model and alg.sparsity() == pytest.approx(1 - k / prunable(alg))


def test_transformer_learns_the_token_task():
    """BiP at 50% sparsity with compute_loss learns the token task (copy the first token)."""
    torch.manual_seed(0)
    alg = BiP(sparsify(TinyEncoder()), 0.5, lr=0.2, score_lr=39.1, compute_loss=token_loss, total_steps=100)
    kinds = {n: type(m) for n, m in masked_modules(alg.model)}
    assert kinds == {"attn": MaskedMultiheadAttention, "attn.out_proj": MaskedLinear, "mlp.0": MaskedLinear,
                     "mlp.2": MaskedLinear, "head": MaskedLinear}
    held = token_batches(99, 1)[0]
    with torch.no_grad():
        before = float(token_loss(alg.model.eval(), held))
    for b in token_batches(7, 100):
        alg.step(b)
    with torch.no_grad():
        after = float(token_loss(alg.model.eval(), held))
    assert before > 1.5 and after < 0.1  # chance level is ln 8 = 2.08


# ----------------------------------------------------------------------------- the (x, y) path
@pytest.mark.parametrize("kind", ["bip", "bip-fused", "imp", "omp", "hydra"])
def test_xy_path_equals_the_same_loss_through_compute_loss(kind):
    """loss_fn on (x, y) batches and a compute_loss computing the same thing give bit-equal states;
    the (x, y) path keeps its metrics (correct, count)."""
    def make(**kw):
        net = linear_toy(bn=True, relu=True)
        if kind == "bip":
            return BiP(net, 0.5, lr=0.05, score_lr=0.3, total_steps=4, **kw)
        if kind == "bip-fused":
            return BiP(net, 0.5, schedule="fused", lr=0.05, score_lr=0.3, total_steps=4, **kw)
        if kind == "imp":
            return IMP(net, rewind_step=1, lr=0.05, total_steps=4, **kw)
        if kind == "omp":
            return OMP(net, 0.5, lr=0.05, total_steps=4, **kw)
        return Hydra(net, 0.5, total_steps=4, **kw)

    a = make()
    b = make(compute_loss=lambda model, batch: F.cross_entropy(model(batch[0]), batch[1]))
    bs = cls_batches(3, 4)
    for x, y in bs:
        oa = a.step((x, y))
        ob = b.step((x, y))
        assert {"loss", "correct", "count", "skipped"} <= set(oa) and "correct" not in ob
        assert torch.equal(oa["loss"], ob["loss"])
    if kind == "imp":
        a.next_round()
        b.next_round()
        a.step(bs[0])
        b.step(bs[0])
    for (ka, va), (kb, vb) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka


# ----------------------------------------------------------------------------- guard and errors
def test_nonfinite_compute_loss_applies_no_update():
    torch.manual_seed(0)
    alg = BiP(DictNet(), 0.5, compute_loss=dict_loss)
    before = {k: v.clone() for k, v in alg.model.state_dict().items()}
    bad = dict_batches(1, 1)[0]
    bad["inputs"]["x"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="step 0: non-finite loss"):
        alg.step(bad)
    for k, v in alg.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_compute_loss_errors():
    with pytest.raises(ValueError, match="loss_fn, compute_loss: give one"):
        OMP(DictNet(), 0.5, loss_fn=F.mse_loss, compute_loss=dict_loss)
    with pytest.raises(TypeError, match="compute_loss: expected a callable"):
        Dense(DictNet(), compute_loss="mse")
    alg = OMP(DictNet(), 0.5, compute_loss=lambda m, b: m(b["inputs"]))
    with pytest.raises(TypeError, match="compute_loss: expected a scalar loss tensor, got dict"):
        alg.step(dict_batches(0, 1)[0])
    alg = OMP(DictNet(), 0.5, compute_loss=lambda m, b: m(b["inputs"])["logits"])
    with pytest.raises(ValueError, match=r"compute_loss: expected a scalar floating-point loss.*shape \(6, 2\)"):
        alg.step(dict_batches(0, 1)[0])
    with pytest.raises(TypeError, match="batch: expected a tensor or a dict / list / tuple holding tensors"):
        alg.step({"inputs": None})
    # without compute_loss, a dict batch is refused as before
    with pytest.raises(TypeError, match=r"batch: expected an \(inputs, targets\) pair"):
        OMP(linear_toy(), 0.5).step({"x": torch.zeros(2, 3)})


def test_synflow_needs_an_input_shape_with_compute_loss():
    with pytest.raises(ValueError, match=r"input_shape: SynFlow with compute_loss needs input_shape"):
        SynFlow(TwoInputNet(), 0.5, compute_loss=two_input_loss)
    net = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    alg = SynFlow(net, 0.5, rounds=3, input_shape=(3,),
                  compute_loss=lambda m, b: F.cross_entropy(m(b["x"]), b["y"]))
    alg.prepare()  # no data needed
    k = keep_count(prunable(alg), 0.5)
    assert kept(alg) == k
    alg.step({"x": torch.randn(4, 3), "y": torch.tensor([0, 1, 1, 0])})
    assert kept(alg) == k
