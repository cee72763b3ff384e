"""Folder datasets on generated JPEG trees (odd sizes, grayscale, CMYK, PNG, a corrupt file),
bad layouts, exact resume, torchvision-equal evaluation preprocessing; the ImageNet-layout models."""
import pytest
import torch
from PIL import Image

from bip_fast.data.folder import FolderLoader, load_folder_dataset, scan

SIZES = [(37, 53), (64, 64), (80, 41), (23, 29)]


def write_image(path, k, mode="RGB"):
    w, h = SIZES[k % len(SIZES)]
    g = torch.Generator().manual_seed(k)
    arr = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, "PNG" if path.suffix == ".png" else "JPEG")


def tiny_tree(root, classes=("n01", "n02", "n03"), per_class=4, val_per_class=2, corrupt=True):
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("".join(c + "\n" for c in classes))
    k = 0
    for c in classes:
        for i in range(per_class):
            mode = ("RGB", "L", "CMYK", "RGB")[i % 4]
            write_image(root / "train" / c / "images" / f"{c}_{i}.JPEG", k, mode)
            k += 1
    lines = []
    for c in classes:
        for i in range(val_per_class):
            write_image(root / "val" / "images" / f"val_{c}_{i}.JPEG", k)
            lines.append(f"val_{c}_{i}.JPEG\t{c}\t0\t0\t10\t10")
            k += 1
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    if corrupt:
        bad = root / "train" / classes[0] / "images" / "broken.JPEG"
        data = (root / "train" / classes[1] / "images" / f"{classes[1]}_0.JPEG").read_bytes()
        bad.write_bytes(data[: len(data) // 3])  # truncated JPEG
    return root


def imagenet_tree(root, classes=("cat", "dog"), per_class=3):
    k = 100
    for split, n in (("train", per_class), ("val", 2)):
        for c in classes:
            for i in range(n):
                write_image(root / split / c / f"{i}.{'png' if i == 2 else 'JPEG'}", k)
                k += 1
    return root


def test_tiny_imagenet_layout(tmp_path):
    root = tiny_tree(tmp_path / "tiny")
    train, classes = scan("tiny-imagenet", root, "train")
    val, _ = scan("tiny-imagenet", root, "val")
    assert classes == ["n01", "n02", "n03"]
    assert len(train) == 13 and len(val) == 6  # 12 images + the corrupt file
    assert sorted({y for _, y in val}) == [0, 1, 2]
    ds = load_folder_dataset("tiny-imagenet", root)
    assert ds.num_classes == 3 and ds.size == 64


def test_imagenet_layout(tmp_path):
    root = imagenet_tree(tmp_path / "in")
    train, classes = scan("imagenet", root, "train")
    assert classes == ["cat", "dog"] and len(train) == 6 and [y for _, y in train] == [0, 0, 0, 1, 1, 1]
    assert len(scan("imagenet", root, "val")[0]) == 4


def test_loader_batches_skips_corrupt_and_resumes_exactly(tmp_path):
    ds = load_folder_dataset("tiny-imagenet", tiny_tree(tmp_path / "tiny"))
    ld = ds.train_loader(4, seed=5)
    assert len(ld) == 3  # 13 files, drop_last
    full = list(ld)
    assert all(x.shape[1:] == (3, 64, 64) and x.dtype == torch.float32 for x, _ in full)
    n_seen = sum(y.numel() for _, y in full)
    assert ld.skipped in (0, 1) and n_seen == 12 - ld.skipped  # 3 batches of 4 from 13 shuffled files
    assert ld.epoch == 1
    # Resume mid-epoch: a fresh loader restored from the state after one batch of epoch 1 yields
    # exactly the rest of that epoch.
    it = iter(ld)
    next(it)
    state = ld.state_dict()
    assert (state["epoch"], state["position"]) == (1, 1)
    ref = list(it)
    again = ds.train_loader(4, seed=5)
    again.load_state_dict(state)
    rest = list(again)
    assert len(rest) == len(ref) == 2
    for (xa, ya), (xb, yb) in zip(ref, rest):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    # Two loaders pair like CIFAR's for BiP.
    from bip_fast.data import BilevelLoader

    pair = BilevelLoader(ds.train_loader(4, seed=1), ds.train_loader(4, seed=2))
    assert len(list(pair)) == 3


def test_corrupt_file_is_counted_not_raised(tmp_path):
    root = tiny_tree(tmp_path / "tiny")
    samples, _ = scan("tiny-imagenet", root, "train")
    ld = FolderLoader(samples, 13, train=False, size=64, eval_resize=64)
    (x, y), = list(ld)
    assert x.shape[0] == 12 and ld.skipped == 1 and ld.state_dict()["skipped"] == 1


def test_workers_give_the_same_batches(tmp_path):
    samples, _ = scan("imagenet", imagenet_tree(tmp_path / "in"), "train")
    a = list(FolderLoader(samples, 2, train=True, size=32, eval_resize=36, seed=1))
    b = list(FolderLoader(samples, 2, train=True, size=32, eval_resize=36, seed=1, num_workers=2))
    assert len(a) == len(b) == 3
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_eval_preprocessing_matches_torchvision(tmp_path):
    T = pytest.importorskip("torchvision.transforms")
    samples, _ = scan("imagenet", imagenet_tree(tmp_path / "in"), "val")
    ld = FolderLoader(samples, 4, train=False, size=24, eval_resize=28, mean=(0, 0, 0), std=(1, 1, 1))
    tf = T.Compose([T.Resize(28), T.CenterCrop(24), T.PILToTensor()])
    want = torch.stack([tf(Image.open(p).convert("RGB")) for p, _ in samples]).float() / 255
    got = torch.cat([x for x, _ in ld])
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


@pytest.mark.parametrize("breakage,err,match", [
    ("no_val", FileNotFoundError, "val"),
    ("no_annotations", FileNotFoundError, "val_annotations.txt"),
    ("empty_class", ValueError, "holds no images"),
    ("unknown_class", ValueError, "line 1: class 'n99'"),
    ("missing_file", ValueError, "does not exist"),
])
def test_bad_tiny_trees(tmp_path, breakage, err, match):
    import shutil

    root = tiny_tree(tmp_path / "tiny", corrupt=False)
    ann = root / "val" / "val_annotations.txt"
    if breakage == "no_val":
        shutil.rmtree(root / "val")
    elif breakage == "no_annotations":
        ann.unlink()
    elif breakage == "empty_class":
        for f in (root / "train" / "n02" / "images").iterdir():
            f.unlink()
    elif breakage == "unknown_class":
        ann.write_text(ann.read_text().replace("\tn01\t", "\tn99\t", 1))
    else:
        (root / "val" / "images" / "val_n01_0.JPEG").unlink()
    with pytest.raises(err, match=match):
        load_folder_dataset("tiny-imagenet", root)


def test_bad_imagenet_trees(tmp_path):
    with pytest.raises(FileNotFoundError, match="train"):
        load_folder_dataset("imagenet", tmp_path)
    root = imagenet_tree(tmp_path / "in")
    (root / "val" / "bird").mkdir()
    with pytest.raises(ValueError, match="not in train"):
        scan("imagenet", root, "val")
    (root / "train" / "bird").mkdir()
    with pytest.raises(ValueError, match="bird' holds no images"):
        scan("imagenet", root, "train")


@pytest.mark.parametrize("arch,tv,size", [("resnet50", "resnet50", 64), ("resnet18_64", "resnet18", 64)])
def test_imagenet_models_keep_torchvision_keys(arch, tv, size):
    import torchvision.models as tvm

    from bip_fast.models import build
    from bip_fast.nn import sparsify

    model = build(arch, 7)
    assert list(model.state_dict()) == list(tvm.get_model(tv, weights=None, num_classes=7).state_dict())
    keys = set(sparsify(model).state_dict())
    plain = [k for k in keys if not k.endswith((".scores", ".mask"))]
    assert sorted(plain) == sorted(tvm.get_model(tv, weights=None, num_classes=7).state_dict())
    model.eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, size, size)).shape == (1, 7)
    if arch == "resnet18_64":
        assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
        assert isinstance(model.maxpool, torch.nn.Identity)
