"""Per-row structures never switch off a class: under ``structure="filter"`` / ``"channel"`` the
layers that produce the model's output (found by tracing the forward, ``bip_fast.nn.output_layers``)
stay dense, as the authors keep the classifier dense in structured modes (SPEC §2), unless
``include=`` selects them; one UserWarning says so. ``"group"`` keeps the output channels by its
own trace; N:M keeps N of every M weights of each row, so it prunes the classifier without
removing a class."""
import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

import bip_fast
from bip_fast.models import build
from bip_fast.nn import finalize, masked_modules, output_layers, sparsify


def resnet20():
    return build("resnet20", num_classes=10)


def tv_resnet18():
    return torchvision.models.resnet18(num_classes=10)


ARCHS = {"resnet20": (resnet20, "linear"), "tv_resnet18": (tv_resnet18, "fc")}
HELD = "dense: it produces the model's output"


def held_warnings(record):
    return [w for w in record if issubclass(w.category, UserWarning) and HELD in str(w.message)]


def construct(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` and the warnings it raised."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn(*args, **kwargs)
    return out, record


def assert_every_class_alive(model, name):
    """Every output row of layer ``name`` keeps a non-zero weight, and its bias, in the plain model."""
    plain = finalize(copy.deepcopy(model)).get_submodule(name)
    assert bool((plain.weight != 0).any(dim=1).all()), f"{name}: an output row is all zero"
    assert plain.bias is not None and bool((plain.bias != 0).all()), f"{name}: a bias entry is zero"


def layer(model, name):
    return dict(masked_modules(model))[name]


# ----------------------------------------------------------------------------- the trace
class HeadFirst(nn.Module):
    """The classifier is registered first: registration order would name the wrong layer."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(8, 3)
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.extra = nn.Linear(8, 8)  # registered last, used first

    def forward(self, x):
        h = torch.relu(self.body(x)).mean(dim=(2, 3))
        return self.head(torch.relu(self.extra(h)))


class TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3)
        self.a = nn.Linear(8, 4)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        h = torch.flatten(nn.functional.adaptive_avg_pool2d(self.body(x), 1), 1)
        return {"a": self.a(h), "b": self.b(h).softmax(dim=1)}


class AllConv(nn.Module):
    """Class maps from a 1x1 conv, averaged: the conv's filters are the classes."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 5, 1)

    def forward(self, x):
        return torch.flatten(nn.functional.adaptive_avg_pool2d(self.c2(torch.relu(self.bn(self.c1(x)))), 1), 1)


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(4, 6)
        self.l2 = nn.Linear(6, 5)

    def forward(self, x):
        if x.sum() > 0:  # control flow on a tensor value: torch.fx cannot trace it
            x = -x
        return self.l2(torch.relu(self.l1(x)))


@pytest.mark.parametrize("make,want", [
    (resnet20, ["linear"]), (tv_resnet18, ["fc"]), (lambda: build("vgg16_bn"), ["classifier"]),
    (HeadFirst, ["head"]), (TwoHeads, ["a", "b"]), (AllConv, ["c2"]), (lambda: nn.Linear(3, 2), [""]),
])
def test_output_layers_are_traced(make, want):
    model = make()
    assert output_layers(model) == want
    assert output_layers(sparsify(model)) == want  # masked layers alike


def test_an_untraceable_model_is_named_and_pruned_with_a_warning():
    with pytest.raises(ValueError, match="torch.fx cannot trace Untraceable.forward"):
        output_layers(Untraceable())
    alg, record = construct(bip_fast.OMP, Untraceable(), 0.6, structure="filter")
    assert any("cannot find the layers that produce the model's output" in str(w.message) for w in record)
    assert alg.dense_outputs == [] and int(layer(alg.model, "l2").mask.any(dim=1).sum()) == 2


def test_head_first_toy_keeps_the_head_not_the_last_registered():
    alg, record = construct(bip_fast.OMP, HeadFirst(), 0.5, structure="filter")
    assert len(held_warnings(record)) == 1 and "'head'" in str(held_warnings(record)[0].message)
    assert bool(layer(alg.model, "head").mask.all())
    assert int(layer(alg.model, "extra").mask.any(dim=1).sum()) == 4  # the last registered is pruned


# ----------------------------------------------------------------------------- the algorithms
@pytest.mark.parametrize("structure", ["filter", "channel"])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_omp_structured_keeps_every_class(arch, structure):
    make, fc = ARCHS[arch]
    alg, record = construct(bip_fast.OMP, make(), 0.9, structure=structure)
    held = held_warnings(record)
    assert len(held) == 1 and f"keeping '{fc}' dense" in str(held[0].message)
    assert [alg.module_names[i] for i in alg.dense_outputs] == [fc]
    assert bool(layer(alg.model, fc).mask.all())  # dense: no class and no input feature removed
    assert_every_class_alive(alg.model, fc)
    others = [m for n, m in masked_modules(alg.model) if n != fc]
    assert sum(int(m.mask.sum()) for m in others) < 0.15 * sum(m.mask.numel() for m in others)


@pytest.mark.parametrize("structure", ["filter", "channel"])
def test_every_algorithm_with_a_row_structure_keeps_the_classifier(structure):
    torch.manual_seed(0)
    batch = (torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    bip, _ = construct(bip_fast.BiP, resnet20(), 0.9, structure=structure)
    bip.step(batch, batch)
    hydra, _ = construct(bip_fast.Hydra, resnet20(), 0.9, structure=structure, total_steps=2)
    hydra.step(batch)
    for alg in (bip, hydra):
        assert bool(alg.model.linear.mask.all()), type(alg).__name__
        assert_every_class_alive(alg.model, "linear")
    if structure == "filter":  # IMP-F, round after round
        imp, record = construct(bip_fast.IMP, resnet20(), structure="filter", sparsity=0.9)
        assert len(held_warnings(record)) == 1
        for _ in range(imp.target_rounds):
            imp.next_round()
        assert bool(imp.model.linear.mask.all())
        assert_every_class_alive(imp.model, "linear")


def test_include_selecting_the_classifier_prunes_it():
    names = ["conv1", "layer*", "linear"]  # every layer, the classifier by name
    alg, record = construct(bip_fast.OMP, resnet20(), 0.9, structure="filter", include=names)
    assert held_warnings(record) == [] and alg.dense_outputs == []
    assert int(alg.model.linear.mask.any(dim=1).sum()) == 1  # round(0.1 x 10) classes: what was asked
    alg, _ = construct(bip_fast.OMP, resnet20(), 0.9, structure="channel",
                       include=lambda name, m: True)
    assert int(alg.model.linear.mask.any(dim=0).sum()) == 6  # round(0.1 x 64) input features


def test_a_model_sparsified_beforehand():
    """The engine's path: the model is masked first, then handed to the algorithm with the same
    include/exclude (no 'ignored' warning); include alone still decides about the classifier."""
    alg, record = construct(bip_fast.OMP, sparsify(resnet20()), 0.9, structure="filter")
    assert len(held_warnings(record)) == 1 and bool(alg.model.linear.mask.all())
    model = sparsify(resnet20(), exclude="conv1")
    alg, record = construct(bip_fast.OMP, model, 0.9, structure="filter", exclude="conv1")
    assert not any("already holds masked layers" in str(w.message) for w in record)
    assert len(held_warnings(record)) == 1
    alg, record = construct(bip_fast.OMP, sparsify(resnet20()), 0.9, structure="filter", include="linear")
    assert any("already holds masked layers" in str(w.message) for w in record)  # masks every layer anyway
    assert held_warnings(record) == [] and int(alg.model.linear.mask.any(dim=1).sum()) == 1


@pytest.mark.parametrize("arch", list(ARCHS))
def test_group_structure_keeps_the_classes(arch):
    make, fc = ARCHS[arch]
    model = make()
    bip_fast.attach_groups(model, torch.randn(2, 3, 32, 32))
    alg, record = construct(bip_fast.OMP, model, 0.9, structure="group")
    assert held_warnings(record) == []  # the group trace keeps the output channels itself
    assert bool(layer(alg.model, fc).mask.any(dim=1).all())
    assert_every_class_alive(alg.model, fc)
    assert alg.sparsity() > 0.5


def test_nm_prunes_the_classifier_without_removing_a_class():
    alg, record = construct(bip_fast.OMP, resnet20(), 0.5, structure="nm", exclude="conv1")  # 27 inputs
    assert held_warnings(record) == []
    assert int(alg.model.linear.mask.sum()) == 320  # 2 of every 4 of 10 x 64
    assert_every_class_alive(alg.model, "linear")
