"""Every number a rule or front end accepts is checked at construction, and a damaged state is refused on load.

The tables are generated from the signatures: a new numeric argument without a check fails here.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import polyak
from polyak import rules, swa_utils
from polyak.bn import update_bn


def model() -> nn.Module:
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))


def rule_classes() -> list[type[rules.Rule]]:
    """Every concrete rule in :mod:`polyak.rules`, including ones added later."""
    found = [obj for obj in vars(rules).values() if isinstance(obj, type) and issubclass(obj, rules.Rule)]
    return [cls for cls in found if not inspect.isabstract(cls)]


# What each callable needs to succeed (required arguments), and the arguments that exclude each other.
REQUIRED: dict[str, dict[str, Any]] = {
    "decay": {"decay": 0.9},
    "half_life": {"half_life": 10.0},
    "PowerFunction": {"gamma": 1.0},
    "Averager": {"rule": rules.ConstantDecay(0.9)},
    "EMA": {"decay": 0.9},
}
EXCLUSIVE = [{"gamma", "sigma_rel"}, {"decay", "half_life", "rule"}, {"sigma_rels", "gammas"}]


def callables() -> list[tuple[str, Callable[..., Any], dict[str, Any]]]:
    """(name, callable, valid keyword arguments) for every rule and front end that takes numbers."""
    found: list[tuple[str, Callable[..., Any], dict[str, Any]]] = []
    for cls in rule_classes():
        names = inspect.signature(cls).parameters
        valid = dict(REQUIRED.get(cls.__name__, {}))
        for name, parameter in names.items():
            if parameter.default is inspect.Parameter.empty and name not in valid:
                valid.update(REQUIRED.get(name, {name: 0.5}))
        found.append((cls.__name__, cls, valid))
    found += [
        ("Averager", polyak.Averager, {"model": model(), **REQUIRED["Averager"]}),
        ("EMA", polyak.EMA, {"model": model(), **REQUIRED["EMA"]}),
        ("BEMA", polyak.BEMA, {"model": model()}),
        ("PostHocEMA", polyak.PostHocEMA, {"model": model()}),
        ("ExponentialMovingAverage", swa_utils.ExponentialMovingAverage, {"model": model(), "decay": 0.9}),
        ("AveragedModel", swa_utils.AveragedModel, {"model": model()}),
        ("get_ema_avg_fn", swa_utils.get_ema_avg_fn, {}),
        ("get_ema_multi_avg_fn", swa_utils.get_ema_multi_avg_fn, {}),
        ("update_bn", update_bn, {"loader": [torch.randn(4, 3)], "model": model()}),
    ]
    return found


def kind(annotation: Any) -> str | None:
    """'number', 'integer', 'numbers' (a sequence), 'flag', or None, from a (string) annotation."""
    text = str(annotation).replace(" ", "").removesuffix("|None")
    return {"float": "number", "int": "integer", "Sequence[float]": "numbers", "bool": "flag"}.get(text)


def optional(annotation: Any) -> bool:
    return str(annotation).replace(" ", "").endswith("|None")


# Bad for every argument of its kind; then out-of-range values, argument by argument.
# numpy numbers and 0-d tensors are numbers (see test_numbers.py); a 1-element 1-d tensor is not one.
BAD = {
    "number": [
        *(math.nan, math.inf, -math.inf, True, False, "0.5", -1.0, torch.tensor([0.5])),
        *(np.float64("nan"), np.float32("inf"), np.bool_(True), torch.tensor(math.nan), torch.tensor(True)),
    ],
    "integer": [
        *(math.nan, math.inf, True, False, "1", -1, 2.0, np.float64(3.0), torch.tensor([2])),
        *(np.bool_(True), torch.tensor(2.0), torch.tensor(True), np.int64(-1)),
    ],
    "flag": ["no", 1, 0],
}
SIGNED = {"offset"}  # PowerWarmup's clock offset: steps, before or after the start of averaging
OUT_OF_RANGE: dict[str, list[Any]] = {
    "decay": [1.0, 1.5, 1e300],
    "min_decay": [1.0],
    "half_life": [0.0, 1e20],
    "sigma_rel": [0.0, 0.3, 1e-12],
    "gamma": [0.0],
    "inv_gamma": [0.0],
    "power": [0.0],
    "rho": [1e300 * 1e300],
    "update_every": [0],
    "snapshot_every": [0, 3],  # with update_every=2: not a multiple
    "max_batches": [0],
}


def cases() -> list[Any]:
    out = []
    for owner, make, valid in callables():
        for name, parameter in inspect.signature(make).parameters.items():
            what = kind(parameter.annotation)
            if what is None:
                continue
            values = [[v] for v in BAD["number"]] + [[]] if what == "numbers" else BAD[what]
            if name in SIGNED:  # a count that may be negative: all bad values but the negative ones
                values = [v for v in values if not (isinstance(v, (int, np.integer)) and v < 0)]
            values = values + OUT_OF_RANGE.get(name, [])
            if not optional(parameter.annotation):
                values = [*values, None]
            for value in values:
                out.append(pytest.param(owner, make, valid, name, value, id=f"{owner}-{name}={value!r}"))
    return out


@pytest.mark.parametrize(("owner", "make", "valid", "name", "value"), cases())
def test_every_bad_number_is_refused_naming_the_argument(owner, make, valid, name, value):
    kwargs = dict(valid)
    for group in EXCLUSIVE:  # drop the arguments that exclude the one tested
        if name in group:
            kwargs = {k: v for k, v in kwargs.items() if k not in group}
    kwargs[name] = value
    if name == "snapshot_every":
        kwargs.update(update_every=2, directory="unused")
    with pytest.raises((ValueError, TypeError)) as error:
        make(**kwargs)
    message = str(error.value)
    assert name.rstrip("s") in message, (owner, name, message)
    assert "\n" not in message


def test_the_table_covers_every_numeric_argument():
    """Each callable's valid arguments work, and every rule and front end has numeric arguments under test."""
    tested = {(c.values[0], c.values[3]) for c in cases()}
    for _, make, valid in callables():
        make(**valid)
    for expected in [
        ("PowerWarmup", "inv_gamma"),
        ("PowerWarmup", "power"),
        ("BEMA", "rho"),
        ("BEMA", "eta"),
        ("Averager", "update_every"),
        ("PostHocEMA", "sigma_rels"),
        ("PostHocEMA", "snapshot_every"),
        ("update_bn", "max_batches"),
        ("AveragedModel", "use_buffers"),
        ("HalfLife", "half_life"),
    ]:
        assert expected in tested, expected


def test_message_shape_names_expected_found_and_what_to_do():
    from polyak.checks import check_int, check_number

    with pytest.raises(ValueError, match=r"^inv_gamma: expected a finite number > 0, got nan; 1.0 is the usual value$"):
        rules.PowerWarmup(0.99, inv_gamma=math.nan)
    with pytest.raises(TypeError, match=r"^update_every: expected an int >= 1, got True; give the optimizer steps"):
        polyak.EMA(model(), decay=0.9, update_every=True)
    with pytest.raises(ValueError, match=r"^rho: expected a finite number >= 0, got inf"):
        polyak.BEMA(model(), rho=math.inf)
    with pytest.raises(ValueError, match=r"^sigma_rels\[1\]: expected a finite number in \[1e-09, 0.288675\), got 0.5"):
        polyak.PostHocEMA(model(), sigma_rels=(0.05, np.float64(0.5)))  # numpy scalars print as plain numbers
    assert check_number("x", np.float32(0.5), low=0) == 0.5 and check_int("n", np.int64(3)) == 3


def test_nan_warmup_would_have_poisoned_the_average():
    """The example that was found: the rule is refused before any update can turn the average into NaN."""
    with pytest.raises(ValueError, match="inv_gamma"):
        polyak.EMA(model(), rule=rules.PowerWarmup(0.999, inv_gamma=math.nan))


# ---------------------------------------------------------------------- damaged states


def trained(front_end: str, steps: int = 7) -> Any:
    torch.manual_seed(0)
    net = model()
    averager = {
        "EMA": lambda: polyak.EMA(net, decay=0.9, update_every=2, start_step=1, nonfinite="skip"),
        "BEMA": lambda: polyak.BEMA(net, burn_in=1, update_every=2),
        "PostHocEMA": lambda: polyak.PostHocEMA(net, update_every=2, start_step=1),
    }[front_end]()
    for _ in range(steps):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(0.1)
        averager.update()
    return averager


TENSORS = {"EMA": ("shadow",), "BEMA": ("ema", "anchor"), "PostHocEMA": ("shadows",)}


def damages(front_end: str) -> list[tuple[str, Callable[[dict[str, Any]], None]]]:
    def setter(key: str, value: Any) -> Callable[[dict[str, Any]], None]:
        return lambda state: state.__setitem__(key, value)

    def first_tensors(state: dict[str, Any]) -> dict[str, torch.Tensor]:
        entry = state[TENSORS[front_end][0]]
        return entry[0] if isinstance(entry, list) else entry

    out = [
        ("last_update_step > step", lambda s: s.update(last_update_step=s["step"] + 2)),
        ("num_updates too many", lambda s: s.update(num_updates=s["num_updates"] + 1)),
        ("num_updates too few", lambda s: s.update(num_updates=s["num_updates"] - 1)),
        ("last_update_step off the grid", lambda s: s.update(last_update_step=s["last_update_step"] - 1)),
        ("step moved alone", lambda s: s.update(step=s["step"] + 2)),
        ("negative step", setter("step", -1)),
        ("float step", setter("step", 6.0)),
        ("bool num_updates", setter("num_updates", True)),
        ("missing step", lambda s: s.pop("step")),
        ("wrong format", setter("format", "polyak.other/1")),
        ("not a dict", None),  # replaced by a list below
        ("tensor of another shape", lambda s: first_tensors(s).update({"0.weight": torch.zeros(2, 2)})),
        ("tensor of another dtype", lambda s: first_tensors(s).update({"0.bias": torch.zeros(3, dtype=torch.half)})),
        ("tensor missing", lambda s: first_tensors(s).pop("0.bias")),
        ("not a tensor", lambda s: first_tensors(s).update({"0.bias": [0.0, 0.0, 0.0]})),
    ]
    for key in TENSORS[front_end]:
        out.append((f"missing {key}", lambda s, key=key: s.pop(key)))
        out.append((f"{key} of another type", setter(key, "garbage")))
    if front_end == "EMA":
        out.append(("skipped_updates > num_updates", lambda s: s.update(skipped_updates=s["num_updates"] + 1)))
        out.append(("negative skipped_updates", setter("skipped_updates", -1)))
    if front_end == "PostHocEMA":
        out.append(("one average missing", lambda s: s["shadows"].pop()))
    return out


def averages_of(averager: Any) -> list[dict[str, torch.Tensor]]:
    return [averager.shadow.tensors(k) for k in range(averager.count)]


@pytest.mark.parametrize(
    ("front_end", "what", "damage"),
    [pytest.param(f, w, d, id=f"{f}-{w}") for f in ("EMA", "BEMA", "PostHocEMA") for w, d in damages(f)],
)
def test_damaged_state_is_refused_and_changes_nothing(front_end, what, damage):
    state = trained(front_end).state_dict()
    if damage is None:
        state = list(state.items())
    else:
        damage(state)
    target = trained(front_end)
    target.update()  # one step ahead of the saved state: a partial load would show
    counters = (target.step, target.num_updates, target.last_update_step)
    before = {k: v.clone() for k, v in target.state_dict().items() if isinstance(v, torch.Tensor)}
    shadows = averages_of(target)
    copies = [{k: v.clone() for k, v in s.items()} for s in shadows]
    with pytest.raises((ValueError, TypeError)) as error:
        target.load_state_dict(state)
    assert "\n" not in str(error.value)
    assert (target.step, target.num_updates, target.last_update_step) == counters, what
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items() if isinstance(v, torch.Tensor))
    for shadow, copy in zip(shadows, copies, strict=True):
        assert all(torch.equal(v, copy[k]) for k, v in shadow.items()), what
    target.update()  # still usable


@pytest.mark.parametrize("front_end", ["EMA", "BEMA", "PostHocEMA"])
def test_intact_state_loads(front_end):
    """The counter checks accept every state a run produces, at every step (before, at and after the start)."""
    for steps in range(0, 8):
        source = trained(front_end, steps)
        target = trained(front_end, 3)
        target.load_state_dict(source.state_dict())
        assert (target.step, target.num_updates, target.last_update_step) == (
            source.step,
            source.num_updates,
            source.last_update_step,
        )
