"""Numbers as users hold them: every numeric argument of the public API takes numpy numbers and 0-d tensors.

Each argument is given once as ``np.int64`` (integer arguments, and real ones at a whole value), ``np.float64``,
``np.float32`` and a 0-d tensor, through the public constructor or function, and must behave exactly as the same
value given as a Python number: the same result, holding plain Python numbers (a saved state must load with
``torch.load(weights_only=True)``, which refuses numpy scalars). Refusals of bools, NaN, inf and out-of-range
values are tested in test_arguments.py.
"""

from __future__ import annotations

import inspect
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

import polyak
from polyak import durations, rules, swa_utils
from polyak.checkpoints import newest_checkpoints
from polyak.posthoc import reconstruct


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3))


def run(averager: Any, model: nn.Module, steps: int = 5) -> Any:
    """``steps`` updates of ``averager`` on a model moved by fixed amounts; its state, saved and loaded back."""
    for step in range(steps):
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(0.1 * (step + 1) * (i + 1))
            model[1].running_mean.add_(0.05)
        averager.update()
    saved = io.BytesIO()
    torch.save(averager.state_dict(), saved)
    saved.seek(0)
    state = torch.load(saved, weights_only=True)  # refuses numpy scalars
    state.pop("run", None)  # a PostHocEMA run's identity: random, by design
    return state


def front_end(make: Callable[[nn.Module, Any], Any]) -> Callable[[Any, Path], Any]:
    def check(value: Any, tmp_path: Path) -> Any:
        model = net()
        return run(make(model, value), model)

    return check


def rule(make: Callable[[Any], rules.Rule]) -> Callable[[Any, Path], Any]:
    def check(value: Any, tmp_path: Path) -> Any:
        made = make(value)
        return made.config(), [made.weight(t, 1) for t in range(1, 6)], made.weight(10, 3)

    return check


def call(function: Callable[[Any], Any]) -> Callable[[Any, Path], Any]:
    return lambda value, tmp_path: function(value)


def checkpoints(tmp_path: Path) -> list[Path]:
    paths = []
    for step in (1, 2, 3):
        torch.manual_seed(step)
        paths.append(tmp_path / f"ckpt_{step}.pt")
        torch.save({"w": torch.randn(4, 4), "b": torch.randn(4)}, paths[-1])
    return paths


def averaged(options: Callable[[Any], dict[str, Any]]) -> Callable[[Any, Path], Any]:
    def check(value: Any, tmp_path: Path) -> Any:
        average = polyak.average_checkpoints(checkpoints(tmp_path), **options(value))
        return average.weights, dict(average)

    return check


def newest(value: Any, tmp_path: Path) -> Any:
    checkpoints(tmp_path)
    paths, how = newest_checkpoints(tmp_path, value)
    return [p.name for p in paths], how


def reconstructed(option: str) -> Callable[[Any, Path], Any]:
    def check(value: Any, tmp_path: Path) -> Any:
        snaps = tmp_path / "snaps"
        if not snaps.exists():
            model = nn.Linear(3, 2)
            tracker = polyak.PostHocEMA(model, directory=snaps, snapshot_every=2)
            for _ in range(8):
                with torch.no_grad():
                    model.weight.add_(0.1)
                tracker.update()
        out = tmp_path / f"out-{len(list(tmp_path.iterdir()))}.safetensors"
        given = {"sigma_rels": [value], "step": 8} if option == "sigma_rels" else {"sigma_rels": [0.1], "step": value}
        result = reconstruct(snaps, given["sigma_rels"], [out], step=given["step"])
        return result.step, result.sigma_rels, out.read_bytes()

    return check


def bn(value: Any, tmp_path: Path) -> Any:
    model = net()
    loader = [torch.randn(4, 3, generator=torch.Generator().manual_seed(i)) for i in range(5)]
    polyak.update_bn(loader, model, max_batches=value)
    return {name: value.clone() for name, value in model.state_dict().items()}


def ema_module(value: Any, tmp_path: Path) -> Any:
    model = net()
    averaged = swa_utils.ExponentialMovingAverage(model, value)
    for _ in range(3):
        with torch.no_grad():
            model[0].weight.add_(1.0)
        averaged.update_parameters(model)
    return averaged.state_dict()


def multi_avg_fn(value: Any, tmp_path: Path) -> Any:
    average, model = [torch.zeros(3)], [torch.ones(3)]
    swa_utils.get_ema_multi_avg_fn(value)(average, model, torch.tensor(1))
    return average


Case = tuple[str, Callable[[Any, Path], Any], Any]
# (argument, how it is used, a valid Python value of it). An int value: an integer argument.
CASES: list[Case] = [
    # rules
    ("ConstantDecay.decay", rule(rules.ConstantDecay), 0.9),
    ("HalfLife.half_life", rule(rules.HalfLife), 10.0),
    ("DebiasedDecay.decay", rule(rules.DebiasedDecay), 0.9),
    ("RationalWarmup.decay", rule(rules.RationalWarmup), 0.9),
    ("PowerWarmup.decay", rule(lambda v: rules.PowerWarmup(v)), 0.99),
    ("PowerWarmup.inv_gamma", rule(lambda v: rules.PowerWarmup(0.99, inv_gamma=v)), 2.0),
    ("PowerWarmup.power", rule(lambda v: rules.PowerWarmup(0.99, power=v)), 0.75),
    ("PowerWarmup.min_decay", rule(lambda v: rules.PowerWarmup(0.99, min_decay=v)), 0.5),
    ("PowerWarmup.offset", rule(lambda v: rules.PowerWarmup(0.99, offset=v)), -3),
    ("PowerFunction.gamma", rule(lambda v: rules.PowerFunction(v)), 7.0),
    ("PowerFunction.sigma_rel", rule(lambda v: rules.PowerFunction(sigma_rel=v)), 0.125),
    ("CosineMomentum.start", rule(lambda v: rules.CosineMomentum(start=v, total_steps=4)), 0.5),
    ("CosineMomentum.end", rule(lambda v: rules.CosineMomentum(end=v, total_steps=4)), 0.75),
    ("CosineMomentum.total_steps", rule(lambda v: rules.CosineMomentum(total_steps=v)), 4),
    ("LinearMomentum.start", rule(lambda v: rules.LinearMomentum(start=v, total_steps=4)), 0.5),
    ("LinearMomentum.end", rule(lambda v: rules.LinearMomentum(end=v, total_steps=4)), 0.75),
    ("LinearMomentum.total_steps", rule(lambda v: rules.LinearMomentum(total_steps=v)), 4),
    ("Rule.weight.step", call(lambda v: rules.ConstantDecay(0.9).weight(v, 2)), 5),
    ("Rule.weight.delta", call(lambda v: rules.ConstantDecay(0.9).weight(5, v)), 2),
    ("gamma_to_sigma_rel.gamma", call(rules.gamma_to_sigma_rel), 7.0),
    ("sigma_rel_to_gamma.sigma_rel", call(rules.sigma_rel_to_gamma), 0.125),
    # durations
    ("to_steps.duration", call(durations.to_steps), 100.0),
    ("to_steps.steps_per_epoch", call(lambda v: durations.to_steps("2ep", steps_per_epoch=v)), 50.0),
    ("to_steps.batch_size", call(lambda v: durations.to_steps("10k samples", batch_size=v)), 64.0),
    ("to_steps.tokens_per_step", call(lambda v: durations.to_steps("1M tokens", tokens_per_step=v)), 4096.0),
    # front ends
    ("EMA.decay", front_end(lambda m, v: polyak.EMA(m, decay=v)), 0.75),
    ("EMA.tau", front_end(lambda m, v: polyak.EMA(m, tau=v)), 0.25),
    ("EMA.half_life", front_end(lambda m, v: polyak.EMA(m, half_life=v)), 4.0),
    (
        "EMA.steps_per_epoch",
        front_end(lambda m, v: polyak.EMA(m, half_life="1ep", steps_per_epoch=v)),
        4.0,
    ),
    ("EMA.batch_size", front_end(lambda m, v: polyak.EMA(m, half_life="256sp", batch_size=v)), 64.0),
    ("EMA.tokens_per_step", front_end(lambda m, v: polyak.EMA(m, half_life="1k tok", tokens_per_step=v)), 256.0),
    ("EMA.update_every", front_end(lambda m, v: polyak.EMA(m, decay=0.75, update_every=v)), 2),
    ("EMA.start_step", front_end(lambda m, v: polyak.EMA(m, decay=0.75, start_step=v)), 1),
    ("EMA.switch_every", front_end(lambda m, v: polyak.EMA(m, decay=0.75, switch_every=v)), 2),
    ("EMA.switch_blend", front_end(lambda m, v: polyak.EMA(m, decay=0.75, switch_every=2, switch_blend=v)), 0.5),
    ("SWA.update_every", front_end(lambda m, v: polyak.SWA(m, update_every=v)), 2),
    ("SWA.start_step", front_end(lambda m, v: polyak.SWA(m, start_step=v)), 2),
    ("MultiEMA.decays", front_end(lambda m, v: polyak.MultiEMA(m, [v, 0.5])), 0.75),
    ("MultiEMA.decays-mapping", front_end(lambda m, v: polyak.MultiEMA(m, {"fast": v})), 0.75),
    ("MultiEMA.update_every", front_end(lambda m, v: polyak.MultiEMA(m, [0.75], update_every=v)), 2),
    ("BEMA.kappa", front_end(lambda m, v: polyak.BEMA(m, kappa=v)), 0.5),
    ("BEMA.eta", front_end(lambda m, v: polyak.BEMA(m, eta=v)), 0.25),
    ("BEMA.gamma", front_end(lambda m, v: polyak.BEMA(m, gamma=v)), 2.0),
    ("BEMA.rho", front_end(lambda m, v: polyak.BEMA(m, rho=v)), 10.0),
    ("BEMA.burn_in", front_end(lambda m, v: polyak.BEMA(m, burn_in=v)), 1),
    ("BEMA.update_every", front_end(lambda m, v: polyak.BEMA(m, update_every=v)), 2),
    ("PostHocEMA.sigma_rels", front_end(lambda m, v: polyak.PostHocEMA(m, sigma_rels=[v, 0.05])), 0.125),
    ("PostHocEMA.gammas", front_end(lambda m, v: polyak.PostHocEMA(m, gammas=[v])), 7.0),
    ("PostHocEMA.update_every", front_end(lambda m, v: polyak.PostHocEMA(m, update_every=v)), 2),
    ("PostHocEMA.start_step", front_end(lambda m, v: polyak.PostHocEMA(m, start_step=v)), 1),
    (
        "PostHocEMA.snapshot_every",
        lambda v, tmp_path: front_end(lambda m, v: polyak.PostHocEMA(m, directory=tmp_path, snapshot_every=v))(
            v, tmp_path
        ),
        8,
    ),
    ("ExponentialMovingAverage.decay", ema_module, 0.75),
    ("get_ema_multi_avg_fn.decay", multi_avg_fn, 0.75),
    ("update_bn.max_batches", bn, 3),
    # checkpoint files
    ("average_checkpoints.weights", averaged(lambda v: {"weights": [v, 1.0, 2.0]}), 3.0),
    ("average_checkpoints.ema_decay", averaged(lambda v: {"ema_decay": v}), 0.5),
    ("newest_checkpoints.count", newest, 2),
    ("reconstruct.sigma_rels", reconstructed("sigma_rels"), 0.125),
    ("reconstruct.step", reconstructed("step"), 6),
]

# Arguments checked in the front ends' own code (ema.py, multi.py, bema.py, posthoc/tracker.py, front_end.py),
# which keep the value as given or check its type themselves; each of these fails today.


def forms(value: Any) -> dict[str, Any]:
    """The value as numpy numbers and a 0-d tensor; an integer as np.int64 and an int64 tensor only."""
    if isinstance(value, int):
        return {"int64": np.int64(value), "tensor": torch.tensor(value)}
    found = {"float64": np.float64(value), "float32": np.float32(value), "tensor": torch.tensor(value)}
    if float(value).is_integer():
        found["int64"] = np.int64(int(value))
    return found


def params() -> list[Any]:
    out = []
    for name, check, value in CASES:
        for form, given in forms(value).items():
            out.append(pytest.param(check, given, id=f"{name}-{form}"))
    return out


def same(found: Any, expected: Any, where: str = "") -> None:
    """``found`` equals ``expected`` and holds the same types all the way down (a tensor: the same values)."""
    if isinstance(expected, Tensor):
        assert isinstance(found, Tensor) and found.dtype == expected.dtype, where
        assert torch.equal(found, expected), where
        return
    assert type(found) is type(expected), (where, type(found), type(expected))
    if isinstance(expected, dict):
        assert found.keys() == expected.keys(), where
        for key in expected:
            same(found[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(found) == len(expected), where
        for i, (a, b) in enumerate(zip(found, expected, strict=True)):
            same(a, b, f"{where}[{i}]")
    else:
        assert found == expected, (where, found, expected)


@pytest.mark.parametrize(("check", "given"), params())
def test_numpy_numbers_and_0d_tensors_act_as_python_numbers(check, given, tmp_path):
    expected = check(given.item(), tmp_path)  # the same value as a Python number
    same(check(given, tmp_path), expected)


def test_every_argument_of_the_refusal_table_is_here():
    """Every numeric argument that test_arguments.py finds in the signatures has a case here."""
    from test_arguments import callables, kind  # the signature-generated table of numeric arguments

    # EMA is an Averager; ExponentialMovingAverage's decay is get_ema_avg_fn's: the same code, tested once.
    same_code = {"Averager": "EMA", "get_ema_avg_fn": "ExponentialMovingAverage"}
    covered = {name.split("-")[0] for name, _, _ in CASES}
    missing = []
    for owner, make, _ in callables():
        for name, parameter in inspect.signature(make).parameters.items():
            qualified = f"{same_code.get(owner, owner)}.{name}"
            if kind(parameter.annotation) in ("number", "integer", "numbers") and qualified not in covered:
                missing.append(qualified)
    assert missing == [], missing
