"""MultiEMA: average names that keep every digit, each average reached by its own name, the non-finite modes
applied to every average, and loads that never stop halfway. References: float64 EMA loops written here."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import polyak


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 6), nn.Tanh(), nn.Linear(6, 2)).double()


def iterates(steps: int, seed: int = 1) -> list[dict[str, torch.Tensor]]:
    """Parameters of a real SGD run, one state per step."""
    model = net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(steps):
        x = torch.randn(8, 3, generator=g, dtype=torch.float64)
        loss = (model(x) - x[:, :2].sin()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return out


def reference(run: list[dict[str, torch.Tensor]], decay: float) -> dict[str, torch.Tensor]:
    average = {k: v.clone() for k, v in run[0].items()}
    for state in run[1:]:
        average = {k: decay * average[k] + (1 - decay) * state[k] for k in average}
    return average


def trained(decays, steps: int = 6, **options) -> tuple[polyak.MultiEMA, nn.Module, list]:
    run = iterates(steps)
    model = net()
    multi = polyak.MultiEMA(model, decays, **options)
    for state in run:
        model.load_state_dict(state)
        multi.update()
    return multi, model, run


def test_names_keep_every_digit():
    multi, _, run = trained((0.9999, 0.99991, 0.5))
    assert list(multi) == ["0_9999", "0_99991", "0_5"]
    for name, decay in (("0_9999", 0.9999), ("0_99991", 0.99991), ("0_5", 0.5)):
        for key, value in multi[name].state_dict()["shadow"].items():
            torch.testing.assert_close(value, reference(run, decay)[key], rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("name", ["fast", "slow"])
def test_each_average_is_reached_by_its_own_name(name):
    """The second average by name (not the first) in swapped, copy_to, averaged_model and state_dict."""
    decays = {"slow": 0.9, "fast": 0.3}
    multi, model, run = trained(decays)
    want = reference(run, decays[name])
    other = reference(run, decays["fast" if name == "slow" else "slow"])
    assert not torch.allclose(want["0.weight"], other["0.weight"])

    def check(values: dict[str, torch.Tensor]) -> None:
        for key, value in want.items():
            torch.testing.assert_close(values[key].double(), value, rtol=1e-12, atol=1e-14, msg=key)

    with multi[name].swapped(model):
        check(dict(model.named_parameters()))
    assert torch.equal(model.state_dict()["0.weight"], run[-1]["0.weight"])  # the training weights came back
    check(multi[name].averaged_model().state_dict())
    check(multi[name].state_dict()["shadow"])
    copied = net()
    multi[name].copy_to(copied)
    check(copied.state_dict())
    single = polyak.EMA(net(), decay=decays[name])  # a plain EMA of that decay loads the average's state
    single.load_state_dict(multi[name].state_dict())
    check(single.shadow.tensors())


def test_nonfinite_raise_refuses_before_any_average_changes():
    multi, model, _ = trained((0.5, 0.9), steps=3, nonfinite="raise")
    before = copy.deepcopy(multi.state_dict())
    with torch.no_grad():
        model[2].bias[1] = float("nan")
    with pytest.raises(RuntimeError, match=r"'2\.bias' holds inf or NaN"):
        multi.update()
    after = multi.state_dict()
    assert after["step"] == before["step"] == 3 and after["num_updates"] == 3
    for name in ("0_5", "0_9"):
        for key, value in after["averages"][name].items():
            assert torch.equal(value, before["averages"][name][key]), (name, key)


def test_nonfinite_propagate_reaches_every_average():
    multi, model, _ = trained((0.5, 0.9), steps=3, nonfinite="propagate")
    with torch.no_grad():
        model[0].weight[0, 0] = float("inf")
    multi.update()
    for name, average in multi.items():
        shadow = average.state_dict()["shadow"]
        assert not torch.isfinite(shadow["0.weight"][0, 0]), name  # inf, or NaN where lerp takes inf - inf
        assert torch.isfinite(shadow["2.weight"]).all(), name
        assert average.skipped_updates == 0


def test_nonfinite_skip_counts_once_per_update_for_every_average():
    multi, model, _ = trained((0.5, 0.9), steps=3, nonfinite="skip")
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    multi.update()
    multi.update()
    assert multi.skipped_updates == 2
    assert [a.skipped_updates for _, a in multi.items()] == [2, 2]


def _damage_second(state: dict) -> dict:
    damaged = copy.deepcopy(state)
    damaged["averages"]["0_9"]["2.weight"] = torch.zeros(3, 3, dtype=torch.float64)  # the wrong shape
    return damaged


def test_a_damaged_second_average_loads_nothing():
    """All K averages are checked before the first one is written: a refused load changes nothing."""
    source, _, _ = trained((0.5, 0.9), steps=6)
    target, _, _ = trained((0.5, 0.9), steps=2)
    before = copy.deepcopy(target.state_dict())
    with pytest.raises(ValueError, match=r"2\.weight"):
        target.load_state_dict(_damage_second(source.state_dict()))
    after = target.state_dict()
    assert after["step"] == 2 and after["num_updates"] == 2
    for name in ("0_5", "0_9"):
        for key, value in after["averages"][name].items():
            assert torch.equal(value, before["averages"][name][key]), (name, key)


def test_a_format_1_state_loads_and_one_of_mixed_steps_is_refused():
    """Format /1 kept each average as a whole averager state; they must agree on the step and settings."""
    source, _, _ = trained((0.5, 0.9), steps=4)
    old = {"format": "polyak.multi_ema/1", "averages": {name: a.state_dict() for name, a in source.items()}}
    loaded, _, _ = trained((0.5, 0.9), steps=1)
    loaded.load_state_dict(copy.deepcopy(old))
    assert loaded.step == 4
    for name, average in loaded.items():
        for key, value in average.state_dict()["shadow"].items():
            assert torch.equal(value, source[name].state_dict()["shadow"][key]), (name, key)
    for key, value in (("step", 5), ("num_updates", 3), ("last_update_step", 3)):
        mixed = copy.deepcopy(old)
        mixed["averages"]["0_9"][key] = value
        fresh, _, _ = trained((0.5, 0.9), steps=1)
        with pytest.raises(ValueError, match="another step or with other settings"):
            fresh.load_state_dict(mixed)
        assert fresh.step == 1
