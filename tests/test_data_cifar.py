"""Tests for bip_fast.data loading: real and synthetic CIFAR-10/100 pickles, subsets, error messages."""
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from bip_fast.data import cifar as data
from bip_fast.data import load_dataset

from _data_helpers import REAL, needs_real


# --- synthetic pickle directories --------------------------------------------------------------

def _write_batch(path, n, label_key, num_classes, rng, per_class=None):
    labels = np.arange(n) % num_classes
    rng.shuffle(labels)
    entry = {"batch_label": "synthetic", label_key: labels.tolist(),
             "data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)}
    if label_key == "fine_labels":
        entry["coarse_labels"] = (labels // 5).tolist()
    with open(path, "wb") as f:
        pickle.dump(entry, f)
    return entry


def _make_cifar10(root, n_per_batch=20):
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        entries[name] = _write_batch(folder / name, n_per_batch, "labels", 10, rng)
    return folder, entries


def _make_cifar100(root, n_train=300, n_test=200):
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(1)
    train = _write_batch(folder / "train", n_train, "fine_labels", 100, rng)
    test = _write_batch(folder / "test", n_test, "fine_labels", 100, rng)
    return folder, train, test


# --- loading ---------------------------------------------------------------------------------

@needs_real
def test_real_cifar10_shapes_dtypes_values(cifar):
    assert cifar.train_x.shape == (50000, 3, 32, 32) and cifar.train_x.dtype == torch.uint8
    assert cifar.test_x.shape == (10000, 3, 32, 32) and cifar.test_x.dtype == torch.uint8
    assert cifar.train_y.shape == (50000,) and cifar.train_y.dtype == torch.int64
    assert cifar.test_y.shape == (10000,) and cifar.test_y.dtype == torch.int64
    assert cifar.num_classes == 10 and cifar.name == "cifar10"
    assert torch.bincount(cifar.train_y).tolist() == [5000] * 10
    assert torch.bincount(cifar.test_y).tolist() == [1000] * 10
    # Byte-exact against the raw pickles: first training image, last test image.
    folder = REAL / "cifar-10-batches-py"
    with open(folder / "data_batch_1", "rb") as f:
        b1 = pickle.load(f, encoding="latin1")
    with open(folder / "test_batch", "rb") as f:
        tb = pickle.load(f, encoding="latin1")
    assert torch.equal(cifar.train_x[0].reshape(-1), torch.from_numpy(b1["data"][0]))
    assert torch.equal(cifar.train_x[:10000].reshape(10000, -1), torch.from_numpy(b1["data"]))
    assert cifar.train_y[:10000].tolist() == list(b1["labels"])
    assert torch.equal(cifar.test_x[-1].reshape(-1), torch.from_numpy(tb["data"][-1]))
    assert cifar.test_y.tolist() == list(tb["labels"])
    # The normalisation constants are the statistics of the data.
    x = cifar.train_x.float().div_(255)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor(cifar.mean), atol=1e-4)
    assert torch.allclose(std, torch.tensor(cifar.std), atol=1e-4)


@needs_real
def test_resolve_data_dir_env_and_batches_folder(monkeypatch):
    monkeypatch.setenv("BIP_FAST_DATA", str(REAL))
    root, folder = data.resolve_data_dir("cifar10")
    assert folder == REAL / "cifar-10-batches-py" and root == REAL
    root, folder = data.resolve_data_dir("cifar10", REAL / "cifar-10-batches-py")
    assert folder == REAL / "cifar-10-batches-py" and root == REAL
    monkeypatch.delenv("BIP_FAST_DATA")
    _, folder = data.resolve_data_dir("cifar10")
    assert folder == Path("./data") / "cifar-10-batches-py"


def test_synthetic_cifar10_parent_or_batches_folder(tmp_path, monkeypatch):
    folder, entries = _make_cifar10(tmp_path)
    for arg in (tmp_path, folder, str(folder)):
        ds = load_dataset("cifar10", data_dir=arg, download=False)
        assert ds.train_x.shape == (100, 3, 32, 32) and ds.test_x.shape == (20, 3, 32, 32)
        expect = np.concatenate([entries[f"data_batch_{i}"]["data"] for i in range(1, 6)])
        assert torch.equal(ds.train_x.reshape(100, -1), torch.from_numpy(expect))
        assert ds.test_y.tolist() == entries["test_batch"]["labels"]
    monkeypatch.setenv("BIP_FAST_DATA", str(tmp_path))
    ds = load_dataset("cifar10", download=False)
    assert ds.train_x.shape[0] == 100


def test_cifar100_synthetic(tmp_path):
    _, train, test = _make_cifar100(tmp_path)
    ds = load_dataset("cifar100", data_dir=tmp_path, download=False)
    assert ds.num_classes == 100 and ds.name == "cifar100"
    assert ds.train_x.shape == (300, 3, 32, 32) and ds.test_x.shape == (200, 3, 32, 32)
    assert ds.train_y.tolist() == train["fine_labels"]  # fine, not coarse labels
    assert torch.equal(ds.test_x.reshape(200, -1), torch.from_numpy(test["data"]))
    assert len(ds.mean) == 3 and len(ds.std) == 3 and ds.mean != data._SPECS["cifar10"][5]


def test_subset_class_balanced_and_deterministic(tmp_path):
    _make_cifar100(tmp_path)
    a = load_dataset("cifar100", data_dir=tmp_path, subset=(200, 100), seed=3, download=False)
    b = load_dataset("cifar100", data_dir=tmp_path, subset=(200, 100), seed=3, download=False)
    c = load_dataset("cifar100", data_dir=tmp_path, subset=(200, 100), seed=4, download=False)
    assert torch.bincount(a.train_y, minlength=100).tolist() == [2] * 100
    assert torch.bincount(a.test_y, minlength=100).tolist() == [1] * 100
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.train_y, b.train_y)
    assert not torch.equal(a.train_x, c.train_x)  # 3 samples per class -> seed matters
    full = load_dataset("cifar100", data_dir=tmp_path, subset=(None, 50), download=False)
    assert full.train_x.shape[0] == 300 and full.test_x.shape[0] == 50
    with pytest.raises(ValueError, match="subset"):
        load_dataset("cifar100", data_dir=tmp_path, subset=(301, 10), download=False)
    with pytest.raises(ValueError, match="class 1"):  # no sample of class 1 at all
        data.subset_indices(torch.zeros(5, dtype=torch.long), 5, 2)
    with pytest.raises(TypeError, match="subset"):
        load_dataset("cifar100", data_dir=tmp_path, subset=100, download=False)


@needs_real
def test_subset_indices_on_real_labels(cifar):
    idx = data.subset_indices(cifar.train_y, 1005, 10, seed=0)
    counts = torch.bincount(cifar.train_y[idx], minlength=10).tolist()
    assert counts == [101] * 5 + [100] * 5
    assert idx.unique().numel() == 1005 and torch.all(idx[1:] > idx[:-1])
    assert torch.equal(idx, data.subset_indices(cifar.train_y, 1005, 10, seed=0))
    assert not torch.equal(idx, data.subset_indices(cifar.train_y, 1005, 10, seed=1))


def test_missing_dir_error(tmp_path):
    where = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError) as ei:
        load_dataset("cifar10", data_dir=where, download=False)
    msg = str(ei.value)
    for needle in ("data_batch_1", "test_batch", "cifar-10-batches-py", str(where),
                   "--data-dir", "BIP_FAST_DATA"):
        assert needle in msg


def test_failed_download_becomes_file_not_found(tmp_path, monkeypatch):
    calls = []

    def offline(name, root):
        calls.append((name, root))
        raise OSError("network unreachable")

    monkeypatch.setattr(data, "_download", offline)
    with pytest.raises(FileNotFoundError, match="download failed.*network unreachable"):
        load_dataset("cifar100", data_dir=tmp_path, download=True)
    assert calls == [("cifar100", tmp_path)]


def test_failed_download_leaves_no_folder_behind(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tv_utils

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(tv_utils, "download_and_extract_archive", offline)
    where = tmp_path / "not" / "there"
    with pytest.raises(FileNotFoundError, match="network unreachable"):
        load_dataset("cifar10", data_dir=where, download=True)
    assert not where.exists()


def test_missing_single_file_named(tmp_path):
    folder, _ = _make_cifar10(tmp_path)
    (folder / "data_batch_4").unlink()
    with pytest.raises(FileNotFoundError, match="missing data_batch_4 in"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_corrupt_pickle_error_names_file(tmp_path):
    folder, _ = _make_cifar10(tmp_path)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(ValueError, match=r"data_batch_3' is corrupt"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    (folder / "data_batch_3").write_bytes(os.urandom(1000))
    with pytest.raises(ValueError, match=r"data_batch_3' is corrupt"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)
    with open(folder / "data_batch_3", "wb") as f:  # readable pickle, wrong content
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(ValueError, match=r"data_batch_3' is corrupt.*3072"):
        load_dataset("cifar10", data_dir=tmp_path, download=False)


def test_bad_arguments():
    with pytest.raises(ValueError, match="name"):
        load_dataset("mnist", download=False)
    with pytest.raises(TypeError, match="data_dir"):
        load_dataset("cifar10", data_dir=3, download=False)
    with pytest.raises(ValueError, match="device"):
        load_dataset("cifar10", device="gpu0", download=False)
    with pytest.raises(TypeError, match="seed"):
        load_dataset("cifar10", seed=1.5, download=False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_to_cuda(tmp_path):
    _make_cifar10(tmp_path)
    ds = load_dataset("cifar10", data_dir=tmp_path, device="cuda", download=False)
    assert ds.train_x.is_cuda and ds.train_y.is_cuda and ds.test_x.is_cuda
    ref = load_dataset("cifar10", data_dir=tmp_path, download=False)
    assert torch.equal(ds.train_x.cpu(), ref.train_x) and torch.equal(ds.test_y.cpu(), ref.test_y)


def _flip_pixel_byte(path):
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0x5A  # inside the pixel array: the pickle still loads
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("manifest,algo", [("SHA256SUMS", "sha256"), ("MD5SUMS", "md5")])
def test_checksum_manifest_catches_a_flipped_pixel_byte(tmp_path, manifest, algo):
    import hashlib

    folder, _ = _make_cifar10(tmp_path)
    lines = [f"{hashlib.new(algo, f.read_bytes()).hexdigest()}  cifar-10-batches-py/{f.name}\n"
             for f in sorted(folder.iterdir())]
    (tmp_path / manifest).write_text("".join(lines))
    assert load_dataset("cifar10", tmp_path, download=False).train_x.shape[0] == 100  # intact: loads
    _flip_pixel_byte(folder / "data_batch_3")
    with pytest.raises(ValueError, match=rf"data_batch_3' is corrupt: its {algo.upper()} differs .*{manifest}"):
        load_dataset("cifar10", tmp_path, download=False)
    (tmp_path / manifest).unlink()  # no manifest, no original-format files: only the structure is checked
    assert load_dataset("cifar10", tmp_path, download=False).train_x.shape[0] == 100


def test_original_format_file_must_match_the_published_md5(tmp_path):
    pytest.importorskip("torchvision")
    folder, _ = _make_cifar10(tmp_path)
    entry = pickle.loads((folder / "test_batch").read_bytes(), encoding="latin1")
    entry["filenames"] = [f"img_{i}.png" for i in range(len(entry["labels"]))]  # claims to be the original
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(ValueError, match=r"test_batch' is corrupt: its MD5 differs from the one of the published"):
        load_dataset("cifar10", tmp_path, download=False)


def _image_set(x):
    return {bytes(img.numpy().tobytes()) for img in x}


def test_validation_split_held_out_of_training(tmp_path):
    _make_cifar100(tmp_path)  # 300 training images, 3 per class
    plain = load_dataset("cifar100", data_dir=tmp_path, subset=(100, 50), seed=3, download=False)
    d = load_dataset("cifar100", data_dir=tmp_path, subset=(100, 50), seed=3, download=False, val=100)
    # the training subset is the one a load without validation gives; the test split is untouched
    assert torch.equal(d.train_x, plain.train_x) and torch.equal(d.train_y, plain.train_y)
    assert torch.equal(d.test_x, plain.test_x)
    # class-balanced, disjoint from the training images, deterministic
    assert torch.bincount(d.val_y, minlength=100).tolist() == [1] * 100
    assert not _image_set(d.val_x) & _image_set(d.train_x)
    again = load_dataset("cifar100", data_dir=tmp_path, subset=(100, 50), seed=3, download=False, val=100)
    assert torch.equal(again.val_x, d.val_x)
    xs, ys = next(iter(d.val_loader(1000)))
    assert xs.shape == (100, 3, 32, 32) and torch.equal(ys, d.val_y)
    # without a training subset the training split is everything but the validation images
    whole = load_dataset("cifar100", data_dir=tmp_path, download=False, val=200)
    assert whole.train_x.shape[0] == 100 and not _image_set(whole.val_x) & _image_set(whole.train_x)
    # bad values: more than the images left, wrong type; no split asked for: a clear error
    with pytest.raises(ValueError, match="val"):
        load_dataset("cifar100", data_dir=tmp_path, subset=(100, 50), download=False, val=201)
    with pytest.raises(TypeError, match="val"):
        load_dataset("cifar100", data_dir=tmp_path, download=False, val=1.5)
    with pytest.raises(ValueError, match="validation split"):
        plain.val_loader(10)
