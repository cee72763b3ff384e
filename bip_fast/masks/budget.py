"""A MACs or parameter budget for the group structure: one global ranking of channels by score per cost.

``structure="group"`` with ``macs=f`` (or ``params=f``) keeps the channels of all coupled groups
together, not the same fraction of each: the model keeps at most the fraction ``f`` of the dense
model's multiply-accumulates (or parameters) and, within that, the channels that carry the most
score per unit of cost. :func:`bip_fast.masks.groups.project_groups` computes each channel's
*value* (its score mass: Σ s² over the entries of all its member slices, or Σ |s| with
``filter_norm="l1"``) and calls :func:`select` here.

Costs (:func:`measure_costs`, once, when :func:`bip_fast.attach_groups` traces the model on its
example input): every conv / linear layer's weight shape, bias, and its output positions (output
elements per output channel, batch included) in one eval-mode forward, counted as
:func:`bip_fast.compaction.count_macs` counts them (transposed convolutions: no MACs); every
BatchNorm's affine parameters per channel. A layer's MACs are ``positions · n0 · n1 · kernel`` and
its weight's parameters ``n0 · n1 · kernel`` (n0, n1: the sizes it keeps along weight dims 0 and 1),
plus ``n_out`` bias and ``2 · n`` BatchNorm parameters. Each size is a constant plus the kept
channels of the groups that cover that dimension (a linear layer after a flatten: H·W features
a channel), so for a kept-channel vector x ∈ {0, 1}^N over all budget groups

    cost(x) = K + Σ_rows w · (c0 + A0·x) · (c1 + A1·x),

exact in integers (K: the cost of everything no group touches). Not additive: a conv's MACs are
∝ C_in · C_out, so a channel costs less once the neighbouring group is thinner.

Selection (:func:`select`; ``T = 3`` passes, all on the scores' device, no host sync):

1. Forced channels: every layer that produces channels of a group (an ``"out"`` member) keeps its
   best channel (highest value, ties to the lower index; only channels still alive under
   ``within``), so no layer loses all its outputs and every group keeps a channel.
2. Operating point: the largest uniform kept fraction ρ (of a 33-point grid) whose cost fits.
3. Each pass ranks the channels by value / marginal cost at the operating point (marginal cost
   of channel c: Σ_rows w · (A0[c] · n1 + A1[c] · n0 + A0[c] · A1[c])), forced channels first,
   ties to the lower global channel index (groups in trace order, then channel index), and keeps
   the longest prefix of that ranking whose exact cost (every prefix at once: cumulative sums of
   A0, A1 in ranking order) is within the budget. Its selection is the next operating point.
4. Of the T selections, the one keeping the most value (ties: the earlier) is the mask.

Guarantee: the exact cost never exceeds ``floor(fraction · dense)``, unless the forced channels
alone do (the budget is below the smallest connected model: they are kept, and a UserWarning says
so once per budget); and the next channel of the ranking would exceed it, so the cost falls short
of the budget by less than that one channel's marginal cost. The same scores give the same mask.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..nn.convert import BUDGET_ATTR
from .group_trace import ChannelGroups, hooked_pass

COSTS_ATTR = "_bip_fast_layer_costs"
BUDGET_KINDS = ("macs", "params")
PASSES = 3  # ranking passes (step 3 of the module docstring)
_GRID = 33  # uniform operating points tried for the first pass

__all__ = ["Budget", "BUDGET_KINDS", "check_budget", "LayerCost", "ModelCosts", "measure_costs", "costs_of",
           "select", "selection_cost"]


@dataclass(frozen=True)
class Budget:
    """Keep at most ``fraction`` (in (0, 1]) of the dense model's ``kind`` ("macs" or "params")."""

    kind: str
    fraction: float

    def __str__(self) -> str:
        return f"{self.kind}={self.fraction:g}"


def check_budget(macs=None, params=None, structure: Optional[str] = "group") -> Optional[Budget]:
    """The :class:`Budget` of ``macs=`` / ``params=`` (None when neither is given), validated: one
    of them, a number in (0, 1], and ``structure="group"`` (only whole channels change MACs)."""
    given = [(k, v) for k, v in (("macs", macs), ("params", params)) if v is not None]
    if not given:
        return None
    if len(given) > 1:
        raise ValueError(f"macs, params: give one budget, got macs={macs!r} and params={params!r}")
    kind, value = given[0]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{kind}: expected a float (the kept fraction of the dense model's {kind}), got "
                        f"{type(value).__name__}")
    if not (math.isfinite(value) and 0.0 < value <= 1.0):
        raise ValueError(f"{kind}: expected the kept fraction of the dense model's {kind}, in (0, 1], got {value!r}")
    if structure != "group":
        raise ValueError(f"{kind}: a {kind} budget chooses whole channels; it needs structure='group' "
                         f"(and bip_fast.attach_groups), got structure={structure!r}")
    return Budget(kind, float(value))


# ----------------------------------------------------------------------------- costs
@dataclass(frozen=True)
class LayerCost:
    """One conv / linear layer: weight shape, dimension of its outputs in the weight, bias, and
    output positions over the example input's forward (0: not called, or transposed)."""

    shape: Tuple[int, ...]
    out_dim: int
    bias: bool
    positions: int


@dataclass
class ModelCosts:
    """What :func:`measure_costs` records: per layer :class:`LayerCost`, per BatchNorm
    ``(num_features, affine parameters per channel)``, and the dense totals."""

    layers: Dict[str, LayerCost]
    norms: Dict[str, Tuple[int, int]]
    macs: int
    params: int
    _tables: Dict[object, "_Tables"] = field(default_factory=dict, repr=False, compare=False)
    _warned: set = field(default_factory=set, repr=False, compare=False)

    def __getstate__(self):  # the device tables are rebuilt
        return {"layers": self.layers, "norms": self.norms, "macs": self.macs, "params": self.params}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._tables, self._warned = {}, set()

    def __deepcopy__(self, memo):
        return ModelCosts(dict(self.layers), dict(self.norms), self.macs, self.params)

    def total(self, kind: str) -> int:
        return self.macs if kind == "macs" else self.params


@torch.no_grad()
def measure_costs(plain: nn.Module, example_inputs) -> ModelCosts:
    """The costs of a plain model (:func:`~bip_fast.masks.group_trace.plain_copy`) on
    ``example_inputs``: one eval-mode forward with counting hooks (removed after it)."""
    names = {m: n for n, m in plain.named_modules()}
    positions: Dict[str, int] = {}

    def count(mod, inputs, out):
        per = mod.out_features if isinstance(mod, nn.Linear) else mod.out_channels
        positions[names[mod]] = positions.get(names[mod], 0) + out.numel() // per

    layer_types = (nn.Linear, nn.modules.conv._ConvNd)
    hooked_pass(plain, example_inputs,  # a counting pass, on a copy
                [m.register_forward_hook(count) for m in plain.modules()
                 if isinstance(m, layer_types) and not getattr(m, "transposed", False)])
    layers = {n: LayerCost(tuple(m.weight.shape), 1 if getattr(m, "transposed", False) else 0, m.bias is not None,
                           positions.get(n, 0))
              for n, m in plain.named_modules() if isinstance(m, layer_types)}
    norms = {n: (m.num_features, sum(p.numel() for p in m.parameters(recurse=False)) // max(m.num_features, 1))
             for n, m in plain.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    macs = sum(c.positions * math.prod(c.shape) for c in layers.values())
    return ModelCosts(layers, norms, macs, sum(p.numel() for p in plain.parameters()))


def costs_of(model: nn.Module) -> ModelCosts:
    costs = getattr(model, COSTS_ATTR, None)
    if costs is None:
        raise ValueError("macs / params: a budget needs the layer costs that bip_fast.attach_groups(model, "
                         "example_inputs) measures; call it again on this model")
    return costs


@dataclass
class _Tables:
    """The cost of a selection as tensors (see the module docstring), for one set of groups."""

    a0: torch.Tensor  # (R, N) int64: channels covering weight dim 0 of each row
    a1: torch.Tensor  # (R, N) int64
    c0: torch.Tensor  # (R,) int64: the rest of dim 0 (not in a budget group)
    c1: torch.Tensor
    w: torch.Tensor  # (R,) int64: cost per kept (dim 0 x dim 1) pair
    k: int  # cost of everything else
    both: torch.Tensor  # (N,) float64: Σ_rows w · A0[c] · A1[c]
    producers: torch.Tensor  # (P, L) int64 global channels of each producing layer, padded with N
    dense: int


def _tables(groups: ChannelGroups, costs: ModelCosts, active: Sequence[int], kind: str, device) -> _Tables:
    key = (str(device), kind, tuple(active))
    if key in costs._tables:
        return costs._tables[key]
    offsets, n = {}, 0
    for gi in active:
        offsets[gi] = n
        n += groups.groups[gi].channels
    rows: Dict[Tuple[str, str], list] = {}  # (layer, part) -> [size0, size1, w, entries0, entries1]
    producers: List[List[int]] = []

    def row(key, size0, size1, w):
        return rows.setdefault(key, [size0, size1, w, [], []])

    for gi in active:
        for m in groups.groups[gi].members:
            glob = (m.channel + offsets[gi]).tolist()
            pairs = list(zip(m.index.tolist(), glob))
            if m.kind in ("out", "in"):
                c = costs.layers[m.name]
                kernel = math.prod(c.shape[2:])
                r = row((m.name, "weight"), c.shape[0], c.shape[1] if len(c.shape) > 1 else 1,
                        c.positions * kernel if kind == "macs" else kernel)
                r[3 if m.dim == 0 else 4].extend(pairs)
                if m.kind == "out":
                    producers.append(sorted(set(glob)))
                    if c.bias and kind == "params":
                        row((m.name, "bias"), c.shape[c.out_dim], 1, 1)[3].extend(pairs)
            elif m.kind == "norm" and kind == "params" and m.name in costs.norms:
                size, per = costs.norms[m.name]
                row((m.name, "norm"), size, 1, per)[3].extend(pairs)
    rows_l = [r for r in rows.values() if r[2] > 0]
    R = len(rows_l)
    a = torch.zeros(2, R, n, dtype=torch.int64)
    for i, r in enumerate(rows_l):
        for d in (0, 1):
            if r[3 + d]:
                cols = torch.tensor([g for _, g in r[3 + d]], dtype=torch.int64)
                a[d, i].index_add_(0, cols, torch.ones_like(cols))
    size = torch.tensor([[r[0], r[1]] for r in rows_l], dtype=torch.int64).view(R, 2)
    w = torch.tensor([r[2] for r in rows_l], dtype=torch.int64)
    c0, c1 = size[:, 0] - a[0].sum(1), size[:, 1] - a[1].sum(1)
    dense = costs.total(kind)
    width = max((len(p) for p in producers), default=1)
    prod = torch.full((max(len(producers), 1), width), n, dtype=torch.int64)
    for i, p in enumerate(producers):
        prod[i, :len(p)] = torch.tensor(p, dtype=torch.int64)
    t = _Tables(a[0].to(device), a[1].to(device), c0.to(device), c1.to(device), w.to(device),
                dense - int((w * size[:, 0] * size[:, 1]).sum()),
                (a[0] * a[1]).to(torch.float64).T.mv(w.to(torch.float64)).to(device), prod.to(device), dense)
    costs._tables[key] = t
    return t


def _cost(t: _Tables, x: torch.Tensor) -> torch.Tensor:
    """Exact cost (int64, 0-dim) of the kept-channel vector ``x`` (bool, N)."""
    xi = x.to(torch.int64)  # integer products summed (no int64 matmul on CUDA)
    return t.k + (t.w * (t.c0 + (t.a0 * xi).sum(1)) * (t.c1 + (t.a1 * xi).sum(1))).sum()


def selection_cost(groups: ChannelGroups, costs: ModelCosts, active: Sequence[int], keep: torch.Tensor,
                   kind: str) -> torch.Tensor:
    """The exact ``kind`` cost of the kept channels ``keep`` (bool, over the ``active`` groups)."""
    return _cost(_tables(groups, costs, active, kind, keep.device), keep)


@torch.no_grad()
def select(groups: ChannelGroups, costs: ModelCosts, active: Sequence[int], value: torch.Tensor,
           alive: Optional[torch.Tensor], budget: Budget) -> Tuple[torch.Tensor, torch.Tensor]:
    """(kept channels, their exact cost): bool (N,) over the channels of the ``active`` groups (in
    that order) and an int64 0-dim tensor; ``value`` (N,): each channel's score mass; ``alive``:
    the channels that may be kept (None: all). See the module docstring for the rule."""
    dev = value.device
    t = _tables(groups, costs, active, budget.kind, dev)
    limit = int(math.floor(budget.fraction * t.dense))
    n = value.numel()
    v = value.to(torch.float64)
    ok = torch.ones(n, dtype=torch.bool, device=dev) if alive is None else alive
    okf = ok.to(torch.float64)
    neg = torch.tensor(-math.inf, dtype=torch.float64, device=dev)
    # 1. every producing layer's best live channel (rows of producers are sorted: first max = lowest index)
    pv = torch.cat([torch.where(ok, v, neg), neg.view(1)])[t.producers]
    best = t.producers.gather(1, pv.argmax(1, keepdim=True)).squeeze(1)
    forced = torch.zeros(n + 1, dtype=torch.bool, device=dev)
    forced[torch.where(pv.amax(1) > neg, best, n)] = True
    forced = forced[:n]
    lo = forced.sum()
    a0f, a1f, wf = t.a0.to(torch.float64), t.a1.to(torch.float64), t.w.to(torch.float64)
    c0f, c1f = t.c0.to(torch.float64), t.c1.to(torch.float64)
    # 2. the largest uniform fraction of the live channels that fits: the first operating point
    grid = torch.linspace(0.0, 1.0, _GRID, dtype=torch.float64, device=dev).view(-1, 1)
    uni = t.k + (wf * (c0f + grid * a0f.mv(okf)) * (c1f + grid * a1f.mv(okf))).sum(1)
    x = okf * grid[((uni <= limit).sum() - 1).clamp_min(0)]
    steps = torch.arange(1, n + 1, device=dev)
    inf = torch.tensor(math.inf, dtype=torch.float64, device=dev)
    keeps, values, spent = [], [], []
    for _ in range(PASSES):  # 3. rank by value per marginal cost, keep the longest prefix that fits
        n0, n1 = c0f + a0f.mv(x), c1f + a1f.mv(x)
        marginal = a0f.T.mv(wf * n1) + a1f.T.mv(wf * n0) + t.both
        ratio = v / marginal.clamp_min(1e-300)
        order = torch.sort(torch.where(forced, inf, torch.where(ok, ratio, neg)), descending=True, stable=True)[1]
        prefix = t.k + (t.w.view(-1, 1) * (t.c0.view(-1, 1) + t.a0[:, order].cumsum(1))
                        * (t.c1.view(-1, 1) + t.a1[:, order].cumsum(1))).sum(0)
        k = ((prefix <= limit) & (steps <= ok.sum())).sum().clamp_min(lo)
        rank = torch.empty_like(order)
        rank[order] = torch.arange(n, device=dev)
        keep = rank < k
        keeps.append(keep)
        values.append((v * keep).sum())
        spent.append(prefix[(k - 1).clamp_min(0)])
        x = keep.to(torch.float64)
    j = torch.stack(values).argmax()  # 4. the pass keeping the most value (first on ties)
    keep, cost = torch.stack(keeps)[j], torch.stack(spent)[j]
    if budget not in costs._warned:  # one host read per budget
        costs._warned.add(budget)
        if int(cost) > limit:
            warnings.warn(f"{budget.kind}={budget.fraction:g}: the budget is below the smallest connected model "
                          f"(one channel for every layer producing a group's channels: "
                          f"{int(cost) / t.dense:.4g} of the dense {budget.kind}); keeping that",
                          UserWarning, stacklevel=5)
    return keep, cost


def record(model: nn.Module, groups: ChannelGroups, costs: ModelCosts, active: Sequence[int], keep: torch.Tensor,
           budget: Budget, cost: torch.Tensor) -> None:
    """Note the budget and where the selection landed (fractions of the dense MACs and parameters,
    0-dim tensors: no host read) on ``model``, for :func:`bip_fast.sparsity_report`."""
    landed = {budget.kind: cost.to(torch.float64) / costs.total(budget.kind)}
    for other in BUDGET_KINDS:
        if other != budget.kind:
            landed[other] = selection_cost(groups, costs, active, keep, other).to(torch.float64) / costs.total(other)
    setattr(model, BUDGET_ATTR, {"kind": budget.kind, "target": budget.fraction, **landed})  # through a proxy too
