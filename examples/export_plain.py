"""Export a pruned model and load it in plain PyTorch, without bip_fast.

    python examples/export_plain.py --out /tmp/pruned                 # prune, export, then load
    python examples/export_plain.py --load /tmp/pruned/model.pt       # only the plain-PyTorch part
    python examples/export_plain.py --tiny --out /tmp/pruned          # a few seconds

``bip_fast.finalize(model)`` turns the masked layers back into nn.Conv2d / nn.Linear /
nn.MultiheadAttention with the pruned weights set to exact zeros, so the state dict has the
original model's keys and loads into the original architecture. The loading half of this script
(``load``) imports torch and torchvision only: that is all a user of the pruned model needs.
"""
import argparse
import sys
from pathlib import Path

import torch
import torchvision


def build(arch, classes):
    return getattr(torchvision.models, arch)(num_classes=classes)


def prune_and_export(args):
    import bip_fast  # only the pruning side needs it

    torch.manual_seed(0)
    model = build(args.arch, args.classes)
    # model.load_state_dict(torch.load("dense.pt"))   # start from your trained model
    alg = bip_fast.BiP(model, args.sparsity, total_steps=args.steps, score_lr=args.score_lr)
    g = torch.Generator().manual_seed(1)
    for _ in range(args.steps):  # your training data here (random tensors in this example)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=g)
        y = torch.randint(0, args.classes, (args.batch_size,), generator=g)
        alg.step((x, y))

    sparsity = alg.sparsity()
    plain = bip_fast.finalize(alg.model).eval()  # plain layers; pruned weights are exact zeros
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(plain.state_dict(), out / "model.pt")
    # a reference input and the pruned model's output on it, for the check in load()
    x = torch.randn(2, 3, args.image_size, args.image_size, generator=g)
    with torch.no_grad():
        torch.save({"input": x, "output": plain(x), "arch": args.arch, "classes": args.classes}, out / "check.pt")
    print(f"exported {out / 'model.pt'}: a plain {args.arch} state dict at sparsity {sparsity:.4f}")
    return out / "model.pt"


def load(path):
    """Plain PyTorch: rebuild the architecture and load the state dict; no bip_fast anywhere."""
    path = Path(path)
    check = torch.load(path.parent / "check.pt", weights_only=True)
    model = build(check["arch"], check["classes"])
    model.load_state_dict(torch.load(path, weights_only=True))
    model.eval()
    with torch.no_grad():
        same = torch.allclose(model(check["input"]), check["output"], rtol=1e-5, atol=1e-6)
    weights = [m.weight for m in model.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    print(f"loaded {path} into torchvision.models.{check['arch']}: {zeros} of {total} conv/linear weights are "
          f"zero ({zeros / total:.4f}); outputs match the pruned model: {same}; bip_fast imported: "
          f"{'bip_fast' in sys.modules}")
    return 0 if same else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="pruned", help="folder for model.pt and check.pt")
    ap.add_argument("--load", metavar="MODEL_PT", help="only load an exported model.pt (plain PyTorch)")
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--score-lr", type=float, default=1.0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--tiny", action="store_true", help="2 steps of batch 4 (for tests)")
    args = ap.parse_args(argv)
    if args.load:
        return load(args.load)
    if args.tiny:
        args.steps, args.batch_size = 2, 4
    path = prune_and_export(args)
    return load(path)


if __name__ == "__main__":
    raise SystemExit(main())
