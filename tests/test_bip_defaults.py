"""BiP's defaults: the weight learning rate of dense training and a score learning rate that keeps
the paper's product of score lr and steps (docs/equal_accuracy.md); the paper's text as a named config."""

import pytest
import torch
from torch import nn

from bip_fast.engine.hparams import RunConfig
from bip_fast.pruning import BiP
from bip_fast.pruning.bip import PAPER_HPARAMS, PAPER_SCORE_STEPS, scaled_score_lr


def toy():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_scaled_score_lr_by_hand():
    assert PAPER_SCORE_STEPS == 39100  # 100 epochs x 391 steps of 128 CIFAR-10 images
    assert scaled_score_lr(39100) == pytest.approx(0.1)  # the paper's own schedule: its 0.1
    assert scaled_score_lr(391) == pytest.approx(10.0)  # 100x fewer steps: 100x the rate
    assert scaled_score_lr(349) == pytest.approx(0.1 * 39100 / 349)
    assert scaled_score_lr(None) == pytest.approx(0.1)
    assert scaled_score_lr(782, base=0.2) == pytest.approx(10.0)


def test_bip_defaults_resolve_the_score_lr_from_total_steps():
    alg = BiP(toy(), 0.5, total_steps=391)
    assert alg.param_groups["weights"].lr == pytest.approx(0.1)
    assert alg.param_groups["scores"].lr == pytest.approx(10.0)
    assert BiP(toy(), 0.5).param_groups["scores"].lr == pytest.approx(0.1)  # no schedule length: 0.1
    assert BiP(toy(), 0.5, total_steps=391, score_lr=0.3).param_groups["scores"].lr == pytest.approx(0.3)


def test_paper_hparams_reproduce_the_paper_text():
    alg = BiP(toy(), 0.5, total_steps=391, **PAPER_HPARAMS)
    assert alg.param_groups["weights"].lr == pytest.approx(0.01)
    assert alg.param_groups["scores"].lr == pytest.approx(0.1)
    assert alg.gamma == 1.0 and alg.param_groups["weights"].weight_decay == pytest.approx(1e-4)


def test_bad_score_lr_is_refused_by_name():
    with pytest.raises(ValueError, match="score_lr"):
        BiP(toy(), 0.5, score_lr=-1.0)


def test_cli_defaults_bip_leaves_score_lr_to_the_rule_hydra_gets_its_own():
    bip = RunConfig.from_flat({**RunConfig().flat(), "method": "bip", "command": "prune"}).resolved()
    assert bip.train.lr == pytest.approx(0.1) and bip.prune.score_lr is None
    hydra = RunConfig.from_flat({**RunConfig().flat(), "method": "hydra", "command": "prune"}).resolved()
    assert hydra.prune.score_lr == pytest.approx(0.1) and hydra.train.lr == pytest.approx(0.01)
