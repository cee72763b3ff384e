"""Layer collapse (a mask that keeps no weight of some layer) is reported: ``sparsity_report``'s
``empty_layers``, and in a run a warning, the epoch's metrics record and results.json."""
import json
import warnings

import pytest
import torch

import bip_fast
from bip_fast.engine import Trainer
from bip_fast.engine.evaluation import mask_state
from bip_fast.nn import masked_modules
from test_loop import config, synthetic, tiny_model


def test_report_and_mask_state_name_empty_layers():
    model = bip_fast.sparsify(tiny_model())
    mods = dict(masked_modules(model))
    assert bip_fast.sparsity_report(model)["empty_layers"] == []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning while every layer keeps a weight
        assert mask_state(model) == {"density": 1.0}
    mods["3"].set_mask(torch.zeros_like(mods["3"].mask))
    assert bip_fast.sparsity_report(model)["empty_layers"] == ["3"]
    with pytest.warns(UserWarning, match=r"layer collapse: the masks keep no weight of 3 "):
        state = mask_state(model)
    assert state["empty_layers"] == ["3"] and 0.0 < state["density"] < 1.0


def test_run_records_an_emptied_layer(tmp_path):
    def empty_first_conv(trainer, record):
        if record["epoch"] == 2:  # the first retraining epoch of OMP: its mask is fixed from here on
            m = dict(masked_modules(trainer.model))["0"]
            m.set_mask(torch.zeros_like(m.mask))

    cfg = config(tmp_path / "run", method="omp", sparsity=0.5, pretrain_epochs=1, epochs=2)
    with pytest.warns(UserWarning, match="layer collapse"):
        rep = Trainer(cfg, dataset=synthetic(), model_fn=tiny_model, callbacks=[empty_first_conv]).run()
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("empty_layers") for r in recs] == [None, None, ["0"]]
    assert rep["empty_layers"] == ["0"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["empty_layers"] == ["0"]


@pytest.mark.parametrize("zero_after, first", [(2, "the masks keep"), (3, "at mask update 8 ")])
def test_a_collapse_in_a_run_is_warned_of_once(tmp_path, zero_after, first):
    """The algorithm's watch and the engine's per-epoch mask_state share the set of layers warned
    of, so one collapse gives one warning, whichever sees it first. 96 images in batches of 32: 3
    BiP steps (mask changes) per epoch after the constructor's, so the watch checks at changes 2, 4
    and 8 (the third BiP epoch's first step). Emptied after epoch 2, the engine sees it first (end of
    epoch 3) and the watch's check at change 8 stays quiet; emptied after epoch 3, the watch sees it
    first and the engine's check at the end of epoch 4 stays quiet."""
    def zero_first_conv_scores(trainer, record):
        if record["epoch"] == zero_after:  # ranked below every other layer's from the next projection
            with torch.no_grad():
                dict(masked_modules(trainer.model))["0"].scores.fill_(0.0)

    cfg = config(tmp_path / "run", method="bip", sparsity=0.5, pretrain_epochs=1, epochs=3, score_lr=1e-6)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, dataset=synthetic(), model_fn=tiny_model, callbacks=[zero_first_conv_scores])
        trainer.run()
    collapse = [str(w.message) for w in got if "layer collapse" in str(w.message)]
    assert len(collapse) == 1 and first in collapse[0], collapse
    assert trainer.alg.collapse.changes == 10 and trainer.alg.collapse.warned == {"0"}
    assert trainer.alg.empty_layers == ["0"]  # the watch's check at change 8 found it either way
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("empty_layers") for r in recs] == [None] * zero_after + [["0"]] * (4 - zero_after)


def test_layer_collapse_benchmark_quick(tmp_path):
    """benchmarks/layer_collapse.py --quick: every (target, config) measured, masks of the right size."""
    from _script_helpers import load_script
    from test_speedup_smoke import _data_dir_or_skip
    data_dir = _data_dir_or_skip()
    tuned = tmp_path / "speedup.json"
    tuned.write_text(json.dumps({"tuning": {"bip_alternating": {"chosen": {"lr": 0.1, "score_lr": "scaled"}}}}))
    bench = load_script("layer_collapse")
    out = tmp_path / "out"
    argv = ["--quick", "--data-dir", data_dir, "--out", str(out), "--cache-dir", str(tmp_path / "cache"),
            "--rounds", "9,18", "--steps", "2", "--tuned-from", str(tuned)]
    assert bench.main(argv) == 0
    doc = json.loads((out / "layer_collapse.json").read_text())
    assert {(r["round"], r["config"]) for r in doc["runs"]} == {(9, c) for c in bench.configs({})} | {
        (18, c) for c in bench.configs({})}
    for r in doc["runs"]:
        assert [s["step"] for s in r["steps"]] == [0, 1, 2]
        n = sum(L["numel"] for L in r["gradient"])
        for s in r["steps"]:  # global top-K: exactly K weights kept at every step
            assert sum(s["kept"].values()) == round((1 - r["target_sparsity"]) * n)
            assert s["empty_layers"] == [k for k, v in s["kept"].items() if v == 0]
    with pytest.raises(SystemExit):
        bench.main(argv[:-1] + [str(tmp_path / "absent.json")])
    with pytest.raises(SystemExit):
        bench.main(argv + ["--configs", "chosen,nonsense"])
    assert bench.main(argv + ["--configs", "score_lr_0.1", "--rounds", "18"]) == 0
    doc = json.loads((out / "layer_collapse.json").read_text())
    assert [(r["round"], r["config"], r["hparams"]["score_lr"]) for r in doc["runs"]] == [(18, "score_lr_0.1", 0.1)]


def test_bip_warns_of_a_large_score_lr_at_extreme_global_sparsity():
    with pytest.warns(UserWarning, match="Layer collapse"):
        bip_fast.BiP(tiny_model(), 0.98, score_lr=11.2, total_steps=349)
    for kw in ({"sparsity": 0.98, "score_lr": 0.1}, {"sparsity": 0.9, "score_lr": 11.2},
               {"sparsity": 0.98, "score_lr": 11.2, "structure": "layer"}):
        with warnings.catch_warnings(record=True) as got:
            warnings.simplefilter("always")
            s = kw.pop("sparsity")
            bip_fast.BiP(tiny_model(), s, total_steps=349, **kw)
        # (the tiny model's magnitude masks at 98% may empty a layer: that warning is the watch's)
        assert not [w for w in got if "score_lr" in str(w.message)], [str(w.message) for w in got]


def _batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_algorithm_names_and_warns_of_a_layer_its_projection_empties():
    """A Python-API user hears of collapse without calling sparsity_report: the first projection that
    empties a layer is checked (the 1st mask change), warned of once, and kept in empty_layers."""
    model = bip_fast.sparsify(tiny_model())
    pruner = bip_fast.BiP(model, 0.5, total_steps=20, score_lr=1e-6)
    assert pruner.empty_layers == []
    with torch.no_grad():  # the first conv's scores (ranked by magnitude) far below every other layer's
        dict(masked_modules(model))["0"].scores.fill_(0.0)
    with pytest.warns(UserWarning, match=r"at mask update 2 \(after 0 completed steps\) the masks keep no weight "
                                         r"of 0 \(1 of 3"):
        pruner.step(_batch(), _batch(seed=1))
    assert pruner.empty_layers == ["0"] == bip_fast.sparsity_report(model)["empty_layers"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same layer again: no second warning
        pruner.step(_batch(seed=2), _batch(seed=3))
    assert pruner.empty_layers == ["0"]


def test_collapse_checks_follow_the_schedule_and_stay_quiet_without_collapse():
    from bip_fast.pruning._collapse import EVERY, CollapseWatch
    model = bip_fast.sparsify(tiny_model())
    pruner = bip_fast.BiP(model, 0.5, total_steps=40, score_lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(9):
            pruner.step(_batch(seed=i), _batch(seed=100 + i))
    # the constructor's first projection and 9 steps: 10 changes, checked at 1, 2, 4 and 8
    assert (pruner.collapse.changes, pruner.collapse.checks) == (10, 4)
    assert pruner.empty_layers == []
    watch, due = CollapseWatch(), []
    for n in range(1, 3 * EVERY + 1):
        watch.changes = n
        if watch.due():
            due.append(n)
    assert due == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768]
