"""The speedup benchmark's accounting (benchmarks/_speedup_report.py) on run records written by hand:
time to IMP's accuracy, the convergence check, the aggregation over seeds and winning tickets."""

import math

import pytest

from _script_helpers import load_script


R = load_script("_speedup_report")
S = load_script("_speedup_stats")
T = load_script("_speedup_tables")


def _imp(seed, accs, secs=100.0, vals=None, steps=10):
    """IMP records for rounds 1..len(accs), each round taking ``secs`` seconds and ``steps`` steps."""
    vals = vals or [None] * len(accs)
    return {"method": "imp", "seed": seed, "records": [
        {"round": i + 1, "sparsity": R.target_sparsity(i + 1), "test_acc": a, "val_acc": v,
         "cum_train_seconds": secs * (i + 1), "cum_steps": steps * (i + 1)}
        for i, (a, v) in enumerate(zip(accs, vals))]}


def _one_shot(method, seed, rnd, curve):
    """A one-shot run with evaluations (step, seconds, test accuracy[, validation accuracy])."""
    pts = [{"step": c[0], "train_seconds": c[1], "test_acc": c[2], "val_acc": c[3] if len(c) > 3 else None}
           for c in curve]
    return {"method": method, "seed": seed, "target_round": rnd, "sparsity": R.target_sparsity(rnd),
            "test_acc": pts[-1]["test_acc"], "val_acc": pts[-1]["val_acc"], "train_seconds": pts[-1]["train_seconds"],
            "steps": pts[-1]["step"], "curve": pts}


def test_crossing_first_point_reaching_threshold():
    curve = [{"step": 10, "train_seconds": 5.0, "test_acc": 0.50}, {"step": 20, "train_seconds": 10.0, "test_acc": 0.61},
             {"step": 30, "train_seconds": 15.0, "test_acc": 0.60}]
    assert R.crossing(curve, 0.61)["step"] == 20  # reached exactly at the second point
    assert R.crossing(curve, 0.60)["step"] == pytest.approx(10 + 10 * 10 / 11)
    assert R.crossing(curve, 0.62) is None


def test_aggregate_speedup_at_imp_accuracy_by_hand():
    # IMP at round 3 (48.8%): validation 0.60 and 0.62 -> mean 0.61 (the threshold, no minus std);
    # test 0.58 and 0.60; 300 s wall (3 rounds of 100 s), 30 steps, for both seeds.
    results = {"imp": [_imp(0, [0.5, 0.55, 0.58], vals=[0.5, 0.55, 0.60]),
                       _imp(1, [0.5, 0.55, 0.60], vals=[0.5, 0.55, 0.62])],
               "bip_fused": [_one_shot("bip_fused", 0, 3, [(1, 10.0, 0.50, 0.58), (2, 20.0, 0.55, 0.60),
                                                           (3, 30.0, 0.57, 0.615)]),
                             _one_shot("bip_fused", 1, 3, [(1, 12.0, 0.52, 0.57), (2, 22.0, 0.57, 0.62),
                                                           (3, 32.0, 0.59, 0.61)])],
               "omp": [_one_shot("omp", 0, 3, [(1, 50.0, 0.40, 0.40), (2, 100.0, 0.50, 0.50)])]}
    # calibrated cost: IMP 2 s/step, BiP (fused) 1 s/step, OMP 3 s/step
    calib = {"s_per_step": {"imp": 2.0, "bip_fused": 1.0, "omp": 3.0}, "cut_seconds": {}, "hydra_score_steps": 1}
    rows = R.aggregate(results, ["imp", "bip_fused", "omp"], calib)
    imp = next(r for r in rows if r["method"] == "imp")
    assert imp["test_acc"] == pytest.approx(0.59) and imp["val_acc"] == pytest.approx(0.61)
    assert imp["test_acc_std"] == pytest.approx(math.sqrt(2) * 0.01)
    assert imp["train_seconds"] == pytest.approx(300.0) and imp["cost_seconds"] == pytest.approx(60.0)
    bip = next(r for r in rows if r["method"] == "bip_fused")
    # mean validation curve: 0.575, 0.61, 0.6125 -> reaches 0.61 at step 2 (wall 21 s, cost 2 s),
    # where the mean test accuracy is 0.56
    assert [p["val_acc"] for p in bip["curve"]] == pytest.approx([0.575, 0.61, 0.6125])
    assert bip["steps_to_imp_accuracy"] == 2 and bip["test_acc_at_imp_accuracy"] == pytest.approx(0.56)
    assert bip["wall_seconds_to_imp_accuracy"] == pytest.approx(21.0)
    assert bip["wall_speedup_at_imp_accuracy"] == pytest.approx(300.0 / 21.0)
    assert bip["cost_seconds_to_imp_accuracy"] == pytest.approx(2.0)
    assert bip["speedup_at_imp_accuracy"] == pytest.approx(60.0 / 2.0)  # the calibrated one
    assert bip["gap_to_imp_accuracy"] is None
    assert bip["imp_time_ratio"] == pytest.approx(300.0 / 31.0) and bip["imp_cost_ratio"] == pytest.approx(60.0 / 3.0)
    omp = next(r for r in rows if r["method"] == "omp")
    assert omp["steps_to_imp_accuracy"] is None and omp["speedup_at_imp_accuracy"] is None
    assert omp["gap_to_imp_accuracy"] == pytest.approx(0.61 - 0.50)
    v = R.verdicts(rows, ["imp", "bip_fused", "omp"])
    assert len(v) == 1 and v[0]["method"] == "bip_fused"
    # paired per seed: 0.57 - 0.58 and 0.59 - 0.60, -1 point on both seeds: the interval is [-1, -1],
    # below 0 and not above -1: worse (the old unpaired rule called this "within one std")
    pv = v[0]["paired_vs_imp"]
    assert pv["mean"] == pytest.approx(-1.0) and pv["ci95"] == pytest.approx([-1.0, -1.0])
    assert pv["positive"] == 0 and pv["n"] == 2
    assert v[0]["accuracy_verdict"] == "worse" and not v[0]["accuracy_passed"]
    # every bootstrap resample crosses at step 2 exactly (seed 0: 0.58 -> 0.60 against 0.60; seed 1:
    # 0.57 -> 0.62 against 0.62; mixed: 0.575 -> 0.61 against 0.61): the interval is the point
    assert bip["speedup_at_imp_accuracy_ci90"]["ci90"] == pytest.approx([30.0, 30.0])
    assert v[0]["speedup_target"] == 3.0 and v[0]["speedup_passed"] is True
    assert v[0]["fixed_budget_speedup"] == pytest.approx(20.0)
    # without a calibration the wall clock decides
    assert next(r for r in R.aggregate(results, ["imp", "bip_fused"]) if r["method"] == "bip_fused")[
        "speedup_at_imp_accuracy"] == pytest.approx(300.0 / 21.0)


def test_cost_at_and_control():
    calib = {"s_per_step": {"dense": 1.0, "imp": 1.02, "omp": 1.04, "hydra_score": 2.0, "hydra_finetune": 1.0,
                            "snip": 1.0}, "cut_seconds": {"snip": 5.0}, "hydra_score_steps": 10}
    assert R.cost_at(calib, "hydra", 4) == pytest.approx(8.0)
    assert R.cost_at(calib, "hydra", 15) == pytest.approx(25.0)
    assert R.cost_at(calib, "snip", 3) == pytest.approx(8.0)
    assert R.cost_at(calib, "gmp", 3) is None and R.cost_at(None, "imp", 3) is None
    c = R.control(calib, {"dense": 1.0, "imp": 1.2, "omp": 1.0})
    assert c["max_rel_diff"] == pytest.approx(0.04) and c["calibrated_agree"] is True
    assert c["wall_max_rel_diff"] == pytest.approx(0.2) and c["wall_agree"] is False
    assert "round_paired_max_rel_diff" not in c  # a calibration without its rounds
    # rounds whose load drifts (x1, x1.3, x0.8) but where IMP's step is always 1% dearer than
    # dense's and OMP's: the medians of the kinds may differ, the round-paired ratio sees the 1%
    drift = [1.0, 1.3, 0.8]
    calib["s_per_step_rounds"] = {"dense": drift, "imp": [1.01 * x for x in drift], "omp": drift}
    c = R.control(calib, {})
    assert c["round_paired_max_rel_diff"] == pytest.approx(0.01)
    assert "paired within rounds 1.0%" in T.control_line(c)


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


def test_paired_interval_by_hand():
    # differences 1, 2, 3 points: mean 2, sd 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3)
    p = S.paired({0: 1.0, 1: 2.0, 2: 3.0})
    half = 4.302653 / math.sqrt(3)
    assert p["mean"] == pytest.approx(2.0) and p["ci95"] == pytest.approx([2 - half, 2 + half], abs=1e-5)
    assert p["positive"] == 3 and p["n"] == 3 and p["verdict"] == "non-inferior"  # lower end -0.48 > -1
    assert S.paired({0: 1.0, 1: 1.2, 2: 1.1})["verdict"] == "better"
    assert S.paired({0: -3.0, 1: -3.2, 2: -2.9})["verdict"] == "worse"
    assert S.paired({0: -3.0, 1: 2.0, 2: 0.0})["verdict"] == "inconclusive"
    assert S.paired({0: 1.0})["ci95"] is None and S.paired({}) is None
    assert S.paired_diff({0: 0.61, 1: 0.60, 2: 0.5}, {0: 0.60, 1: 0.62}) == pytest.approx({0: 1.0, 1: -2.0})


def test_crossing_interpolated_between_points():
    curve = [{"step": 10, "train_seconds": 5.0, "cost_seconds": 10.0, "test_acc": 0.40, "val_acc": 0.50},
             {"step": 20, "train_seconds": 10.0, "cost_seconds": 20.0, "test_acc": 0.60, "val_acc": 0.70}]
    hit = R.crossing(curve, 0.65, "val_acc")  # 3/4 of the way from 0.50 to 0.70
    assert hit["interpolated"] and hit["step"] == pytest.approx(17.5) and hit["cost_seconds"] == pytest.approx(17.5)
    assert hit["train_seconds"] == pytest.approx(8.75) and hit["test_acc"] == pytest.approx(0.55)
    first = R.crossing(curve, 0.45, "val_acc")
    assert first["interpolated"] is False and first["step"] == 10
    assert R.crossing(curve, 0.71, "val_acc") is None


def test_speedup_bootstrap_interval_spans_the_seeds():
    # IMP: 3 rounds of 10 steps at 1 s/step on both seeds (cost 30 s); threshold = mean validation.
    # Seed 0 crosses 0.60 at step 5 (0.50 at 2 -> 0.60 at 5); seed 1 never reaches 0.62.
    imp = [dict(rec, seed=s) for s, v in ((0, 0.60), (1, 0.62))
           for rec in _imp(s, [0.5, 0.5, 0.5], vals=[0.5, 0.5, v])["records"] if rec["round"] == 3]
    runs = [_one_shot("omp", 0, 3, [(2, 2.0, 0.5, 0.50), (5, 5.0, 0.5, 0.60), (8, 8.0, 0.5, 0.65)]),
            _one_shot("omp", 1, 3, [(2, 2.0, 0.5, 0.50), (5, 5.0, 0.5, 0.55), (8, 8.0, 0.5, 0.58)])]
    calib = {"s_per_step": {"imp": 1.0, "omp": 1.0}, "cut_seconds": {}, "hydra_score_steps": 1}
    b = R.speedup_bootstrap(imp, runs, "omp", calib, "val_acc", samples=400)
    # draws {0,0}: 30 / 5 = 6x; {1,1}: never; {0,1}: threshold 0.61, mean curve 0.50, 0.575, 0.615
    # -> crosses 7/8 of the way from step 5 to 8 (7.625): 30 / 7.625 = 3.93x
    assert 0.6 < b["reached_fraction"] < 0.9
    assert b["ci90"][0] is None and b["ci90"][1] == pytest.approx(6.0)
    assert R.speedup_bootstrap(imp[:1], runs[:1], "omp", calib, "val_acc") is None  # one seed: no interval


def test_winning_tickets_paired_against_dense():
    # dense 0.60 / 0.61 / 0.62; IMP loses 0.2-0.4 points at round 3 (non-inferior), 3-5 at round 6 (worse)
    dense = [{"seed": s, "test_acc": a} for s, a in enumerate((0.60, 0.61, 0.62))]
    imp = [_imp(s, [0.6, 0.6, a3, 0.6, 0.6, a6]) for s, (a3, a6) in
           enumerate(((0.598, 0.57), (0.607, 0.57), (0.616, 0.57)))]
    omp = [_one_shot("omp", s, r, [(1, 1.0, a)]) for s, a in enumerate((0.61, 0.62, 0.63)) for r in (3,)]
    omp += [_one_shot("omp", s, 6, [(1, 1.0, a)]) for s, a in enumerate((0.605, 0.612, 0.621))]
    results = {"imp": imp, "omp": omp}
    rows = R.aggregate(results, ["imp", "omp"], rounds=(3, 6), dense_runs=dense)
    t = R.winning_tickets(rows, results, 0.61, ["imp", "omp"])
    assert t["imp"]["sparsest_winning_ticket"] == pytest.approx(R.target_sparsity(3))
    assert t["omp"]["sparsest_winning_ticket"] == pytest.approx(R.target_sparsity(6))
    assert [p["round"] for p in t["imp"]["imp_every_round"]] == [1, 2, 3, 4, 5, 6]
    omp3 = next(r for r in rows if r["method"] == "omp" and r["target_sparsity"] == pytest.approx(R.target_sparsity(3)))
    assert omp3["paired_vs_dense"]["mean"] == pytest.approx(1.0) and omp3["paired_vs_dense"]["verdict"] == "better"
    assert omp3["paired_vs_imp"]["positive"] == 3 and omp3["structure"] == "global"
    # the tables print the intervals
    assert "[" in T.headline_table(rows, ["imp", "omp"]) and "48.8%" in T.tickets_table(t, 0.61)
