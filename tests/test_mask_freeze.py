"""BiP(mask_freeze=f): the last fraction f of the schedule keeps the mask and the scores fixed and
trains the weights only; bad values are refused; a checkpoint reloads into the same phase."""

import pytest
import torch

from bip_fast.pruning import BiP

from _pruning_helpers import conv_net, img_batches


def _snap(alg):
    return ([m.mask.clone() for m in alg.modules], [m.scores.detach().clone() for m in alg.modules],
            [m.weight.detach().clone() for m in alg.modules])


@pytest.mark.parametrize("structure", ["global", "filter"])
def test_mask_and_scores_fixed_for_the_last_fraction(structure):
    T, f = 10, 0.3  # steps 7, 8, 9 keep the mask
    alg = BiP(conv_net(), 0.5, structure=structure, total_steps=T, mask_freeze=f, score_lr=50.0,
              exclude=["8"] if structure == "filter" else None)
    data = img_batches(0, 2 * T)
    moved = False
    for t in range(T):
        assert alg.mask_frozen() == (t >= 7)
        before = _snap(alg)
        out = alg.step(data[2 * t], data[2 * t + 1])
        assert torch.isfinite(out["loss"])
        after = _snap(alg)
        if t < 7:
            moved |= any(not torch.equal(a, b) for a, b in zip(before[1], after[1]))
        else:
            assert all(torch.equal(a, b) for a, b in zip(before[0], after[0])), "mask moved while frozen"
            assert all(torch.equal(a, b) for a, b in zip(before[1], after[1])), "scores moved while frozen"
            assert any(not torch.equal(a, b) for a, b in zip(before[2], after[2])), "weights did not train"
            assert "upper_loss" not in out  # one forward/backward: the lower batch only
    assert moved, "scores never moved before the freeze"
    assert abs(alg.sparsity() - 0.5) < 0.2


def test_reload_before_the_freeze_trains_the_scores_again():
    T = 6
    data = img_batches(1, 2 * T)
    alg = BiP(conv_net(), 0.5, total_steps=T, mask_freeze=0.5, score_lr=10.0)
    for t in range(2):
        alg.step(data[2 * t], data[2 * t + 1])
    sd = alg.state_dict()
    for t in range(2, T):
        alg.step(data[2 * t], data[2 * t + 1])
    assert not any(s.requires_grad for s in alg._scores())
    alg.load_state_dict(sd)  # step 2: before the freeze (step 3 on)
    before = [m.scores.detach().clone() for m in alg.modules]
    alg.step(data[4], data[5])
    assert any(not torch.equal(a, m.scores.detach()) for a, m in zip(before, alg.modules))


def test_checkpoint_of_another_freeze_is_refused():
    a = BiP(conv_net(), 0.5, total_steps=10, mask_freeze=0.2, score_lr=1.0)
    b = BiP(conv_net(), 0.5, total_steps=10, mask_freeze=0.5, score_lr=1.0)
    with pytest.raises(ValueError, match="mask_freeze"):
        b.load_state_dict(a.state_dict())
    legacy = BiP(conv_net(), 0.5, total_steps=10, score_lr=1.0).state_dict()
    legacy.pop("mask_freeze")  # a checkpoint made before mask_freeze existed reloads as 0.0
    BiP(conv_net(), 0.5, total_steps=10, score_lr=1.0).load_state_dict(legacy)


@pytest.mark.parametrize("kw, match", [
    (dict(mask_freeze=1.0, total_steps=10), "mask_freeze"),
    (dict(mask_freeze=-0.1, total_steps=10), "mask_freeze"),
    (dict(mask_freeze=0.5), "total_steps"),
    (dict(mask_freeze=0.5, total_steps=10, variant="official"), "variant"),
])
def test_bad_mask_freeze_is_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        BiP(conv_net(), 0.5, **kw)


def test_cli_flag_reaches_bip():
    """--mask-freeze: a CLI flag of prune, passed by the engine to BiP."""
    import warnings

    from bip_fast.engine import plan_segments
    from bip_fast.engine.plan import describe_plan
    from bip_fast.engine.setup import build_algorithm
    from bip_fast.models import build
    from test_loop import config

    cfg = config("x", method="bip", pretrained="p", epochs=2, mask_freeze=0.25, score_lr=1.0).resolved()
    segs = plan_segments(cfg)
    assert "mask fixed for the last 0.25 of it (weights only)" in describe_plan(cfg, segs, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        alg = build_algorithm(segs[-1], cfg, build("resnet20"), 4, lambda mod: mod)
    assert alg.mask_freeze == 0.25 and alg.total_steps == 8
    alg.step_count = 6
    assert alg.mask_frozen()
    alg.step_count = 5
    assert not alg.mask_frozen()


@pytest.mark.parametrize("kw, match", [(dict(method="bip", mask_freeze=1.0), r"\[0, 1\)"),
                                       (dict(method="omp", mask_freeze=0.5), "--method bip"),
                                       (dict(method="bip", variant="official", mask_freeze=0.5), "--variant paper")])
def test_cli_refuses_a_bad_mask_freeze_before_running(kw, match):
    from test_loop import config

    with pytest.raises(ValueError, match=match):
        config("x", **kw).resolved()
