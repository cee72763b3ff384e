"""IMP lands where it is asked to: with a target sparsity every round but the last prunes 20% of
the remaining weights and the last one prunes what is left to reach the target, exactly
K = round((1 - sparsity) · N) weights as BiP's top-K keeps; the plan line lists each round's
sparsity. The paper's fixed series stays: ``IMP(rate=...)`` without a target, and
``--imp-rate R --rounds N`` on the command line."""
import json

import pytest
import torch

from bip_fast.masks import keep_count
from bip_fast.models import build
from bip_fast.pruning import IMP

from test_cli import QUICK, cli, dense_run, needs_data  # noqa: F401  (dense_run: a fixture)


def kept(alg):
    return sum(int(m.mask.sum()) for m in alg.modules)


def numel(alg):
    return sum(m.mask.numel() for m in alg.modules)


def fixed_series(n, rate, rounds):
    k = n
    for _ in range(rounds):
        k = keep_count(k, 1.0 - rate)
    return k


# ----------------------------------------------------------------------------- API
def test_schedule_lists_the_sparsity_after_each_round():
    assert IMP.schedule(0.87) == pytest.approx([0.2, 0.36, 0.488, 0.5904, 0.67232, 0.737856, 0.7902848,
                                                0.83222784, 0.865782272, 0.87])
    assert IMP.schedule(0.36) == pytest.approx([0.2, 0.36])  # an exact power costs no extra round
    assert IMP.schedule(rounds=3, rate=0.2) == pytest.approx([0.2, 0.36, 0.488])
    with pytest.raises(ValueError, match="schedule"):
        IMP.schedule(0.5, rounds=3)


def test_imp_with_a_target_lands_on_it_exactly():
    alg = IMP(build("resnet20"), sparsity=0.87)
    n = numel(alg)
    assert alg.target_rounds == 10
    for r in range(1, 10):
        alg.next_round()
        assert kept(alg) == fixed_series(n, 0.2, r), r  # 20% of the remaining weights
    alg.next_round()  # the last round prunes 1 - 0.13 / 0.8^9 = 3.1%
    assert kept(alg) == keep_count(n, 0.13)
    with pytest.raises(RuntimeError, match="round 10 reached the target sparsity 0.87"):
        alg.next_round()


def test_imp_without_a_target_is_the_fixed_series():
    alg = IMP(build("resnet20"), rate=0.2)
    n = numel(alg)
    for _ in range(10):
        alg.next_round()
    assert kept(alg) == fixed_series(n, 0.2, 10)
    assert alg.sparsity() == pytest.approx(1 - 0.8 ** 10, abs=1e-4)  # 89.3%, past 0.87


def test_imp_filter_target_lands_as_near_as_filters_allow():
    with pytest.warns(UserWarning, match="keeping 'linear' dense"):
        alg = IMP(build("resnet20"), sparsity=0.87, structure="filter")
    for _ in range(alg.target_rounds):
        alg.next_round()
    assert alg.sparsity() == pytest.approx(0.87, abs=0.01)


def test_imp_target_is_part_of_the_state():
    a = IMP(build("resnet20"), sparsity=0.5)
    a.next_round()
    sd = a.state_dict()
    b = IMP(build("resnet20"), sparsity=0.5)
    b.load_state_dict(sd)
    b.next_round(), b.next_round(), b.next_round()
    assert kept(b) == keep_count(numel(b), 0.5)
    with pytest.raises(ValueError, match="sparsity"):
        IMP(build("resnet20")).load_state_dict(sd)


# ----------------------------------------------------------------------------- CLI
def imp_run(dense, out, *args, check=True):
    return cli("prune", *QUICK, "--method", "imp", "--pretrained", dense, "--rewind-to-pretrained", *args,
               "--out", out, check=check)


@needs_data
def test_cli_imp_lands_on_the_requested_sparsity(dense_run, tmp_path):
    r = imp_run(dense_run, tmp_path / "imp87", "--sparsity", "0.87")
    plan = r.stdout.splitlines()[0]
    assert "imp rounds 1-10 (each prunes 0.2 of the remaining weights, the last 0.03142 to land on --sparsity " \
           "0.87; sparsity after each round 0.2, 0.36, 0.488, 0.5904, 0.6723, 0.7379, 0.7903, 0.8322, 0.8658, " \
           "0.87;" in plan
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert abs(rep["kept"] - keep_count(rep["prunable"], 0.13)) <= 1  # one weight, as BiP's top-K
    assert rep["kept"] == keep_count(rep["prunable"], 0.13)
    assert [x["round"] for x in rep["rounds"]] == list(range(1, 11))
    assert rep["sparsity"] == pytest.approx(0.87, abs=1 / rep["prunable"])


@needs_data
def test_cli_imp_fixed_series(dense_run, tmp_path):
    r = imp_run(dense_run, tmp_path / "fixed", "--imp-rate", "0.2", "--rounds", "3")
    plan = r.stdout.splitlines()[0]
    assert "imp rounds 1-3 (fixed series --imp-rate 0.2 --rounds 3: each prunes 0.2 of the remaining weights; " \
           "sparsity after each round 0.2, 0.36, 0.488;" in plan
    rep = json.loads(r.stdout.strip().splitlines()[-1])
    assert rep["kept"] == fixed_series(rep["prunable"], 0.2, 3)
    assert rep["sparsity"] == pytest.approx(1 - 0.8 ** 3, abs=3 / rep["prunable"])
    bad = imp_run(dense_run, tmp_path / "bad", "--rounds", "3", "--sparsity", "0.9", check=False)
    assert bad.returncode == 2 and "fixed series, which ends at sparsity 0.488" in bad.stderr
    bad = cli("prune", *QUICK, "--method", "omp", "--rounds", "3", "--pretrained", dense_run,
              "--out", tmp_path / "bad", check=False)
    assert bad.returncode == 2 and "rounds: prune --method imp" in bad.stderr
    assert not (tmp_path / "bad").exists()
