"""BEMA: against a float64 simulation of the formulas, swap/copy/state, and its smaller bias on a noisy quadratic."""

from __future__ import annotations

import io

import pytest
import torch
from models import SmallCNN, train_steps
from torch import nn

import polyak
from polyak.shadow import Shadow


def simulate(steps: int, burn_in: int, every: int, kappa=0.5, eta=0.2, gamma=1.0, rho=10.0):
    """Train a SmallCNN under a BEMA; keep a float64 reference of the formulas by hand.

    Returns the model, the BEMA and the reference output (EMA + alpha (theta - theta_0)) for averaged tensors.
    """
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    bema = polyak.BEMA(model, kappa=kappa, eta=eta, gamma=gamma, rho=rho, burn_in=burn_in, update_every=every)
    averaged = [name for name, mode in bema.shadow.modes().items() if mode == "average"]

    def theta() -> dict[str, torch.Tensor]:
        state = model.state_dict()
        return {name: state[name].double().clone() for name in averaged}

    ref = {"ema": theta(), "anchor": theta(), "alpha": None, "step": 0}

    def after_step():
        bema.update()
        ref["step"] += 1
        s = ref["step"] - burn_in
        if s == 0:
            ref["ema"], ref["anchor"] = theta(), theta()
        if s >= 1 and s % every == 0:
            beta = (rho + gamma * s) ** -kappa
            now = theta()
            for name in averaged:
                ref["ema"][name] = (1 - beta) * ref["ema"][name] + beta * now[name]
            ref["alpha"] = 0.0 if eta is None else (rho + gamma * s) ** -eta

    train_steps(model, optimizer, steps, after_step=after_step)
    now = theta()
    # The correction is for the weights; averaged buffers (BatchNorm statistics) are the plain EMA.
    params = dict(model.named_parameters())
    output = {
        name: ref["ema"][name] + (ref["alpha"] * (now[name] - ref["anchor"][name]) if name in params else 0)
        for name in averaged
    }
    return model, bema, output


@pytest.mark.parametrize(
    ("burn_in", "every", "schedule"),
    [
        (0, 1, {}),
        (5, 3, {}),
        (2, 1, {"gamma": 2.5, "rho": 3.0, "kappa": 0.7, "eta": 0.3}),  # a gamma or rho swapped would show
        (0, 2, {"gamma": 0.25, "rho": 1.5, "eta": None}),
    ],
)
def test_output_matches_float64_simulation(burn_in, every, schedule):
    model, bema, expected = simulate(40, burn_in, every, **schedule)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with bema.swapped() as swapped:
        state = {**dict(swapped.named_parameters()), **dict(swapped.named_buffers())}
        for name, value in expected.items():
            torch.testing.assert_close(state[name].double(), value, rtol=1e-5, atol=1e-6, msg=name)
        # Copied tensors (the integer BatchNorm counters) hold the model's value at the last update.
        assert int(state["features.1.num_batches_tracked"]) == burn_in + bema.last_update_step
    after = model.state_dict()
    for name, value in before.items():
        assert torch.equal(after[name], value), f"{name} not restored exactly after swap"
    copy = bema.averaged_model()
    for name, value in expected.items():
        torch.testing.assert_close(copy.state_dict()[name].double(), value, rtol=1e-5, atol=1e-6)
    bema.copy_to()
    for name, value in expected.items():
        torch.testing.assert_close(model.state_dict()[name].double(), value, rtol=1e-5, atol=1e-6)


def test_memory_is_two_copies_and_output_not_stored():
    model = SmallCNN()
    bema = polyak.BEMA(model)
    train_steps(model, torch.optim.SGD(model.parameters(), lr=0.05), 3, after_step=bema.update)
    with bema.swapped():
        pass
    held = [value for value in vars(bema).values() if isinstance(value, (Shadow, torch.Tensor))]
    assert held == [bema.shadow] and bema.shadow.count == 2  # the EMA and theta_0, and nothing else

    def storages(*indices: int) -> dict[int, int]:
        tensors = [t for k in indices for t in bema.shadow.tensors(k).values()]
        return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}

    one = sum(storages(0).values())
    assert one == sum(t.numel() * t.element_size() for t in bema.shadow.tensors(0).values())  # no slack
    assert sum(storages(0, 1).values()) == 2 * one  # two copies, apart


def test_state_dict_resumes_exactly():
    _, full, _ = simulate(30, 2, 2)
    torch.manual_seed(0)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    current = {"bema": polyak.BEMA(model, burn_in=2, update_every=2), "calls": 0}

    def after_step():
        current["bema"].update()
        current["calls"] += 1
        if current["calls"] == 12:  # "restart": a new BEMA loads the saved state and carries on
            buffer = io.BytesIO()
            torch.save(current["bema"].state_dict(), buffer)
            buffer.seek(0)
            current["bema"] = polyak.BEMA(model, burn_in=2, update_every=2)
            current["bema"].load_state_dict(torch.load(buffer))

    train_steps(model, optimizer, 30, after_step=after_step)
    resumed = current["bema"]
    for k in (0, 1):  # the EMA and theta_0
        for name, value in full.shadow.tensors(k).items():
            assert torch.equal(resumed.shadow.tensors(k)[name], value), name
    assert (resumed.step, resumed.num_updates) == (full.step, full.num_updates)
    with pytest.raises(ValueError, match="burn_in"):
        polyak.BEMA(model, burn_in=3, update_every=2).load_state_dict(resumed.state_dict())


def test_bias_smaller_than_ema_on_noisy_quadratic():
    """SGD on 0.5 |theta|^2 with gradient noise, slowly contracting from theta = 1 towards the optimum 0.

    Each coordinate is an independent run; the mean over 4096 coordinates estimates the bias (the standard
    error is ~4e-4). The EMA lags behind the iterate; BEMA's correction moves it towards the optimum.
    """
    generator = torch.Generator().manual_seed(0)
    model = nn.Linear(4096, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    bema = polyak.BEMA(model)
    ema = polyak.BEMA(model, eta=None)  # the same EMA without the correction
    lr = 1e-3
    for _ in range(2000):
        with torch.no_grad():
            noise = torch.randn(model.weight.shape, generator=generator)
            model.weight.sub_(lr * (model.weight + noise))
        bema.update()
        ema.update()
    with bema.swapped() as m:
        bias_bema = m.weight.double().mean().abs().item()
    with ema.swapped() as m:
        bias_ema = m.weight.double().mean().abs().item()
    assert bias_ema > 0.1  # the EMA is measurably biased here...
    assert bias_bema < 0.5 * bias_ema  # ...and BEMA at least halves it


def test_errors():
    model = SmallCNN()
    with pytest.warns(UserWarning, match="no update yet"), polyak.BEMA(model).swapped() as built:
        assert built is model  # the model as built: the EMA and theta_0 are both its copy
    with pytest.raises(ValueError, match="rho"):
        polyak.BEMA(model, rho=0.0, gamma=0.5)
    with pytest.raises(ValueError, match="update_every"):
        polyak.BEMA(model, update_every=0)
    bema = polyak.BEMA(model)
    bema.update()
    with bema.swapped(), pytest.raises(RuntimeError, match="swapped"):
        bema.update()
    ema = polyak.EMA(model, decay=0.9)
    ema.update()
    with ema.swapped(), pytest.raises(RuntimeError, match="still open"):  # another averager's swap
        bema.copy_to()
    with bema.swapped():
        with pytest.warns(UserWarning, match="swapped"):
            state = model.state_dict()
        assert polyak.is_swapped_state_dict(state)
        with pytest.raises(RuntimeError, match="still open"):
            ema.copy_to()


def test_batchnorm_statistics_are_averaged_not_extrapolated():
    """A running variance that fell fast would be extrapolated below zero; BEMA keeps buffers at their EMA."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    bema = polyak.BEMA(model, burn_in=0)
    bn = model[1]
    for _ in range(5):
        with torch.no_grad():
            bn.running_var.mul_(0.01)  # the statistics collapse
            model[0].weight.add_(1.0)
        bema.update()
    with bema.swapped() as swapped:
        assert (swapped[1].running_var > 0).all()
        torch.testing.assert_close(swapped[1].running_var, bema.shadow.tensors(0)["1.running_var"])
        extrapolated = swapped[0].weight.detach().clone()
    assert not torch.equal(extrapolated, bema.shadow.tensors(0)["0.weight"])  # the weights are still corrected
