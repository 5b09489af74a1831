"""The combination tester's engine: the model and its iterates, a float64 reference, error bounds, pairwise cases.

Nothing here imports polyak: the reference is written from the published formulas only (see
``test_combinations.py`` for what each front end promises), so it keeps its meaning whatever the library's
internals become.
"""

from __future__ import annotations

import copy
import math
import random
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn

CALLS = 24  # update() calls per case
SIGNAL_RATES = (2**-11, 2**-9, 2**-7, 2**-5)  # per step; a bf16 spacing in [1, 2) is 2**-7
SIGNAL_WIDTH = 128  # elements per rate, offset by fractions of a bf16 spacing: a row's mean shows a biased rounding
POISON_AT = (4, 0)  # the element of lin.weight made inf or NaN (rank 1's shard under FSDP2 on 2 ranks)
SPEED = {"lin.weight": 0.01, "lin.bias": -0.01, "bn.weight": 0.005, "bn.bias": 0.02, "bn.running_mean": 0.01}


class ComboNet(nn.Module):
    """A Linear, a BatchNorm (float buffers, an int64 counter), a frozen parameter, a slowly moving ``signal``
    and a non-persistent ``mask``: every kind of tensor an averager selects differently."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.frozen = nn.Parameter(torch.zeros(3), requires_grad=False)
        self.signal = nn.Parameter(torch.ones(len(SIGNAL_RATES), SIGNAL_WIDTH))
        self.register_buffer("mask", torch.zeros(2), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.bn(self.lin(x)) * self.frozen.sum() + self.signal.mean() + self.mask.sum()


def _bases() -> dict[str, tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1234)
    shapes = {"lin.weight": (6, 4), "lin.bias": (6,), "frozen": (3,), **{f"bn.{n}": (6,) for n in ("weight", "bias")}}
    shapes |= {"bn.running_mean": (6,), "bn.running_var": (6,)}
    out = {}
    for name, shape in shapes.items():
        sign = torch.where(torch.rand(shape, generator=g) < 0.5, -1.0, 1.0).double()
        base = (0.5 + 0.5 * torch.rand(shape, generator=g, dtype=torch.float64)) * sign  # |base| in [0.5, 1)
        out[name] = (base, 6.28 * torch.rand(shape, generator=g, dtype=torch.float64))
    return out


_BASES = _bases()


def iterate(t: int) -> dict[str, Tensor]:
    """The model's tensors after optimizer step ``t`` (0: as built), in float64, by name."""
    out = {n: b + 0.05 * torch.sin(0.7 * t + phase) + SPEED.get(n, 0.0) * t for n, (b, phase) in _BASES.items()}
    out["bn.running_var"] = 1.0 + 0.3 * torch.sin(0.4 * t + _BASES["bn.running_var"][1]) ** 2
    out["frozen"] = _BASES["frozen"][0] + 0.004 * t  # frozen, but changed by hand: copied, averaged or left alone
    out["bn.num_batches_tracked"] = torch.tensor(float(t), dtype=torch.float64)
    rates = torch.tensor(SIGNAL_RATES, dtype=torch.float64)[:, None]
    offsets = torch.arange(SIGNAL_WIDTH, dtype=torch.float64) * 2**-7 / SIGNAL_WIDTH  # every phase of a bf16 spacing
    out["signal"] = 1.0 + offsets + rates * t
    out["mask"] = torch.full((2,), float(t), dtype=torch.float64)
    return out


def tensors(model: nn.Module) -> dict[str, Tensor]:
    """Every parameter and buffer (non-persistent ones too) by qualified name."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


@torch.no_grad()
def set_iterate(model: nn.Module, t: int, poison: float | None = None) -> None:
    """Write step ``t``'s values into ``model`` in place (its dtype; a DTensor's local shard); ``poison`` goes into
    ``lin.weight[POISON_AT]``, as a bad optimizer step would put it."""
    values = iterate(t)
    if poison is not None:
        values["lin.weight"][POISON_AT] = poison
    for name, tensor in tensors(model).items():
        value = values[name].to(tensor.dtype)
        if hasattr(tensor, "to_local"):  # a DTensor: this rank's piece of the full value, laid out as it is
            from torch.distributed.tensor import distribute_tensor

            value = distribute_tensor(value, tensor.device_mesh, tensor.placements, src_data_rank=None).to_local()
            tensor = tensor.to_local()
        tensor.copy_(value)


def snapshot(model: nn.Module) -> dict[str, Tensor]:
    """Every tensor of ``model``, whole (DTensors are gathered: every rank must call), in its own dtype."""
    found = tensors(model)
    sharded = {name: t for name, t in found.items() if hasattr(t, "full_tensor")}
    whole = _gathered(sharded) if sharded else {}
    return {name: whole[name] if name in whole else t.detach().clone() for name, t in found.items()}


def _gathered(sharded: dict[str, Any]) -> dict[str, Tensor]:
    """DTensors sharded on dim 0 over all ranks in one collective (rank r holds the r-th chunk; one gather per
    tensor, as ``full_tensor()`` does, costs a round trip each); other layouts by ``full_tensor()``."""
    import torch.distributed as dist
    from torch.distributed.tensor import Shard

    world = dist.get_world_size()
    if any(tuple(t.placements) != (Shard(0),) or t.device_mesh.size() != world for t in sharded.values()):
        return {name: t.full_tensor().detach().clone() for name, t in sharded.items()}
    pieces: list[Any] = [None] * world
    dist.all_gather_object(pieces, {name: t.to_local().detach().clone() for name, t in sharded.items()})
    return {name: torch.cat([piece[name] for piece in pieces]) for name in sharded}


def wide(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.double() for name, t in state.items()}


# ---------------------------------------------------------------------- rounding and bounds


def rounded(x: Tensor, dtype: torch.dtype) -> Tensor:
    """``x`` rounded to nearest in ``dtype`` (as a cast does), back in float64."""
    return x if dtype == torch.float64 else x.to(dtype).double()


def spacing(dtype: torch.dtype, scale: Tensor) -> Tensor:
    """The distance between neighbouring values of ``dtype`` at magnitude ``scale`` (at least 1/64)."""
    if not dtype.is_floating_point:
        return torch.zeros_like(scale)
    _, exponent = torch.frexp(scale.clamp_min(2**-6))
    return torch.finfo(dtype).eps * torch.ldexp(torch.ones_like(scale), exponent - 1)


class Average:
    """Float64 reference of one stored average, written from ``e <- e + w (theta - e)`` (``w = 1`` copies).

    Keeps the exact values and the values rounded to nearest in each tensor's storage dtype after every write (the
    model cast to the storage first), as a rounding kernel must. Bounds, in storage spacings at the largest
    magnitude the tensor took: an error made at a write is carried on with factor ``1 - w`` by each later one, so
    errors of at most one spacing per write sum to at most ``bound = sum_k prod_{j>k} (1 - w_j)``; unbiased errors of
    variance <= 1/4 (stochastic rounding) sum to variance ``var``; ``first`` is what is left of the copy's error.
    """

    def __init__(self, modes: dict[str, str], storage: dict[str, torch.dtype]) -> None:
        self.modes = {name: mode for name, mode in modes.items() if mode != "skip"}
        self.storage = storage
        self.exact: dict[str, Tensor] | None = None
        self.near: dict[str, Tensor] = {}
        self.scale: dict[str, Tensor] = {}
        self.bound = self.var = self.first = 0.0

    def write(self, theta: dict[str, Tensor], w: float) -> None:
        """Fold ``theta`` in with weight ``w`` (a copy when nothing is stored yet); copied tensors are copied."""
        copy = w == 1.0 or self.exact is None
        exact = self.exact if self.exact is not None else {}
        for name, mode in self.modes.items():
            value, dtype = theta[name], self.storage[name]
            if copy or mode == "copy":
                exact[name], self.near[name] = value.clone(), rounded(value, dtype)
            else:
                exact[name] = exact[name] + w * (value - exact[name])
                near = self.near[name]
                self.near[name] = rounded(near + w * (rounded(value, dtype) - near), dtype)
            seen = torch.maximum(value.abs(), exact[name].abs()).nan_to_num(0.0, 0.0, 0.0)
            self.scale[name] = torch.maximum(self.scale.get(name, seen), seen)
        self.exact = exact
        if copy:
            self.bound, self.var, self.first = 1.0, 0.0, 1.0
        else:
            self.bound = (1 - w) * self.bound + 1
            self.var = (1 - w) ** 2 * self.var + 0.25
            self.first *= 1 - w

    def keep(self, theta: dict[str, Tensor]) -> None:
        """A skipped update: averaged tensors keep their values bit for bit, copied ones are still copied."""
        if self.exact is not None:
            for name, mode in self.modes.items():
                if mode == "copy":
                    self.exact[name], self.near[name] = theta[name].clone(), rounded(theta[name], self.storage[name])

    def expected(self, name: str, stochastic: bool) -> tuple[Tensor, Tensor | None]:
        """(value, tolerance) of a stored tensor; tolerance None: exact (copies, integer tensors)."""
        assert self.exact is not None, "no average yet"
        dtype, scale = self.storage[name], self.scale[name]
        if self.modes[name] == "copy" or not dtype.is_floating_point:
            return self.near[name], None
        arithmetic = 2 * self.bound * spacing(torch.float32, scale)  # float32 arithmetic inside the kernels
        if stochastic and dtype == torch.bfloat16:
            return self.exact[name], self.bound * spacing(dtype, scale) + arithmetic
        # The kernel rounds as the reference does (cast, then one rounding of the lerp): they part only where the
        # float32 and float64 arithmetic round a tie apart, by one spacing.
        return self.near[name], spacing(dtype, scale) + arithmetic

    def arithmetic(self, name: str) -> float:
        return 2 * self.bound * float(spacing(torch.float32, self.scale[name].max()))

    def mean_bound(self, name: str) -> float:
        """Bound on the error of the mean of one row of ``signal`` under stochastic rounding (6 sigma of unbiased
        errors, plus what is left of the first copy's rounding, which may be to nearest and alike in a row)."""
        ulp = float(spacing(self.storage[name], self.scale[name].max()))
        return ulp * (self.first + 6 * math.sqrt(self.var / SIGNAL_WIDTH)) + self.arithmetic(name)


def finite(theta: dict[str, Tensor], names: Iterable[str]) -> bool:
    return all(bool(torch.isfinite(theta[name]).all()) for name in names)


class Schedule:
    """Reference of one averager's time: waits ``start`` steps, updates every ``every``-th step with the weight
    ``weight(t, delta)`` (``t`` steps since the start, ``delta`` since the last update), and handles non-finite
    iterates: ``"skip"`` keeps the average (counted), ``"raise"`` refuses the call (nothing counts).

    ``live``: the average exists from construction and is taken again from the model at ``t = 0`` (a target
    network's start; BEMA's). ``anchors`` are taken then too, and never updated (BEMA's ``theta_0``). ``lazy``:
    nothing is stored before the first update, which copies (the anchors too); a skipped first update leaves
    nothing stored, so the next applied one copies.
    """

    def __init__(
        self,
        averages: list[Average],
        weights: list[Callable[[int, int], float]],
        *,
        start: int = 0,
        every: int = 1,
        live: bool = False,
        lazy: bool = False,
        nonfinite: str = "propagate",
        anchors: tuple[Average, ...] = (),
    ) -> None:
        self.averages, self.weights, self.anchors = averages, weights, anchors
        self.start, self.every, self.live, self.lazy, self.nonfinite = start, every, live, lazy, nonfinite
        self.calls = self.updates = self.last = self.skipped = self.start_skips = 0
        self.averaged = [n for n, mode in averages[0].modes.items() if mode == "average"]

    def construct(self, theta0: dict[str, Tensor]) -> None:
        if not self.lazy:
            self.begin(theta0)

    def step_time(self) -> int:
        return self.calls + 1 - self.start

    def call(self, theta: dict[str, Tensor]) -> str:
        """One ``update()`` call: ``"wait"``, ``"start"``, ``"update"`` or ``"raise"`` (then nothing changed)."""
        t = self.step_time()
        if not ((t == 0 and self.live) or (t >= 1 and t % self.every == 0)):
            self.calls += 1
            return "wait"
        bad = not finite(theta, self.averaged)
        if bad and self.nonfinite == "raise":
            return "raise"
        skip = bad and self.nonfinite == "skip"
        if t == 0:
            self.start_skips += skip
            if not skip:
                self.begin(theta)
            self.calls += 1
            return "start"
        if not skip and self.averages[0].exact is None:  # nothing stored yet (lazy): the anchors start here too
            for anchor in self.anchors:
                anchor.write(theta, 1.0)
        for average, weight in zip(self.averages, self.weights, strict=True):
            average.keep(theta) if skip else average.write(theta, weight(t, t - self.last))
        self.skipped += skip
        self.last, self.updates, self.calls = t, self.updates + 1, self.calls + 1
        return "update"

    def begin(self, theta: dict[str, Tensor]) -> None:
        for average in (*self.averages, *self.anchors):
            average.write(theta, 1.0)


# ---------------------------------------------------------------------- pairwise cases


def matches(rule_when: dict[str, tuple[Any, ...]], case: dict[str, Any]) -> bool:
    """True when every option of the rule is set in ``case`` (which may be partial) to one of its values."""
    return all(key in case and case[key] in values for key, values in rule_when.items())


def _pair(a: tuple[str, Any], b: tuple[str, Any]) -> tuple[tuple[str, Any], tuple[str, Any]]:
    return (a, b) if a[0] < b[0] else (b, a)


def pairs_of(case: dict[str, Any]) -> set[tuple[tuple[str, Any], tuple[str, Any]]]:
    items = sorted(case.items(), key=lambda kv: kv[0])
    return {(items[i], items[j]) for i in range(len(items)) for j in range(i + 1, len(items))}


def pairwise(
    axes: dict[str, tuple[Any, ...]],
    allowed: Callable[[dict[str, Any]], bool],
    seed: int,
    covered: Iterable[dict[str, Any]] = (),
    seeds: Iterable[dict[str, Any]] = (),
) -> list[dict[str, Any]]:
    """Cases (one value per axis) that together hold every allowed pair of values not in ``covered`` cases.

    Greedy, as AETG: the allowed ``seeds`` (partial cases: triples worth having) come first; then each new case
    starts from the first uncovered pair. Each other axis, in a seeded random order, takes the allowed value that
    covers most new pairs; of 8 such candidates the best is kept. ``allowed`` judges partial cases, so a rule on
    one or two options excludes exactly the pairs it forbids.
    """
    rng = random.Random(seed)
    names = sorted(axes)
    todo = {
        ((a, va), (b, vb))
        for i, a in enumerate(names)
        for b in names[i + 1 :]
        for va in axes[a]
        for vb in axes[b]
        if allowed({a: va, b: vb})
    }
    for case in covered:
        todo -= pairs_of(case)

    def complete(start: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        case = dict(start)
        for name in rng.sample([n for n in names if n not in case], len(names) - len(case)):
            options = [v for v in axes[name] if allowed({**case, name: v})]
            if not options:
                raise ValueError(f"no allowed value of {name!r} completes {case}: state the refusal as a rule")
            gain = [sum(_pair((name, v), item) in todo for item in case.items()) for v in options]
            case[name] = rng.choice([v for v, g in zip(options, gain, strict=True) if g == max(gain)])
        return len(pairs_of(case) & todo), case

    starts = [dict(s) for s in seeds if set(s) <= set(axes) and allowed(s)]
    cases: list[dict[str, Any]] = []
    while todo or starts:
        start = starts.pop(0) if starts else dict(min(todo, key=repr))
        best = max((complete(start) for _ in range(8)), key=lambda scored: scored[0])
        cases.append(best[1])
        todo -= pairs_of(best[1])
    return cases


# ---------------------------------------------------------------------- comparing states


def cloned(state: Any) -> Any:
    """A copy of a (nested) state whose tensors are cloned (``copy.deepcopy`` refuses some DTensor views)."""
    if isinstance(state, dict):
        return {key: cloned(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(cloned(value) for value in state)
    return state.detach().clone() if isinstance(state, Tensor) else copy.deepcopy(state)


def same(a: Any, b: Any) -> bool:
    """Deep equality of (nested) states, tensors bit for bit (NaN equal to NaN; a DTensor by its local shard)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, Tensor):
        if not isinstance(b, Tensor):
            return False
        a, b = (t.to_local() if hasattr(t, "to_local") else t for t in (a, b))
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        if a.is_floating_point():
            return bool(((a == b) | (a.isnan() & b.isnan())).all())
        return torch.equal(a, b)
    return bool(a == b)
