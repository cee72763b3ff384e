"""BiP on a small transformer with your own loss: batches and outputs are dicts.

    python examples/transformer_bip.py --sparsity 0.5 --steps 300
    python examples/transformer_bip.py --tiny          # a few seconds

Nothing in BiP assumes images or (inputs, targets) pairs: pass ``compute_loss(model, batch) ->
loss`` and a batch may be any structure of tensors (here a dict with tokens, labels and a padding
mask), the model may return anything (here a dict). The attention projections are pruned too:
BiP sparsifies the model in place, turning every nn.Linear into ``bip_fast.MaskedLinear`` and
every nn.MultiheadAttention its parent calls as a module into ``bip_fast.MaskedMultiheadAttention``
(a model that already holds masked layers is left as it is: then only those are pruned).

The task: every position predicts the sequence's first token, which it can only see through
attention. Chance level is log(vocab).
"""
import argparse
import math

import torch
import torch.nn.functional as F
from torch import nn

import bip_fast


class Block(nn.Module):
    """Pre-norm encoder block: masked self-attention and an MLP, both residual."""

    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, h, padding_mask):
        q = self.norm1(h)
        h = h + self.attn(q, q, q, key_padding_mask=padding_mask, need_weights=False)[0]
        return h + self.mlp(self.norm2(h))


class TokenModel(nn.Module):
    """forward(tokens, padding_mask) -> {"logits": (B, T, vocab), "hidden": (B, T, dim)}."""

    def __init__(self, vocab, seq, dim, heads, layers):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(seq, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)

    def forward(self, tokens, padding_mask=None):
        h = self.embed(tokens) + self.pos[: tokens.shape[1]]
        for block in self.blocks:
            h = block(h, padding_mask)
        return {"logits": self.head(h), "hidden": h}


def compute_loss(model, batch):
    """Your loss: anything differentiable from model(...) called here; returns a scalar tensor."""
    out = model(batch["tokens"], padding_mask=batch["padding_mask"])
    logits = out["logits"]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))


def batches(vocab, seq, batch_size, device, seed):
    g = torch.Generator().manual_seed(seed)
    while True:
        tokens = torch.randint(0, vocab, (batch_size, seq), generator=g)
        yield {"tokens": tokens.to(device),
               "labels": tokens[:, :1].expand(-1, seq).contiguous().to(device),
               "padding_mask": torch.zeros(batch_size, seq, dtype=torch.bool, device=device)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.5)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=16)
    ap.add_argument("--seq", type=int, default=12)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--score-lr", type=float, default=10.0)
    ap.add_argument("--schedule", default="alternating", choices=("alternating", "fused"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="20 steps of a 1-layer, 16-wide model (for tests)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.dim, args.layers, args.heads, args.batch_size = 20, 16, 1, 2, 8

    torch.manual_seed(0)
    model = TokenModel(args.vocab, args.seq, args.dim, args.heads, args.layers).to(args.device)
    alg = bip_fast.BiP(model, args.sparsity, compute_loss=compute_loss, schedule=args.schedule, lr=args.lr,
                       score_lr=args.score_lr, total_steps=args.steps)
    lower = batches(args.vocab, args.seq, args.batch_size, args.device, seed=1)
    upper = batches(args.vocab, args.seq, args.batch_size, args.device, seed=2)
    for step in range(args.steps):
        metrics = alg.step(next(lower), next(upper))  # with compute_loss: {"loss", ...}, no accuracy
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {metrics['loss'].item():.4f}  (chance {math.log(args.vocab):.4f})  "
                  f"sparsity {alg.sparsity():.4f}")

    model.eval()
    with torch.no_grad():
        held = next(batches(args.vocab, args.seq, 256, args.device, seed=3))
        pred = model(held["tokens"], padding_mask=held["padding_mask"])["logits"].argmax(-1)
        acc = (pred == held["labels"]).float().mean().item()
    rep = bip_fast.sparsity_report(model)
    attn = sum(int(m.mask.sum()) for n, m in bip_fast.masked_modules(model) if ".attn" in n)
    print(f"held-out token accuracy {acc:.3f}; kept {rep['kept']} of {rep['numel']} prunable weights "
          f"(sparsity {rep['sparsity']:.4f}), {attn} of them in the attention projections")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
