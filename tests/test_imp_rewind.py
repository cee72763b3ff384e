"""IMP from a pretrained run (SPEC §5): pretrain keeps the weights of the start of --rewind-epoch in
rewind.pt; prune --method imp --pretrained prunes the converged weights and rewinds to those; a
model without them is refused unless --rewind-to-pretrained asks for the pretrained weights."""
import shutil

import pytest
import torch

from bip_fast.engine import Trainer
from bip_fast.engine.rundir import REWIND
from bip_fast.files import checkpoint as ckpt

from _pruning_helpers import global_topk
from test_loop import Kill, assert_same, config, killer, synthetic, tiny_model


def _pretrain(out, ds, epochs=3, **kw):
    states = {}

    def keep(trainer, record):  # the state at the end of each epoch = the start of the next one
        states[record["epoch"]] = {k: v.clone() for k, v in trainer.model.state_dict().items()}

    Trainer(config(out, command="pretrain", method="dense", epochs=epochs, **kw), dataset=ds,
            model_fn=tiny_model, callbacks=[keep]).run()
    return states


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    ds = synthetic()
    out = tmp_path_factory.mktemp("imp") / "dense"
    states = _pretrain(out, ds, rewind_epoch=2)
    return out, ds, states


def test_pretrain_keeps_the_rewind_weights(dense):
    out, _, states = dense
    rew = ckpt.load(out / REWIND)
    assert rew["format"] == "bip_fast.rewind/1" and rew["epoch"] == 2 and rew["step"] == 2 * 3
    assert_same(rew["model"], states[2], "rewind")
    assert not torch.equal(rew["model"]["0.weight"], torch.load(out / "model.pt")["0.weight"])


def test_imp_from_pretrained_prunes_converged_and_rewinds_early(dense, tmp_path):
    out, ds, _ = dense
    tr = Trainer(config(tmp_path / "imp", method="imp", sparsity=0.2, epochs=1, pretrained=str(out)), dataset=ds,
                 model_fn=tiny_model)
    tr.run()
    assert tr.cfg.prune.rewind_epoch == 2  # recorded from rewind.pt
    rewind = ckpt.load(tmp_path / "imp" / "checkpoint.pt")["algorithm"]["rewind"]
    assert_same(rewind, ckpt.load(out / REWIND)["model"], "rewind")
    # round 1's mask: the global magnitude top 80% of the converged (model.pt) weights
    final = torch.load(out / "model.pt")
    names = [k[:-len(".mask")] for k in tr.model.state_dict() if k.endswith(".mask")]
    want = global_topk([final[n + ".weight"] for n in names], int(0.8 * sum(final[n + ".weight"].numel()
                                                                             for n in names) + 0.5))
    for n, w in zip(names, want):
        assert torch.equal(tr.model.state_dict()[n + ".mask"], w), n


def test_rewind_epoch_must_match_the_file(dense, tmp_path):
    out, ds, _ = dense
    with pytest.raises(ValueError, match=r"rewind_epoch: .*start of epoch 2, got --rewind-epoch 1"):
        Trainer(config(tmp_path / "a", method="imp", sparsity=0.2, epochs=1, pretrained=str(out), rewind_epoch=1),
                dataset=ds, model_fn=tiny_model).run()
    assert not (tmp_path / "a" / "checkpoint.pt").exists()
    Trainer(config(tmp_path / "b", method="imp", sparsity=0.2, epochs=1, pretrained=str(out), rewind_epoch=2),
            dataset=ds, model_fn=tiny_model).run()


def test_bare_model_is_refused_unless_asked(dense, tmp_path):
    out, ds, _ = dense
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(out / "model.pt", bare / "model.pt")
    with pytest.raises(ValueError, match=r"holds no rewind.pt.*--rewind-to-pretrained"):
        Trainer(config(tmp_path / "a", method="imp", sparsity=0.2, epochs=1, pretrained=str(bare / "model.pt")),
                dataset=ds, model_fn=tiny_model).run()
    tr = Trainer(config(tmp_path / "b", method="imp", sparsity=0.2, epochs=1, pretrained=str(bare),
                        rewind_to_pretrained=True), dataset=ds, model_fn=tiny_model)
    tr.run()
    rewind = ckpt.load(tmp_path / "b" / "checkpoint.pt")["algorithm"]["rewind"]
    assert_same(rewind, torch.load(bare / "model.pt"), "rewind")


@pytest.mark.parametrize("kw,match", [
    (dict(method="imp", rewind_to_pretrained=True), "rewind_to_pretrained: only prune --method imp --pretrained"),
    (dict(method="omp", pretrained="p", rewind_to_pretrained=True), "rewind_to_pretrained"),
    (dict(method="imp", pretrained="p", rewind_to_pretrained=True, rewind_epoch=3), "rewind_epoch: --rewind-to"),
    (dict(command="pretrain", method="dense", epochs=4, rewind_epoch=4), "rewind_epoch: pretrain keeps"),
])
def test_flag_conflicts(kw, match):
    with pytest.raises(ValueError, match=match):
        config("x", **kw).resolved()


def test_rewind_defaults():
    assert config("x", command="pretrain", method="dense").resolved().prune.rewind_epoch == 3
    assert config("x", command="pretrain", method="dense", epochs=2).resolved().prune.rewind_epoch is None
    assert config("x", method="imp").resolved().prune.rewind_epoch == 3
    imp_pre = config("x", method="imp", pretrained="p").resolved()
    assert imp_pre.prune.rewind_epoch is None and imp_pre.resolved().prune.rewind_epoch is None


def test_resume_at_the_rewind_epoch_writes_the_same_file(dense, tmp_path):
    out, ds, _ = dense
    with pytest.raises(Kill):  # killed after epoch 2's checkpoint, before epoch 3 begins
        Trainer(config(tmp_path / "b", command="pretrain", method="dense", epochs=3, rewind_epoch=2), dataset=ds,
                model_fn=tiny_model, callbacks=[killer(2)]).run()
    assert not (tmp_path / "b" / REWIND).exists()
    Trainer(config(tmp_path / "b", resume=True), dataset=ds, model_fn=tiny_model).run()
    assert_same(ckpt.load(tmp_path / "b" / REWIND)["model"], ckpt.load(out / REWIND)["model"], "rewind")
