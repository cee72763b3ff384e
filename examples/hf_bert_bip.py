"""BiP on a Hugging Face BERT (transformers), then back into the plain transformers class.

    python examples/hf_bert_bip.py                     # a small real run (a minute or two on 2 CPU cores)
    python examples/hf_bert_bip.py --tiny              # a few seconds (for tests)

Nothing here is downloaded: the model is ``BertForTokenClassification(BertConfig(...))`` with
random weights and the token ids are generated. The task: padded sequences of random tokens, and
every real token's label is ``id % 2 + 2 * (previous id % 2)`` (the first token's previous id is
0), so the model must read its neighbour through attention; chance is 1/4. Padding positions have
attention_mask 0 and label -100 (ignored by the model's own loss and by the accuracy).

0. A dense model is trained first (plain transformers and torch.optim.AdamW, as any fine-tune):
   BiP, like the paper, prunes a trained model (its lower level is SGD, slow on a transformer
   trained from scratch).
1. ``bip_fast.BiP(model, s, compute_loss=...)``: ``sparsify`` masks every nn.Linear of the model
   (query / key / value / attention output, both MLP layers, the classifier); the embeddings and
   LayerNorms stay dense and are trained. After every step the example asserts the exact top-K
   guarantee: the masks keep K = round((1 - s) * N) of the N prunable weights (halves up).
2. ``bip_fast.finalize`` bakes the masks into nn.Linear; the state dict loads with ``strict=True``
   into a fresh ``BertForTokenClassification(config)`` that computes exactly the same outputs.
3. ``structure="group"``: ``bip_fast.attach_groups`` (Torch-Pruning's dependency graph) finds the
   MLP's intermediate channels as removable groups and ``bip_fast.compact`` cuts them out (outputs
   equal to the masked model's); the result loads strictly into a plain BERT whose config has the
   smaller ``intermediate_size``. The hidden size stays (its LayerNorms cannot mask one channel).
   Attention heads are not groups: the graph couples query / key / value / output channel by
   channel, so group masks pick channels scattered over the heads, and the compacted layers no
   longer split into the config's heads (BERT reshapes to ``(-1, attention_head_size)``). So the
   group run leaves the attention projections unmasked (``exclude=``: their groups stay whole),
   and a last short run with them masked shows what ``compact`` then does.
"""
import argparse
import copy
import math
import time

import torch
from torch import nn

import bip_fast

try:
    from transformers import BertConfig, BertForTokenClassification
except ImportError:  # pragma: no cover - the test suite skips this example without transformers
    raise SystemExit("this example needs transformers: pip install transformers") from None


CLASSES = 4  # (id % 2, previous id % 2)


def make_config(args):
    # dropout 0: a small model on a synthetic rule; a real fine-tune keeps BERT's 0.1
    return BertConfig(vocab_size=args.vocab, hidden_size=args.hidden, num_hidden_layers=args.layers,
                      num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                      max_position_embeddings=args.seq, num_labels=CLASSES, pad_token_id=0,
                      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def batches(args, batch_size, seed):
    """Dict batches: input_ids (0 is [PAD]), attention_mask, labels (-100 at padding)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(args.seq)
    while True:
        ids = torch.randint(1, args.vocab, (batch_size, args.seq), generator=g)
        lengths = torch.randint(args.seq // 2, args.seq + 1, (batch_size,), generator=g)
        attention_mask = (pos < lengths[:, None]).long()
        ids = ids * attention_mask
        prev = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
        labels = (ids % 2 + 2 * (prev % 2)).masked_fill(attention_mask == 0, -100)
        yield {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}


def compute_loss(model, batch):
    """The model's own token-classification loss (cross-entropy ignoring label -100)."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


@torch.no_grad()
def logits_of(model, batch):
    was = model.training
    model.eval()
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model.train(was)
    return out


def accuracy(model, batch):
    real = batch["labels"] != -100
    return (logits_of(model, batch).argmax(-1)[real] == batch["labels"][real]).float().mean().item()


def kept_weights(model):
    return sum(int(m.mask.sum()) for _, m in bip_fast.masked_modules(model))


def train(alg, args, steps, check_k=None):
    """``steps`` BiP steps on two independent streams; with ``check_k``, assert the kept count after each."""
    lower, upper = batches(args, args.batch_size, seed=1), batches(args, args.batch_size, seed=2)
    t0 = time.perf_counter()
    for step in range(steps):
        metrics = alg.step(next(lower), next(upper))
        if check_k is not None:
            kept = kept_weights(alg.model)
            assert kept == check_k, f"step {step}: the masks keep {kept} weights, expected exactly K = {check_k}"
        if step % max(1, steps // 5) == 0 or step == steps - 1:
            print(f"  step {step:4d}  loss {metrics['loss'].item():.4f}  (chance {math.log(CLASSES):.4f})")
    return time.perf_counter() - t0


def dense(args, config, held):
    """Part 0: a plain transformers fine-tune (AdamW); returns the trained model's state dict."""
    torch.manual_seed(0)
    model = BertForTokenClassification(config)
    print(f"BERT: {args.layers} layers, hidden {args.hidden}, {args.heads} heads, {CLASSES} labels; "
          f"accuracy at initialisation {accuracy(model, held):.3f} (chance {1 / CLASSES:.3f})")
    opt = torch.optim.AdamW(model.parameters(), lr=args.dense_lr)
    data = batches(args, args.batch_size, seed=0)
    t0 = time.perf_counter()
    for _ in range(args.dense_steps):
        opt.zero_grad()
        compute_loss(model, next(data)).backward()
        opt.step()
    seconds = time.perf_counter() - t0
    print(f"dense AdamW, {args.dense_steps} steps ({seconds:.1f} s): accuracy {accuracy(model, held):.3f}")
    return model.state_dict()


def unstructured(args, config, held, trained):
    """Part 1 and 2: BiP with exact K, finalize, reload into the plain transformers class."""
    model = BertForTokenClassification(config)
    model.load_state_dict(trained)
    before = accuracy(model, held)
    alg = bip_fast.BiP(model, args.sparsity, compute_loss=compute_loss, lr=args.lr, score_lr=args.score_lr,
                       total_steps=args.steps)
    rep = bip_fast.sparsity_report(model)
    n = rep["numel"]
    k = math.floor((1 - args.sparsity) * n + 0.5)  # K = round((1 - s) * N), halves up (SPEC §1)
    assert kept_weights(model) == k, f"after construction: {kept_weights(model)} kept, expected K = {k}"
    print(f"BiP (global, sparsity {args.sparsity}): {len(rep['layers'])} masked nn.Linear, N = {n}, K = {k}; "
          f"accuracy with the first mask (magnitude, before any step) {accuracy(model, held):.3f}")
    seconds = train(alg, args, args.steps, check_k=k)
    acc = accuracy(model, held)
    rep = bip_fast.sparsity_report(model)
    print(f"accuracy before {before:.3f}, after {acc:.3f}; exact K held after each of {args.steps} steps: "
          f"kept {rep['kept']} of {rep['numel']} (sparsity {rep['sparsity']:.4f}); {seconds:.1f} s "
          f"({1000 * seconds / args.steps:.0f} ms/step)")
    for layer in rep["layers"]:
        if args.verbose or layer["name"].startswith("bert.encoder.layer.0.") or layer["name"] == "classifier":
            print(f"  {layer['name']:45s} {str(layer['shape']):10s} density {layer['density']:.3f}")

    masked_out = logits_of(model, held)
    plain = bip_fast.finalize(model)  # nn.Linear again, pruned weights exact zeros
    final_out = logits_of(plain, held)
    assert torch.allclose(final_out, masked_out, rtol=1e-5, atol=1e-6), "finalize changed the outputs"
    reloaded = BertForTokenClassification(config)
    reloaded.load_state_dict(plain.state_dict(), strict=True)
    same = torch.equal(logits_of(reloaded, held), final_out)
    assert same, "the plain transformers model computes other outputs than the finalized one"
    linears = [m.weight for m in reloaded.modules() if isinstance(m, nn.Linear)]
    nonzero = sum(int((w != 0).sum()) for w in linears)
    assert nonzero <= k, f"the reloaded model has {nonzero} non-zero linear weights, more than K = {k}"
    print(f"finalize -> BertForTokenClassification(config).load_state_dict(strict=True): {nonzero} non-zero "
          f"of {sum(w.numel() for w in linears)} linear weights; outputs equal to the finalized model: {same}")
    return acc


def _heads_split(model, config):
    """Per layer, the kept query channels of each head (a head keeps all or none for a clean cut)."""
    size = config.hidden_size // config.num_attention_heads
    out = []
    for layer in model.bert.encoder.layer:
        rows = layer.attention.self.query.mask.any(dim=1)
        out.append([int(rows[h * size:(h + 1) * size].sum()) for h in range(config.num_attention_heads)])
    return out


def grouped(args, config, held, example, trained):
    """Part 3: group masks on the MLP channels, compact; then what happens with the heads."""
    model = BertForTokenClassification(config)
    model.load_state_dict(trained)
    groups = bip_fast.attach_groups(model, example)
    rows = groups.summary()
    mlp = [r for r in rows if r["reason"] is None and any(".intermediate." in m for m in r["members"])]
    heads = [r for r in rows if r["reason"] is None and any(".attention.self." in m for m in r["members"])]
    whole = [r for r in rows if r["reason"] is not None]
    print(f"attach_groups: {len(rows)} groups: {len(mlp)} MLP ({mlp[0]['channels']} channels each: "
          f"intermediate.dense out = output.dense in), {len(heads)} attention ({heads[0]['channels'] if heads else 0} "
          f"query/key/value/output channels each, coupled per channel, not per head), {len(whole)} kept whole:")
    for r in whole:
        print(f"  {r['channels']} channels: {r['reason']}")
    attention = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".attention." in n]
    # the attention projections are not masked, so their groups stay whole (bip_fast warns once)
    alg = bip_fast.BiP(model, args.group_sparsity, structure="group", compute_loss=compute_loss, lr=args.lr,
                       score_lr=args.score_lr, total_steps=args.group_steps, exclude=attention)
    seconds = train(alg, args, args.group_steps)
    masked_out = logits_of(model, held)
    widths = [int(layer.intermediate.dense.mask.any(dim=1).sum()) for layer in model.bert.encoder.layer]
    print(f"group BiP on the MLP ({args.group_steps} steps, {seconds:.1f} s): accuracy {accuracy(model, held):.3f}; "
          f"intermediate channels kept per layer {widths} of {config.intermediate_size}")
    before = sum(p.numel() for p in BertForTokenClassification(config).parameters())
    probe = copy.deepcopy(model)  # the trained model, for the heads below
    small = bip_fast.compact(model, example)  # checks its own outputs against the masked model
    small_out = logits_of(small, held)
    diff = (small_out - masked_out).abs().max().item()
    assert diff <= 1e-4 * masked_out.abs().max().item(), f"compacted model differs from the masked one by {diff:.3g}"
    after = sum(p.numel() for p in small.parameters())
    widths = {layer.intermediate.dense.out_features for layer in small.bert.encoder.layer}
    print(f"compact: intermediate.dense {sorted(widths)} wide, parameters {before} -> {after}; accuracy "
          f"{accuracy(small, held):.3f}; max |compacted - masked| on the held-out batch {diff:.2e}")
    if len(widths) == 1:  # every layer as wide: a plain BERT of a smaller config holds it
        smaller = copy.deepcopy(config)
        smaller.intermediate_size = widths.pop()
        reloaded = BertForTokenClassification(smaller)
        reloaded.load_state_dict(small.state_dict(), strict=True)
        same = torch.equal(logits_of(reloaded, held), small_out)
        assert same, "the smaller plain transformers model computes other outputs than the compacted one"
        print(f"  = BertForTokenClassification(config with intermediate_size={smaller.intermediate_size}), "
              f"load_state_dict(strict=True); outputs equal: {same}")

    # the heads: mask the attention projections too and give their channel groups to BiP
    bip_fast.sparsify(probe)
    bip_fast.attach_groups(probe, example)
    alg = bip_fast.BiP(probe, args.group_sparsity, structure="group", compute_loss=compute_loss, lr=args.lr,
                       score_lr=args.score_lr, total_steps=args.head_steps)
    train(alg, args, args.head_steps)
    print(f"group BiP with the attention groups ({args.head_steps} steps): query channels kept per head, by layer: "
          f"{_heads_split(probe, config)} of {config.hidden_size // config.num_attention_heads}")
    why = (f"heads are not groups (BERT reshapes the kept query/key/value channels to (-1, "
           f"{config.hidden_size // config.num_attention_heads}))")
    try:
        cut = bip_fast.compact(probe, example)
    except (ValueError, RuntimeError) as e:  # compact's own check, or the reshape itself
        first = str(e).splitlines()[0][:200]
        print(f"compact with the attention groups pruned fails, {why}: {type(e).__name__}: {first}")
    else:  # near-uniform attention can pass compact's check: measure on the held-out batch
        diff = (logits_of(cut, held) - logits_of(probe, held)).abs().max().item()
        print(f"compact with the attention groups pruned returned a different function, {why}: "
              f"max |compacted - masked| on the held-out batch {diff:.2e}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.95)
    ap.add_argument("--group-sparsity", type=float, default=0.75, help="fraction of MLP channels removed")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--group-steps", type=int, default=200)
    ap.add_argument("--head-steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=64)
    ap.add_argument("--seq", type=int, default=24)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dense-steps", type=int, default=300)
    ap.add_argument("--dense-lr", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=0.01)
    ap.add_argument("--score-lr", type=float, default=1.0)
    ap.add_argument("--verbose", action="store_true", help="every layer of the sparsity report")
    ap.add_argument("--tiny", action="store_true", help="hidden 32, 2 layers, 2 heads, a few steps (for tests)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.hidden, args.layers, args.heads, args.vocab, args.seq, args.batch_size = 32, 2, 2, 32, 12, 8
        args.dense_steps, args.steps, args.group_steps, args.head_steps = 4, 6, 4, 2
    config = make_config(args)
    held = next(batches(args, 256, seed=3))
    example = {k: v[:2] for k, v in held.items() if k != "labels"}
    t0 = time.perf_counter()
    trained = dense(args, config, held)
    unstructured(args, config, held, trained)
    grouped(args, config, held, example, trained)
    print(f"done in {time.perf_counter() - t0:.1f} s (torch {torch.__version__}, {torch.get_num_threads()} threads)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
