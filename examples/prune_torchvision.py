"""Prune a torchvision model with BiP in your own training loop.

    python examples/prune_torchvision.py --arch resnet18 --sparsity 0.9 --steps 2000
    python examples/prune_torchvision.py --tiny        # a few seconds on random data

BiP needs two things from your loop: the model (any nn.Module with Conv/Linear layers; BiP swaps
them for masked ones in place) and batches. Each ``alg.step(lower, upper)`` is one BiP iteration:
a weight step on ``lower``, a score (mask) step on ``upper``, and the new mask, which always keeps
exactly K = round((1 - sparsity) * N) weights. Start from a trained model: BiP prunes it.

The data here are random tensors so that the script runs anywhere; replace ``batches()`` with your
DataLoader (any iterator of (images, labels) on the model's device).
"""
import argparse
import time

import torch
import torch.nn.functional as F
import torchvision

import bip_fast


def batches(n_classes, image_size, batch_size, device, seed):
    """An endless stream of random (images, labels); your DataLoader goes here."""
    g = torch.Generator().manual_seed(seed)
    while True:
        x = torch.randn(batch_size, 3, image_size, image_size, generator=g)
        y = torch.randint(0, n_classes, (batch_size,), generator=g)
        yield x.to(device), y.to(device)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", default="resnet18", help="a torchvision classification model")
    ap.add_argument("--sparsity", type=float, default=0.9, help="fraction of prunable weights removed")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="3 steps of batch 4 at 32x32 (for tests)")
    args = ap.parse_args(argv)
    if args.tiny:
        args.steps, args.batch_size, args.image_size = 3, 4, 32

    torch.manual_seed(0)
    model = getattr(torchvision.models, args.arch)(num_classes=args.classes).to(args.device)
    # model.load_state_dict(torch.load("dense.pt"))   # BiP prunes a trained model: load yours here

    # total_steps drives the cosine schedule and the score learning rate (score_lr=None: 0.1 x 39,100 /
    # total_steps, measured for 349 to 39,100 steps; BiP warns outside that range: pass score_lr then).
    alg = bip_fast.BiP(model, args.sparsity, total_steps=args.steps)
    lower = batches(args.classes, args.image_size, args.batch_size, args.device, seed=1)
    upper = batches(args.classes, args.image_size, args.batch_size, args.device, seed=2)

    t0 = time.perf_counter()
    for step in range(args.steps):
        metrics = alg.step(next(lower), next(upper))   # 0-dim tensors; .item() only when you log
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            acc = metrics["correct"].item() / metrics["count"].item()
            print(f"step {step:5d}  loss {metrics['loss'].item():.4f}  train acc {acc:.3f}  "
                  f"sparsity {alg.sparsity():.4f}")

    model.eval()
    with torch.no_grad():
        x, y = next(upper)
        loss = F.cross_entropy(model(x), y).item()
    report = bip_fast.sparsity_report(model)
    print(f"done in {time.perf_counter() - t0:.1f} s: kept {report['kept']} of {report['numel']} prunable "
          f"weights (sparsity {report['sparsity']:.4f}), eval loss {loss:.4f}")
    # Save the pruned model with its masks (model.state_dict() holds weight, scores and mask), or
    # see examples/export_plain.py for a plain PyTorch model.
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
