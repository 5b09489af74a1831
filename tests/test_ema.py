"""The EMA / SWA front ends: step counting, update_every, start_step, hooks, swap, checkpoints."""

from __future__ import annotations

import io

import pytest
import torch
from models import FrozenBackbone, SmallCNN, TinyTransformer, train_steps
from torch import nn

import polyak
from polyak import rules


def reference_run(factory, steps: int, rule: rules.Rule, every: int = 1, start: int = 0):
    """Train with a float64 average maintained by hand; returns (model, averaged float tensors)."""
    torch.manual_seed(0)
    model = factory()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    avg: dict[str, torch.Tensor] = {}
    state = {"step": 0, "last": 0}

    def after_step():
        state["step"] += 1
        t = state["step"] - start
        if t < 1 or t % every:
            return
        w = rule.weight(t, t - state["last"])
        state["last"] = t
        for name, p in model.named_parameters():
            if name not in avg:
                avg[name] = p.detach().double().clone()
            avg[name] += w * (p.detach().double() - avg[name])

    train_steps(model, optimizer, steps, after_step=after_step)
    return avg


@pytest.mark.parametrize(("every", "start"), [(1, 0), (4, 0), (3, 5)])
@pytest.mark.parametrize("make", [lambda m, **kw: polyak.EMA(m, decay=0.9, **kw), lambda m, **kw: polyak.SWA(m, **kw)])
def test_front_end_matches_float64_loop(make, every, start):
    torch.manual_seed(0)
    model = SmallCNN()
    averager = make(model, update_every=every, start_step=start)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    averager.attach(optimizer)
    train_steps(model, optimizer, 23)
    expected = reference_run(SmallCNN, 23, averager.rule, every, start)
    assert averager.step == 23
    assert averager.num_updates == (23 - start) // every
    for name, value in expected.items():
        torch.testing.assert_close(averager.shadow.tensors()[name].double(), value, rtol=1e-6, atol=1e-6)


def test_update_every_does_work_only_on_kth_call():
    model = nn.Linear(3, 3)
    ema = polyak.EMA(model, decay=0.99, update_every=5)
    for _ in range(4):
        ema.update()
    assert ema.num_updates == 0
    ema.update()
    assert ema.num_updates == 1


def test_swapped_and_copy_to():
    torch.manual_seed(0)
    model = TinyTransformer()
    ema = polyak.EMA(model, half_life=3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_steps(model, optimizer, 5, after_step=ema.update)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    averaged = ema.averaged_model()
    with ema.swapped(model):
        for name, value in averaged.state_dict().items():
            assert torch.equal(model.state_dict()[name], value)
        with pytest.raises(RuntimeError, match="swapped"):
            ema.update()
        with pytest.raises(RuntimeError, match="swapped"), ema.swapped(model):
            pass
    assert all(torch.equal(model.state_dict()[k], v) for k, v in trained.items())
    ema.copy_to(model)
    assert torch.equal(model.embed.weight, ema.shadow.tensors()["embed.weight"])
    assert model.lm_head.weight is model.embed.weight  # still tied


def test_resume_is_bit_exact():
    def run(split: int | None):
        torch.manual_seed(0)
        model = FrozenBackbone()
        optimizer = torch.optim.SGD(model.head.parameters(), lr=0.1)
        ema = polyak.EMA(model, rule=rules.PowerWarmup(0.99), update_every=2)
        if split is None:
            train_steps(model, optimizer, 20, after_step=ema.update)
            return ema
        train_steps(model, optimizer, split, after_step=ema.update)
        buffer = io.BytesIO()
        torch.save({"model": model.state_dict(), "opt": optimizer.state_dict(), "ema": ema.state_dict()}, buffer)
        buffer.seek(0)
        saved = torch.load(buffer, weights_only=True)
        torch.manual_seed(123)
        fresh = FrozenBackbone()
        fresh.load_state_dict(saved["model"])
        fresh_opt = torch.optim.SGD(fresh.head.parameters(), lr=0.1)
        fresh_opt.load_state_dict(saved["opt"])
        resumed = polyak.EMA(fresh, rule=rules.PowerWarmup(0.99), update_every=2)
        resumed.load_state_dict(saved["ema"])
        # the remaining steps draw the same batches as the uninterrupted run
        generator = torch.Generator().manual_seed(0)
        from models import batch_for

        for _ in range(split):
            batch_for(fresh, generator)
        for _ in range(20 - split):
            loss = fresh(batch_for(fresh, generator)).square().mean()
            fresh_opt.zero_grad()
            loss.backward()
            fresh_opt.step()
            resumed.update()
        return resumed

    whole, resumed = run(None), run(7)
    assert whole.step == resumed.step and whole.num_updates == resumed.num_updates
    for name, value in whole.shadow.tensors().items():
        assert torch.equal(value, resumed.shadow.tensors()[name]), name


def test_load_refuses_other_settings_before_changing_anything():
    model = SmallCNN()
    ema = polyak.EMA(model, decay=0.9)
    ema.update()
    state = ema.state_dict()
    other = polyak.EMA(SmallCNN(), decay=0.99)
    before = {k: v.clone() for k, v in other.shadow.tensors().items()}
    with pytest.raises(ValueError, match="rule="):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="update_every="):
        polyak.EMA(SmallCNN(), decay=0.9, update_every=2).load_state_dict(state)
    with pytest.raises(ValueError, match="kind="):
        polyak.SWA(SmallCNN()).load_state_dict(state)
    with pytest.raises(ValueError, match="not a polyak averager state"):
        other.load_state_dict(model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in other.shadow.tensors().items())


def test_grad_scaler_skipped_steps_are_not_averaged():
    model = nn.Linear(4, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    ema = polyak.EMA(model, decay=0.5)
    ema.attach(optimizer)
    loss = model(torch.randn(3, 4)).sum()
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()
    assert ema.num_updates == 1
    optimizer.zero_grad()
    model.weight.grad = torch.full_like(model.weight, float("inf"))
    model.bias.grad = torch.zeros_like(model.bias)
    scaler.step(optimizer)  # skipped: inf gradient
    assert ema.num_updates == 1 and ema.step == 1


def test_constructor_errors():
    with pytest.raises(ValueError, match="exactly one of decay, tau, half_life or rule"):
        polyak.EMA(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="exactly one"):
        polyak.EMA(nn.Linear(2, 2), decay=0.9, half_life=10)
    with pytest.raises(ValueError, match="update_every"):
        polyak.EMA(nn.Linear(2, 2), decay=0.9, update_every=0)
    with pytest.raises(TypeError, match=r"torch.nn.Module"):
        polyak.EMA([torch.zeros(2)], decay=0.9)  # type: ignore[arg-type]


def test_uncompensated_cadence_applies_the_plain_decay_every_kth_step() -> None:
    """compensate=False: the weight of one step (1 - d), once every k steps, as ema-pytorch and SB3 apply it."""
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    ema = polyak.EMA(model, decay=0.9, update_every=3, compensate=False)
    reference = None
    for step in range(1, 13):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
        if step % 3 == 0:
            value = model.weight.detach().double()
            reference = value.clone() if reference is None else 0.9 * reference + 0.1 * value
    assert reference is not None
    torch.testing.assert_close(ema.shadow.tensors()["weight"].double(), reference, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="compensate=False"):
        polyak.SWA(model, compensate=False)
