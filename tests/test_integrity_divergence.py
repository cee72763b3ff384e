"""The divergence guard: a non-finite batch applies no update, a diverged run stops and keeps its checkpoint."""
import json
import math

import pytest
import torch

from bip_fast.engine.loop import DivergedError, Trainer
from bip_fast.files import checkpoint as ckpt
from bip_fast.pruning import get_algorithm
from bip_fast.pruning.base import NonFiniteError

from _integrity_helpers import poison_second_batch
from test_loop import config, synthetic, tiny_model


# ----------------------------------------------------------------------------- 4. divergence
def test_nonfinite_batch_applies_no_update():
    torch.manual_seed(0)
    for name, kw in (("bip", {}), ("omp", {}), ("bip", {"variant": "official"})):
        alg = get_algorithm(name)(tiny_model(), 0.5, **kw)
        x = torch.randn(8, 3, 32, 32)
        y = torch.randint(0, 10, (8,))
        alg.step((x, y))
        model = {k: v.clone() for k, v in alg.model.state_dict().items()}
        state = alg.state_dict(include_model=False)
        bad = x.clone()
        bad[0, 0, 0, 0] = math.inf
        with pytest.raises(NonFiniteError, match="step 1: non-finite loss"):
            alg.step((bad, y))
        for k, v in alg.model.state_dict().items():  # weights, scores, masks, BN statistics
            assert torch.equal(v, model[k]), (name, k)
        for k, g in alg.param_groups.items():  # momenta
            for a, b in zip(g.buffers, state["optimizers"][k]["buffers"]):
                assert torch.equal(a, b), (name, k)
        assert alg.global_step == 1
        alg.step((x, y))  # training goes on from the untouched state


def test_divergence_stops_the_run_and_keeps_the_checkpoint(tmp_path):
    out = tmp_path / "run"

    def explode(trainer, record):  # after a good epoch 1, a learning rate that overflows
        for g in trainer.alg.param_groups.values():
            g.lr = 1e30

    tr = Trainer(config(out, command="pretrain", method="dense", epochs=3, lr=0.05), dataset=synthetic(),
                 model_fn=tiny_model, callbacks=[explode])
    good = None
    orig_save = tr._save

    def save(*a):
        nonlocal good
        orig_save(*a)
        good = (out / "checkpoint.pt").read_bytes()

    tr._save = save
    with pytest.raises(DivergedError, match=r"diverged: .*epoch 2 .*the last checkpoint .*epoch 1\) is kept"):
        tr.run()
    assert (out / "checkpoint.pt").read_bytes() == good and not (out / "model.pt").exists()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1
    json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"metrics.jsonl holds {c}"))
    state = ckpt.load(out / "checkpoint.pt")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_nonfinite_skips_are_bounded(tmp_path):
    def poisoned(limit):
        tr = Trainer(config(tmp_path / f"run{limit}", command="pretrain", method="dense", epochs=1, lr=0.05,
                            nonfinite_skips=limit), dataset=synthetic(), model_fn=tiny_model)
        return poison_second_batch(tr)

    rep = poisoned(1).run()
    rec = json.loads((tmp_path / "run1" / "metrics.jsonl").read_text().splitlines()[-1])
    assert rec["skipped_steps"] == 1 and math.isfinite(rec["train_loss"]) and rep["epochs"] == 1
    with pytest.raises(DivergedError, match="step 1: non-finite loss"):
        poisoned(0).run()
    resumed = Trainer(config(tmp_path / "run1", resume=True, nonfinite_skips=3), dataset=synthetic(),
                      model_fn=tiny_model)
    assert resumed.cfg.train.nonfinite_skips == 3
