"""The plan a training run prints first (segments with epochs and steps), the dataset's dense
schedule as the dense phase's default, and BiP's score-lr rule: its resolved value in the plan,
a warning outside the schedules it was measured on."""
import json
import warnings

import pytest
import torch

from bip_fast.cli import build_parser
from bip_fast.engine import Trainer, plan_segments
from bip_fast.engine.plan import describe_plan
from bip_fast.pruning import BiP
from bip_fast.pruning.bip import MEASURED_SCORE_STEPS, scaled_score_lr

from _pruning_helpers import linear_toy
from test_cli import QUICK, cli, needs_data
from test_loop import Kill, config, killer, synthetic, tiny_model


def plan(spe=391, **kw):
    cfg = config("x", **kw).resolved()
    return describe_plan(cfg, plan_segments(cfg), spe)


@pytest.mark.parametrize("dataset,epochs", [("cifar10", 160), ("cifar100", 160), ("tiny-imagenet", 200),
                                            ("imagenet", 90)])
def test_dense_phase_default_comes_from_the_dataset(dataset, epochs):
    line = plan(dataset=dataset, method="bip", epochs=1)
    assert line.startswith(f"plan: dense phase {epochs} epochs x 391 steps ({dataset}'s dense schedule;")
    assert line.endswith(f"| {epochs + 1} epochs, {(epochs + 1) * 391} steps in all")
    pre = config("x", command="pretrain", method="dense", dataset=dataset).resolved()
    assert pre.train.epochs == epochs


def test_plan_lines():
    assert plan(method="bip", pretrained="p", epochs=100) == (
        "plan: bip 100 epochs x 391 steps, score lr 0.1 (0.1 x 39100 / 39100 steps) | 100 epochs, 39100 steps in all")
    assert plan(method="bip", pretrained="p", epochs=2, score_lr=0.5, spe=10) == (
        "plan: bip 2 epochs x 10 steps, score lr 0.5 | 2 epochs, 20 steps in all")
    assert "score lr 19.55 (0.1 x 39100 / 200 steps), not a measured length (349/698/39100 steps): set --score-lr" in \
        plan(method="bip", pretrained="p", epochs=2, spe=100)
    assert plan(method="omp", pretrain_epochs=5, epochs=3, spe=7) == (
        "plan: dense phase 5 epochs x 7 steps (--pretrain-epochs) | omp 3 epochs x 7 steps | 8 epochs, 56 steps in all")
    assert plan(method="hydra", pretrained="p", spe=1) == (
        "plan: hydra score phase 20 epochs x 1 step, score lr 0.1 | hydra finetune 100 epochs x 1 step | "
        "120 epochs, 120 steps in all")
    assert plan(method="imp", sparsity=0.5, epochs=4, spe=2) == (
        "plan: imp round 0 (dense) 4 epochs x 2 steps, rewind point: start of epoch 3 | imp rounds 1-4 (each "
        "prunes 0.2 of the remaining weights, the last 0.02344 to land on --sparsity 0.5; sparsity after each round "
        "0.2, 0.36, 0.488, 0.5; rewinds and retrains) 4 x 4 epochs x 2 steps | 20 epochs, 40 steps in all")
    assert plan(method="imp", pretrained="p", rounds=2, epochs=1, spe=2) == (
        "plan: imp rounds 1-2 (fixed series --imp-rate 0.2 --rounds 2: each prunes 0.2 of the remaining weights; "
        "sparsity after each round 0.2, 0.36; rewinds and retrains) 2 x 1 epoch x 2 steps | 2 epochs, 4 steps in all")
    assert plan(method="omp", pretrained="p", epochs=1, spe=2, include="layer*,fc", exclude="layer1.*") == (
        "plan: omp 1 epoch x 2 steps | layers chosen by --include layer*,fc --exclude layer1.* | 1 epoch, 2 steps "
        "in all")
    assert plan(command="pretrain", method="dense", epochs=5, spe=3) == (
        "plan: dense 5 epochs x 3 steps, keeps the start of epoch 3 for IMP (rewind.pt) | 5 epochs, 15 steps in all")
    assert plan(command="finetune", method="dense", checkpoint="c", epochs=2, spe=3) == (
        "plan: finetune 2 epochs x 3 steps | 2 epochs, 6 steps in all")


def test_trainer_announces_the_plan_before_training(tmp_path):
    seen = []

    def cb(trainer, record):
        seen.append(("epoch", record["epoch"]))

    tr = Trainer(config(tmp_path / "r", method="bip", sparsity=0.5, pretrain_epochs=1, epochs=1, score_lr=0.5),
                 dataset=synthetic(), model_fn=tiny_model, callbacks=[cb], announce=lambda s: seen.append(s))
    tr.run()
    assert seen[0] == tr.plan_text == ("plan: dense phase 1 epoch x 3 steps (--pretrain-epochs) | bip 1 epoch x 3 "
                                       "steps, score lr 0.5 | 2 epochs, 6 steps in all")
    assert seen[1:] == [("epoch", 1), ("epoch", 2)]


def test_help_names_the_dataset_defaults():
    text = build_parser()._subparsers._group_actions[0].choices["prune"].format_help()
    assert "tiny-imagenet 200" in text and "imagenet 90" in text and "cifar10/cifar100 160" in text


@needs_data
@pytest.mark.parametrize("args,first", [
    (["pretrain"], "plan: dense 1 epoch x 2 steps | 1 epoch, 2 steps in all"),
    (["prune", "--method", "omp", "--pretrain-epochs", "1"],
     "plan: dense phase 1 epoch x 2 steps (--pretrain-epochs) | omp 1 epoch x 2 steps | 2 epochs, 4 steps in all"),
])
def test_cli_first_line_is_the_plan(tmp_path, args, first):
    r = cli(*args, *QUICK, "--out", tmp_path / "run")  # QUICK has --no-progress
    lines = r.stdout.strip().splitlines()
    assert lines[0] == first
    assert json.loads(lines[-1])["epochs"] == int(first.split("| ")[-1].split()[0])


# ----------------------------------------------------------------------------- the score-lr rule
def test_rule_and_its_measured_lengths():
    assert MEASURED_SCORE_STEPS == (349, 698, 39100)  # the lengths it was measured at, nothing in between
    lo, hi = MEASURED_SCORE_STEPS[0], MEASURED_SCORE_STEPS[-1]
    assert scaled_score_lr(hi) == pytest.approx(0.1) and scaled_score_lr(lo) == pytest.approx(11.2034, abs=1e-4)
    assert scaled_score_lr(10) * 10 == pytest.approx(0.1 * 39100)  # the product is what the rule keeps


@pytest.mark.parametrize("steps,warns", [(10, "391"), (331, "11.81"), (348, None), (349, None), (698, None),
                                         (1000, "3.91"), (5000, "0.782"), (39000, None), (39100, None),
                                         (41100, "0.09513"), (500_000, "0.00782"), (None, None)])
def test_warning_outside_the_measured_range(steps, warns):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        alg = BiP(linear_toy(), 0.5, total_steps=steps)
    mine = [w for w in got if "score_lr=None resolves to" in str(w.message)]
    if warns is None:
        assert not mine
    else:
        assert len(mine) == 1 and f"resolves to {warns}" in str(mine[0].message)
        assert mine[0].filename == __file__  # points at the caller
        assert alg.score_lr == pytest.approx(scaled_score_lr(steps))


def test_no_warning_for_an_explicit_score_lr_or_the_official_variant():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        BiP(linear_toy(), 0.5, total_steps=10, score_lr=0.3)
        BiP(linear_toy(), 0.5, total_steps=10, variant="official")
        torch.manual_seed(0)


def test_resumed_run_says_where_it_continues(tmp_path):
    kw = dict(method="omp", sparsity=0.5, pretrain_epochs=1, epochs=2)
    with pytest.raises(Kill):
        Trainer(config(tmp_path / "r", **kw), dataset=synthetic(), model_fn=tiny_model, callbacks=[killer(2)]).run()
    seen = []
    Trainer(config(tmp_path / "r", resume=True), dataset=synthetic(), model_fn=tiny_model, announce=seen.append).run()
    assert seen == ["plan (resuming at epoch 2 of omp): dense phase 1 epoch x 3 steps (--pretrain-epochs) | omp 2 "
                    "epochs x 3 steps | 3 epochs, 9 steps in all"]
