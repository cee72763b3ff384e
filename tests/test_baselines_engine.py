"""SNIP, GraSP, SynFlow and GMP through the engine and the CLI: planned segments, resume, flags and errors."""

import json
import math

import pytest

from _baselines_helpers import BASELINES


# ----------------------------------------------------------------------------- engine + CLI
def test_engine_plans_and_runs_every_baseline(tmp_path):
    from test_loop import config, synthetic, tiny_model

    from bip_fast.engine import Trainer, plan_segments

    for name in BASELINES:
        cfg = config(tmp_path / name, method=name, sparsity=0.8, epochs=2, pretrain_epochs=1, synflow_rounds=3,
                     gmp_every=1).resolved()
        kinds = [s.kind for s in plan_segments(cfg)]
        assert kinds == (["dense", "gmp"] if name == "gmp" else [name])  # SNIP/GraSP/SynFlow prune the init
        rep = Trainer(cfg, dataset=synthetic(), model_fn=tiny_model).run()
        assert rep["kept"] == math.floor(0.2 * rep["prunable"] + 0.5), name
        hist = [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
        assert len(hist) == len(kinds) + 1


@pytest.mark.parametrize("name,kill_after", [("grasp", 1), ("gmp", 2)])
def test_engine_resume_is_bit_identical(tmp_path, name, kill_after):
    from test_loop import Kill, assert_same, config, final_state, killer, synthetic, tiny_model

    from bip_fast.engine.loop import Trainer

    kw = dict(method=name, sparsity=0.7, epochs=2, pretrain_epochs=1, gmp_every=1, score_samples=20)
    ds = synthetic()
    straight = Trainer(config(tmp_path / "a", **kw), dataset=ds, model_fn=tiny_model)
    straight.run()
    first = Trainer(config(tmp_path / "b", **kw), dataset=ds, model_fn=tiny_model, callbacks=[killer(kill_after)])
    with pytest.raises(Kill):
        first.run()
    resumed = Trainer(config(tmp_path / "b", resume=True), dataset=ds, model_fn=tiny_model)
    resumed.run()
    for a, b, what in zip(final_state(straight), final_state(resumed), ("model", "algorithm")):
        assert_same(a, b, what)


def test_cli_flags_and_errors(tmp_path, capsys):
    from bip_fast.cli import main
    from bip_fast.engine.hparams import RunConfig

    cfg = RunConfig.from_flat({"method": "grasp", "command": "prune"}).resolved()
    assert (cfg.train.epochs, cfg.train.lr, cfg.prune.grasp_temperature) == (160, 0.1, 200.0)
    assert RunConfig.from_flat({"method": "gmp"}).resolved().train.epochs == 100
    for argv, expect in (
        (["--method", "snip", "--structure", "filter"], "structure: snip prunes globally or layer-wise"),
        (["--method", "grasp", "--grasp-temperature", "0"], "grasp_temperature"),
        (["--method", "synflow", "--synflow-rounds", "0"], "synflow_rounds"),
        (["--method", "gmp", "--gmp-every", "0"], "gmp_every"),
    ):
        assert main(["prune", "--out", str(tmp_path / "x"), *argv]) == 2
        assert expect in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
