"""A live target's own requires_grad flags, and the direction of a Switch EMA partial blend.

The target network of a DQN / BYOL / DINO setup must never require grad (its forward would build a graph, an
optimizer given ``model.parameters()`` of a wrapper would train it), whatever the user's module held and after
every update, load, swap, conversion and copy; the online model keeps its own flags. References: the flags set by
hand; Switch EMA's ``theta <- theta + blend * (average - theta)`` (Li et al., 2024) in a float64 loop.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

import polyak


def qnet(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)


def sgd_steps(model: nn.Module, steps: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(steps):
        x = torch.randn(8, 4, generator=gen, dtype=next(model.parameters()).dtype)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield


def flags(module: nn.Module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in module.named_parameters()}


def test_a_users_trainable_target_stops_requiring_grad_for_good():
    online = qnet()
    online[3].bias.requires_grad_(False)  # the online model's own choice, kept as it is
    online_flags = flags(online)
    mine = qnet()
    assert all(flags(mine).values())  # built like the model: trainable
    ema = polyak.EMA(online, tau=0.2, target=mine)
    assert ema.target is mine
    frozen = dict.fromkeys(online_flags, False)
    assert flags(mine) == frozen and flags(online) == online_flags

    def still() -> None:
        assert flags(mine) == frozen, "the target requires grad again"
        assert flags(online) == online_flags, "the online model's flags changed"

    for _ in sgd_steps(online, 3):
        ema.update()
        still()
    saved = copy.deepcopy(ema.state_dict())
    with ema.swapped(online):
        still()
    still()
    ema.copy_to(copy.deepcopy(online))
    clone = ema.averaged_model()
    assert not any(flags(clone).values())
    ema.load_state_dict(saved)
    still()
    mine.float()
    online.float()
    for _ in sgd_steps(online, 2):
        ema.update()
    still()
    out = mine(torch.randn(3, 4))
    assert not out.requires_grad  # no graph from the target's forward
    # Resumed into a fresh averager with another trainable module: that one is frozen too.
    other = qnet(torch.float32)
    resumed = polyak.EMA(online, tau=0.2, target=other)
    resumed.load_state_dict(ema.state_dict())
    assert not any(flags(other).values())


def test_a_copied_target_of_a_partly_frozen_model_requires_no_grad():
    online = qnet()
    online[0].requires_grad_(False)
    ema = polyak.EMA(online, decay=0.9, target="copy")
    assert not any(flags(ema.target).values())
    assert flags(online) == {"0.weight": False, "0.bias": False, "1.weight": True, "1.bias": True, "3.weight": True,
                             "3.bias": True}  # fmt: skip


def test_switch_blend_moves_the_model_toward_the_average():
    """blend = 0.25: the model keeps 3/4 of itself and takes 1/4 of the average (not the other way round)."""
    blend, decay = 0.25, 0.6
    model = qnet()
    ema = polyak.EMA(model, decay=decay, switch_every=3, switch_blend=blend)
    average = {name: p.detach().clone() for name, p in model.named_parameters()}
    for t, _ in enumerate(sgd_steps(model, 9), start=1):
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        ema.update()
        for name in average:
            average[name] = before[name].clone() if t == 1 else decay * average[name] + (1 - decay) * before[name]
        for name, p in model.named_parameters():
            want = 0.75 * before[name] + 0.25 * average[name] if t % 3 == 0 else before[name]
            torch.testing.assert_close(p.detach(), want, rtol=1e-12, atol=1e-14, msg=f"{name} at step {t}")
            if t % 3 == 0:  # strictly between, nearer the model's own value
                near = (p.detach() - before[name]).abs() <= (p.detach() - average[name]).abs()
                assert bool(near.all()), name
