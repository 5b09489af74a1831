"""MultiEMA (several decays, one pass), lazy start and Switch EMA, against float64 references."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import polyak
from polyak.rules import CosineMomentum


def net(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).to(dtype)


def states(steps: int, dtype: torch.dtype = torch.float64) -> list[dict[str, torch.Tensor]]:
    """Model states of a real SGD run, one per step."""
    model = net(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(steps):
        x = torch.randn(6, 3, generator=gen, dtype=dtype)
        loss = model(x).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        out.append(copy.deepcopy(model.state_dict()))
    return out


def reference_ema(run: list[dict[str, torch.Tensor]], decay: float, every: int = 1) -> dict[str, torch.Tensor]:
    """Copy at the first update, then e <- d^k e + (1 - d^k) theta every k steps, in float64."""
    average: dict[str, torch.Tensor] = {}
    for t, state in enumerate(run, start=1):
        if t % every:
            continue
        if not average:
            average = {k: v.double().clone() for k, v in state.items()}
            continue
        w = 1 - decay**every
        for k, v in state.items():
            if v.is_floating_point():
                average[k] = average[k] + w * (v.double() - average[k])
            else:
                average[k] = v.clone()
    return average


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_multi_ema_matches_separate_references(dtype):
    run = states(20, dtype)
    model = net(dtype)
    multi = polyak.MultiEMA(model, decays=(0.9, 0.99), update_every=2)
    assert list(multi) == ["0_9", "0_99"]
    for state in run:
        model.load_state_dict(state)
        multi.update()
    for name, decay in (("0_9", 0.9), ("0_99", 0.99)):
        want = reference_ema(run, decay, every=2)
        got = multi[name].state_dict()["shadow"]
        tolerance = 1e-12 if dtype == torch.float64 else 1e-6  # a bf16 model: float32 averages
        for key, value in got.items():
            torch.testing.assert_close(value.double(), want[key].double(), rtol=tolerance, atol=tolerance, msg=key)
        assert multi[name].num_updates == 10 and multi[name].step == 20


def test_multi_ema_by_name_swap_export_resume():
    run = states(12)
    model = net()
    multi = polyak.MultiEMA(model, decays={"fast": 0.9, "teacher": CosineMomentum(start=0.9, total_steps=10)})
    for state in run[:6]:
        model.load_state_dict(state)
        multi.update()
    saved = copy.deepcopy(multi.state_dict())
    for state in run[6:]:
        model.load_state_dict(state)
        multi.update()
    with multi["fast"].swapped(model):
        swapped = {k: v.clone() for k, v in model.named_parameters()}
    for key, value in swapped.items():
        assert torch.equal(multi["fast"].state_dict()["shadow"][key], value)
    exported = multi["teacher"].averaged_model()
    assert isinstance(exported, nn.Sequential)
    # resume at step 6 and replay
    model2 = net()
    again = polyak.MultiEMA(model2, decays={"fast": 0.9, "teacher": CosineMomentum(start=0.9, total_steps=10)})
    again.load_state_dict(saved)
    for state in run[6:]:
        model2.load_state_dict(state)
        again.update()
    for name in ("fast", "teacher"):
        for key, value in again[name].state_dict()["shadow"].items():
            assert torch.equal(value, multi[name].state_dict()["shadow"][key]), (name, key)
    # a MultiEMA of other names or decays is refused, and nothing changes
    other = polyak.MultiEMA(net(), decays={"fast": 0.9, "slow": 0.999})
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="saved MultiEMA has rules="):
        other.load_state_dict(saved)
    wrong = polyak.MultiEMA(net(), decays={"fast": 0.9, "teacher": 0.99})
    with pytest.raises(ValueError, match="rule"):
        wrong.load_state_dict(saved)
    assert wrong["fast"].step == 0  # checked all before loading any
    assert before["step"] == other["fast"].step


def test_multi_ema_errors():
    model = net()
    with pytest.raises(TypeError, match="MultiEMA"):
        polyak.EMA(model, decay=(0.999, 0.9999))
    with pytest.raises(ValueError, match="at least one"):
        polyak.MultiEMA(model, decays=())
    with pytest.raises(ValueError, match="differ"):
        polyak.MultiEMA(model, decays=(0.9, 0.9))
    with pytest.raises(TypeError, match="mapping"):
        polyak.MultiEMA(model, decays=(CosineMomentum(total_steps=3),))
    with pytest.raises(ValueError, match=r"decay: expected a finite number in \[0, 1\)"):
        polyak.MultiEMA(model, decays=(0.9, 1.5))
    with pytest.raises(ValueError, match="without dots"):
        polyak.MultiEMA(model, decays={"a.b": 0.9})
    with pytest.raises(ValueError, match="target"):
        polyak.MultiEMA(model, decays=(0.9,), target="copy")
    with pytest.raises(KeyError, match="no average named"):
        polyak.MultiEMA(model, decays=(0.9,))["0.9"]


def test_lazy_start_allocates_nothing_before_start_and_resumes_on_both_sides():
    run = states(12)
    model = net()
    lazy = polyak.EMA(model, decay=0.8, start_step=5, lazy=True)
    saved = {}
    for step, state in enumerate(run, start=1):
        model.load_state_dict(state)
        lazy.update()
        if step == 3:
            assert lazy._shadow is None and lazy.state_dict()["shadow"] is None
            with pytest.raises(RuntimeError, match="no average yet"):
                _ = lazy.shadow
            saved["before"] = copy.deepcopy(lazy.state_dict())
        if step == 8:
            saved["after"] = copy.deepcopy(lazy.state_dict())
    want = reference_ema(run[5:], 0.8)
    for key, value in lazy.shadow.state_dict().items():
        torch.testing.assert_close(value, want[key], rtol=1e-12, atol=1e-14)
    eager = polyak.EMA(net(), decay=0.8, start_step=5)
    for side, resume_at in (("before", 3), ("after", 8)):
        for resumed in (polyak.EMA(net(), decay=0.8, start_step=5, lazy=True), copy.deepcopy(eager)):
            resumed.load_state_dict(saved[side])
            if side == "before" and resumed.options.lazy:
                assert resumed._shadow is None
            for state in run[resume_at:]:
                resumed.model.load_state_dict(state)
                resumed.update()
            for key, value in resumed.shadow.state_dict().items():
                assert torch.equal(value, lazy.shadow.state_dict()[key]), (side, key)
    damaged = dict(saved["after"], shadow=None)
    with pytest.raises(ValueError, match="damaged"):
        polyak.EMA(net(), decay=0.8, start_step=5, lazy=True).load_state_dict(damaged)


@pytest.mark.parametrize("blend", [1.0, 0.5, 0.25])  # 0.25: a blend that is not its own complement
def test_switch_ema_writes_the_average_back(blend):
    """Every N steps the online model moves to the average: theta <- theta + blend (ema - theta)."""
    model = net()
    ema = polyak.EMA(model, decay=0.7, update_every=2, switch_every=4, switch_blend=blend)
    average = {k: v.clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(3)
    for t in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        ema.update()
        if t % 2 == 0:
            w = 1.0 if t == 2 else 1 - 0.7**2
            for name in before:
                average[name] = average[name] + w * (before[name] - average[name])
        for name, p in model.named_parameters():
            want = before[name] + blend * (average[name] - before[name]) if t % 4 == 0 else before[name]
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14)
        if t % 4 == 0 and blend == 1.0:
            assert torch.equal(model[0].weight, ema.shadow.tensors()["0.weight"])
    for bad in (dict(switch_every=3), dict(switch_every=0), dict(switch_blend=0.0), dict(switch_blend=1.5)):
        with pytest.raises(ValueError, match="switch"):
            polyak.EMA(model, decay=0.7, update_every=2, **{"switch_every": 4, **bad})


def test_multi_ema_skips_nonfinite_updates_in_every_average():
    model = net()
    multi = polyak.MultiEMA(model, decays=(0.5, 0.9), nonfinite="skip")
    multi.update()
    before = {name: {k: v.clone() for k, v in ema.state_dict()["shadow"].items()} for name, ema in multi.items()}
    with torch.no_grad():
        model[0].weight.fill_(float("inf"))
    multi.update()
    for name, ema in multi.items():
        assert ema.skipped_updates == 1 and ema.step == 2
        for key, value in ema.state_dict()["shadow"].items():
            if value.is_floating_point():
                assert torch.equal(value, before[name][key]), (name, key)
