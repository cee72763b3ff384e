"""The speedup benchmark's accounting (benchmarks/_speedup_report.py) on run records written by hand:
time to IMP's accuracy, the convergence check, the aggregation over seeds and winning tickets."""

import importlib.util
import math
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load():
    path = os.path.join(ROOT, "benchmarks", "_speedup_report.py")
    spec = importlib.util.spec_from_file_location("_bip_fast_speedup_report", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


R = _load()


def _imp(seed, accs, secs=100.0):
    """IMP records for rounds 1..len(accs), each round taking ``secs`` seconds."""
    return {"method": "imp", "seed": seed, "records": [
        {"round": i + 1, "sparsity": R.target_sparsity(i + 1), "test_acc": a, "cum_train_seconds": secs * (i + 1)}
        for i, a in enumerate(accs)]}


def _one_shot(method, seed, rnd, curve):
    """A one-shot run with evaluations (step, seconds, accuracy)."""
    return {"method": method, "seed": seed, "target_round": rnd, "sparsity": R.target_sparsity(rnd),
            "test_acc": curve[-1][2], "train_seconds": curve[-1][1],
            "curve": [{"step": s, "train_seconds": t, "test_acc": a} for s, t, a in curve]}


def test_time_to_accuracy_first_point_reaching_threshold():
    curve = [{"step": 10, "train_seconds": 5.0, "test_acc": 0.50}, {"step": 20, "train_seconds": 10.0, "test_acc": 0.61},
             {"step": 30, "train_seconds": 15.0, "test_acc": 0.60}]
    assert R.time_to_accuracy(curve, 0.60) == (10.0, 20)
    assert R.time_to_accuracy(curve, 0.62) == (None, None)


def test_aggregate_speedup_at_imp_accuracy_by_hand():
    # IMP at round 3 (48.8%): seeds 0.60 and 0.62 -> mean 0.61, std 0.01414, threshold 0.5959;
    # time 300 s (3 rounds of 100 s) for both seeds.
    results = {"imp": [_imp(0, [0.5, 0.55, 0.60]), _imp(1, [0.5, 0.55, 0.62])],
               "bip_fused": [_one_shot("bip_fused", 0, 3, [(1, 10.0, 0.58), (2, 20.0, 0.60), (3, 30.0, 0.61)]),
                             _one_shot("bip_fused", 1, 3, [(1, 12.0, 0.57), (2, 22.0, 0.59), (3, 32.0, 0.60)])],
               "omp": [_one_shot("omp", 0, 3, [(1, 50.0, 0.40), (2, 100.0, 0.50)])]}
    rows = R.aggregate(results, ["imp", "bip_fused", "omp"])
    imp = next(r for r in rows if r["method"] == "imp")
    assert imp["test_acc"] == pytest.approx(0.61)
    assert imp["test_acc_std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert imp["train_seconds"] == pytest.approx(300.0)
    bip = next(r for r in rows if r["method"] == "bip_fused")
    # mean curve: (11 s, 0.575), (21 s, 0.595), (31 s, 0.605); threshold 0.61 - 0.01414 = 0.59586
    assert [p["test_acc"] for p in bip["curve"]] == pytest.approx([0.575, 0.595, 0.605])
    assert bip["seconds_to_imp_accuracy"] == pytest.approx(31.0)
    assert bip["speedup_at_imp_accuracy"] == pytest.approx(300.0 / 31.0)
    assert bip["gap_to_imp_accuracy"] is None
    assert bip["imp_time_ratio"] == pytest.approx(300.0 / 31.0)
    omp = next(r for r in rows if r["method"] == "omp")
    assert omp["seconds_to_imp_accuracy"] is None and omp["speedup_at_imp_accuracy"] is None
    assert omp["gap_to_imp_accuracy"] == pytest.approx(0.61 - math.sqrt(2) * 0.01 - 0.50)
    v = R.verdicts(rows, ["imp", "bip_fused", "omp"])
    assert len(v) == 1 and v[0]["method"] == "bip_fused"
    assert v[0]["accuracy_verdict"] == "within one std" and v[0]["accuracy_passed"]
    assert v[0]["speedup_target"] == 3.0 and v[0]["speedup_passed"] is True


def test_convergence_criterion():
    dense = [{"seed": 0, "test_acc": 0.580, "curve": [{"step": 100, "test_acc": 0.50}, {"step": 300, "test_acc": 0.577},
                                                       {"step": 400, "test_acc": 0.580}]}]
    longer = [{"seed": 0, "test_acc": 0.583, "factor": 1.5}]
    c = R.convergence(dense, longer)
    assert c["last_quarter_gain_points"] == pytest.approx(0.3)
    assert c["longer_training_gain_points"] == pytest.approx(0.3)
    assert c["converged"] is True
    c = R.convergence(dense, [{"seed": 0, "test_acc": 0.590, "factor": 1.5}])
    assert c["longer_training_gain_points"] == pytest.approx(1.0) and c["converged"] is False
    # the last quarter (cosine annealing) is evidence, not the criterion
    annealed = [dict(dense[0], curve=[{"step": 300, "test_acc": 0.55}, {"step": 400, "test_acc": 0.58}])]
    c = R.convergence(annealed, [{"seed": 0, "test_acc": 0.575, "factor": 1.5}])
    assert c["last_quarter_gain_points"] == pytest.approx(3.0) and c["converged"] is True
    assert R.convergence(dense, [])["converged"] is False  # no evidence, no claim


def test_winning_tickets_sparsest_at_or_above_dense():
    results = {"imp": [_imp(0, [0.59, 0.60, 0.585, 0.57])],
               "omp": [_one_shot("omp", 0, 3, [(1, 1.0, 0.60)])]}
    rows = R.aggregate(results, ["imp", "omp"])
    t = R.winning_tickets(rows, results, 0.585, ["imp", "omp"])
    assert t["imp"]["sparsest_winning_ticket"] == pytest.approx(R.target_sparsity(3))
    assert t["omp"]["sparsest_winning_ticket"] == pytest.approx(R.target_sparsity(3))
    assert R.winning_tickets(rows, results, 0.61, ["imp", "omp"])["imp"]["sparsest_winning_ticket"] is None
