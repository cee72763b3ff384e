"""``prune --structure filter|channel`` keeps every class (the classifier stays dense unless
``--include`` selects it, one warning on stderr), and ``--include`` / ``--exclude PATTERN`` choose
the masked layers, shown in the plan line; on the tiny CIFAR-10 subset of test_cli."""
import json

import pytest
import torch

from test_cli import DATA, QUICK, cli, needs_data

FC = {"resnet20": "linear", "tv_resnet18": "fc"}
HELD = "dense: it produces the model's output"


def run_prune(tmp_path, name, *args, check=True):
    out = tmp_path / name
    r = cli("prune", *QUICK, "--method", "omp", "--pretrain-epochs", "1", "--sparsity", "0.9", *args,
            "--out", out, check=check)
    return out, r


def assert_classes_alive(out, fc):
    """Every class row of the saved classifier keeps a non-zero weight and its bias."""
    sd = torch.load(out / "model.pt")
    w = sd[f"{fc}.weight"] * sd[f"{fc}.mask"] if f"{fc}.mask" in sd else sd[f"{fc}.weight"]
    assert bool((w != 0).any(dim=1).all()), "a class row is all zero"
    assert bool((sd[f"{fc}.bias"] != 0).all())


@needs_data
@pytest.mark.parametrize("structure", ["filter", "channel"])
@pytest.mark.parametrize("arch", ["resnet20", "tv_resnet18"])
def test_structured_prune_keeps_every_class(tmp_path, arch, structure):
    out, r = run_prune(tmp_path, "run", "--arch", arch, "--structure", structure)
    fc = FC[arch]
    assert_classes_alive(out, fc)
    masks = torch.load(out / "masks.pt")["masks"]
    assert bool(masks[fc].all())  # dense: no class, and no input feature, removed
    assert r.stderr.count(HELD) == 1 and f"keeping '{fc}' dense" in r.stderr
    assert "already holds masked layers" not in r.stderr
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["sparsity"] > 0.85


@needs_data
def test_include_and_exclude_from_the_cli(tmp_path):
    # --include naming the classifier: it is pruned like the rest (one class left at 0.9), no warning
    out, r = run_prune(tmp_path, "inc", "--structure", "filter", "--include", "conv1,layer*,linear")
    plan = r.stdout.splitlines()[0]
    assert plan.startswith("plan: ") and "layers chosen by --include conv1,layer*,linear" in plan
    assert HELD not in r.stderr and "already holds masked layers" not in r.stderr
    assert int(torch.load(out / "masks.pt")["masks"]["linear"].any(dim=1).sum()) == 1

    # --exclude: the layer is not masked at all, and eval still loads the run (only the masked layers)
    out, r = run_prune(tmp_path, "exc", "--structure", "filter", "--exclude", "linear,conv1")
    assert "layers chosen by --exclude linear,conv1" in r.stdout.splitlines()[0]
    masks = torch.load(out / "masks.pt")["masks"]
    assert "linear" not in masks and "conv1" not in masks and "layer1.0.conv1" in masks
    assert_classes_alive(out, "linear")
    ev = cli("eval", "--checkpoint", out, "--data-dir", DATA, "--subset", "64", "50", "--device", "cpu")
    assert json.loads(ev.stdout.strip().splitlines()[-1])["kept"] == json.loads(r.stdout.strip().splitlines()[-1])["kept"]

    # a pattern that matches no layer is refused before anything is written
    bad, r = run_prune(tmp_path, "bad", "--exclude", "nope*", check=False)
    assert r.returncode == 2 and "exclude: 'nope*' matches no maskable" in r.stderr and not bad.exists()
    r = cli("pretrain", *QUICK, "--exclude", "linear", "--out", tmp_path / "pre", check=False)
    assert r.returncode == 2 and "exclude: only prune chooses the layers" in r.stderr


@needs_data
def test_nm_with_the_first_conv_excluded(tmp_path):
    """resnet20's first conv has 27 inputs, no multiple of 4: refused by name, and --exclude of it
    (a layer the run leaves dense) lets the 2:4 run go; the classifier is pruned 2:4, no class lost."""
    bad, r = run_prune(tmp_path, "bad", "--structure", "nm", "--sparsity", "0.5", check=False)
    assert r.returncode == 2 and "layer 'conv1'" in r.stderr and "--exclude conv1" in r.stderr and not bad.exists()
    out, r = run_prune(tmp_path, "nm", "--structure", "nm", "--sparsity", "0.5", "--exclude", "conv1")
    masks = torch.load(out / "masks.pt")["masks"]
    assert "conv1" not in masks and int(masks["linear"].sum()) == masks["linear"].numel() // 2
    assert_classes_alive(out, "linear")
    assert HELD not in r.stderr
