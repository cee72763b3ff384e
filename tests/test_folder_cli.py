"""``--dataset tiny-imagenet|imagenet`` through the CLI on generated JPEG trees: a few training steps
of ResNet-50 on an ImageNet-layout folder and of the 64x64-stem ResNet-18 on a Tiny-ImageNet-layout
folder (SNIP's score batches come from the folder too), then eval; bad input is one line."""

import json

import pytest

from test_cli import cli
from test_imagefolder import imagenet_tree, tiny_tree


def test_prune_imagenet_resnet50_a_few_steps(tmp_path):
    root = imagenet_tree(tmp_path / "imagenet")
    out = tmp_path / "run"
    cli("prune", "--dataset", "imagenet", "--data-dir", root, "--arch", "resnet50", "--method", "omp",
        "--sparsity", "0.5", "--pretrain-epochs", "1", "--epochs", "1", "--batch-size", "2",
        "--test-batch-size", "4", "--device", "cpu", "--out", out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(0.0 <= r.get("test_acc", 0.0) <= 1.0 for r in rows)
    r = cli("eval", "--checkpoint", out, "--dataset", "imagenet", "--data-dir", root, "--device", "cpu")
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["test_samples"] == 4 and 0.0 <= rep["test_acc"] <= 1.0  # 2 classes x 2 val images
    assert rep["sparsity"] == pytest.approx(0.5, abs=1e-4)


def test_prune_tiny_imagenet_snip(tmp_path):
    root = tiny_tree(tmp_path / "tiny")
    out = tmp_path / "run"
    cli("prune", "--dataset", "tiny-imagenet", "--data-dir", root, "--arch", "resnet18_64", "--method", "snip",
        "--sparsity", "0.9", "--epochs", "1", "--batch-size", "4", "--device", "cpu", "--out", out)
    assert (out / "model.pt").is_file()


@pytest.mark.parametrize("flags,match", [
    (["--dataset", "imagenet", "--subset", "10", "10"], "subset"),
    (["--dataset", "imagenet", "--workers", "-1"], "workers"),
])
def test_folder_dataset_bad_flags_are_one_line(tmp_path, flags, match):
    r = cli("prune", "--arch", "resnet50", "--out", tmp_path / "x", *flags, check=False)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and match in r.stderr
    assert not (tmp_path / "x").exists()


def test_missing_folder_is_one_line(tmp_path):
    r = cli("prune", "--dataset", "tiny-imagenet", "--data-dir", tmp_path / "nothing", "--arch", "resnet18_64",
            "--out", tmp_path / "x", check=False)
    assert r.returncode != 0 and "nothing" in r.stderr and "Traceback" not in r.stderr
