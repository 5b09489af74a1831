"""Live averaged modules (target networks, teachers): EMA(target=...), tau, hard updates, compile, resume.

References are the RL libraries' update formulas re-implemented in float64 (Stable-Baselines3's polyak_update:
``target.mul_(1 - tau).add_(param, alpha=tau)``; DQN's hard update ``target.load_state_dict(online.state_dict())``
every N steps), not polyak's own output.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import polyak
from polyak.rules import ConstantDecay


def qnet(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 2)).to(dtype)


def train_steps(model: nn.Module, steps: int, *, seed: int = 1):
    """Yield after each of ``steps`` real SGD steps on random regression data."""
    gen = torch.Generator().manual_seed(seed)
    dtype = next(model.parameters()).dtype
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    for step in range(1, steps + 1):
        x = torch.randn(8, 4, generator=gen, dtype=dtype)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        yield step


def sb3_polyak_update(params, target_params, tau: float) -> None:
    """Stable-Baselines3's ``polyak_update`` (re-implemented, float64 reference)."""
    with torch.no_grad():
        for param, target_param in zip(params, target_params, strict=True):
            target_param.mul_(1 - tau)
            target_param.add_(param, alpha=tau)


def test_tau_is_one_minus_decay():
    model = qnet()
    assert polyak.EMA(model, tau=0.005).rule == ConstantDecay(0.995)
    assert polyak.EMA(model, tau=1).rule == ConstantDecay(0.0)
    for bad in (0, -0.1, 1.5, float("nan"), True, "0.1"):
        with pytest.raises((ValueError, TypeError), match=r"tau: expected a finite number in \(0, 1\]"):
            polyak.EMA(model, tau=bad)
    with pytest.raises(ValueError, match="exactly one of decay, tau"):
        polyak.EMA(model, decay=0.99, tau=0.01)


@pytest.mark.parametrize("target_kind", ["copy", "module"])
def test_soft_update_matches_sb3(target_kind):
    """SAC/TD3/DDPG target: params by polyak_update with tau, BatchNorm stats copied (SB3 uses tau=1 for them)."""
    online = qnet()
    reference = copy.deepcopy(online)
    mine = qnet() if target_kind == "module" else "copy"
    if target_kind == "module":
        with torch.no_grad():
            for p in mine.parameters():
                p.add_(1.0)  # adoption overwrites whatever the user's module held
    ema = polyak.EMA(online, tau=0.005, target=mine, buffers="copy")
    if target_kind == "module":
        assert ema.target is mine
    tau = 0.005
    for _ in train_steps(online, 60):
        ema.update()
        sb3_polyak_update(online.parameters(), reference.parameters(), tau)
        running = [b for b in online.buffers() if b.is_floating_point()]  # SB3's "running_" statistics
        sb3_polyak_update(running, [b for b in reference.buffers() if b.is_floating_point()], 1.0)
        reference[1].num_batches_tracked.copy_(online[1].num_batches_tracked)
    for (name, got), want in zip(ema.target.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14, msg=name)
    # the target moved far from its start and is not the online model
    assert not torch.equal(ema.target[0].weight, online[0].weight)


def test_hard_update_every_n_matches_dqn():
    online, n = qnet(), 7
    reference = copy.deepcopy(online)
    ema = polyak.EMA(online, tau=1.0, update_every=n, target="copy")
    for step in train_steps(online, 30):
        ema.update()
        if step % n == 0:
            reference.load_state_dict(online.state_dict())
        for got, want in zip(ema.target.state_dict().values(), reference.state_dict().values(), strict=True):
            assert torch.equal(got, want)  # copies are bit-exact
    assert ema.num_updates == 30 // n


def test_soft_update_every_n_keeps_the_horizon():
    """tau per optimizer step: an update every k steps of a model held constant equals k per-step updates."""
    online = qnet()
    every = polyak.EMA(online, tau=0.05, target="copy")
    sparse = polyak.EMA(online, tau=0.05, update_every=4, target="copy")
    for _ in train_steps(online, 24):
        for _ in range(4):  # the model holds still for 4 steps
            every.update()
            sparse.update()
    assert sparse.num_updates == 24 and every.num_updates == 96
    for got, want in zip(sparse.target.parameters(), every.target.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)


def test_target_is_a_live_module():
    online = qnet(torch.float32)
    ema = polyak.EMA(online, decay=0.9, target="copy")
    target = ema.target
    assert target is not online and isinstance(target, nn.Sequential)
    assert all(not p.requires_grad for p in target.parameters())
    assert all(p.requires_grad for p in online.parameters())
    assert set(target.state_dict()) == set(online.state_dict())
    target.eval()
    pointers = [t.data_ptr() for t in target.state_dict().values()]
    shadow_before = {k: v.clone() for k, v in target.state_dict().items()}
    for _ in train_steps(online, 5):
        ema.update()
    assert not target.training and online.training  # modes are the target's own
    assert [t.data_ptr() for t in target.state_dict().values()] == pointers  # updated in place
    assert not torch.equal(target[0].weight, shadow_before["0.weight"])
    assert target.state_dict()["1.num_batches_tracked"] == online.state_dict()["1.num_batches_tracked"]
    # the target runs forward without building a graph, and the online model still trains
    out = target(torch.randn(3, 4))
    assert not out.requires_grad
    # swapped / copy_to / averaged_model read the same average
    with ema.swapped(online):
        for got, want in zip(online.parameters(), target.parameters(), strict=True):
            assert torch.equal(got, want)
    clone = ema.averaged_model()
    for got, want in zip(clone.parameters(), target.parameters(), strict=True):
        assert torch.equal(got, want)


def test_frozen_parameters_follow_the_online_model():
    """Which tensors are averaged follows the online model's requires_grad, not the target's."""
    online = qnet()
    online[0].requires_grad_(False)
    mine = qnet()
    mine.requires_grad_(False)  # the user froze their target already
    ema = polyak.EMA(online, tau=0.5, target=mine)
    modes = ema.shadow.modes()
    assert modes["0.weight"] == "copy" and modes["3.weight"] == "average"


def test_adoption_errors():
    online = qnet()
    wrong_shape = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).double()
    with pytest.raises(ValueError, match=r"target tensor '0.weight' has shape \(8, 4\).*\(16, 4\)"):
        polyak.EMA(online, tau=0.1, target=wrong_shape)
    with pytest.raises(ValueError, match=r"target tensor '0.weight' .*dtype torch.float32"):
        polyak.EMA(online, tau=0.1, target=qnet(torch.float32))
    missing = nn.Sequential(nn.Linear(4, 16), nn.Identity(), nn.ReLU(), nn.Linear(16, 2)).double()
    with pytest.raises(ValueError, match=r"lacks '1.weight'"):
        polyak.EMA(online, tau=0.1, target=missing)
    with pytest.raises(ValueError, match="the online model itself"):
        polyak.EMA(online, tau=0.1, target=online)
    with pytest.raises(ValueError, match='target must be "copy"'):
        polyak.EMA(online, tau=0.1, target="deepcopy")
    with pytest.raises(TypeError, match='target must be "copy"'):
        polyak.EMA(online, tau=0.1, target=3)
    with pytest.raises(ValueError, match="lazy=True"):
        polyak.EMA(online, tau=0.1, target="copy", lazy=True)


@pytest.mark.parametrize("dtype", [None, torch.float32])
def test_a_bf16_target_keeps_a_float32_master_and_runs_in_bf16(dtype):
    """The target network stays in the model's dtype; its average is kept in float32 (the default for a bf16
    model, or asked for) and copied into it after every update, so it cannot stall."""
    online = qnet(torch.bfloat16)
    ema = polyak.EMA(online, tau=0.01, target="copy", dtype=dtype)
    reference = {k: v.double() for k, v in online.state_dict().items()}
    for _ in train_steps(online, 10):
        ema.update()
        for name, p in online.named_parameters():
            reference[name].mul_(0.99).add_(p.double(), alpha=0.01)
    assert ema.target[0].weight.dtype == torch.bfloat16
    master = ema.state_dict()["shadow"]
    for name, p in ema.target.named_parameters():
        assert master[name].dtype == torch.float32
        torch.testing.assert_close(master[name].double(), reference[name], rtol=1e-6, atol=1e-6)
        assert torch.equal(p, master[name].to(torch.bfloat16))  # the target holds the master, rounded once


def test_a_stochastically_rounded_bf16_average_of_a_bf16_target_is_kept_apart():
    """A bf16 target and a bf16 average rounded stochastically: the average needs storage of its own (its random
    bits walk one flat buffer), so the target receives a copy after every update instead of being the storage;
    the average follows the float64 soft update to within a few bf16 spacings (one rounding per update,
    each under a spacing, decaying by 1 - tau)."""
    torch.manual_seed(0)
    online = qnet(torch.bfloat16)
    ema = polyak.EMA(online, tau=0.1, target="copy", dtype=torch.bfloat16, rounding="stochastic")
    reference = {k: v.double() for k, v in online.state_dict().items()}
    for _ in train_steps(online, 10):
        ema.update()
        for name, p in online.named_parameters():
            reference[name].mul_(0.9).add_(p.double(), alpha=0.1)
    master = ema.state_dict()["shadow"]
    for name, p in ema.target.named_parameters():
        assert master[name].dtype == torch.bfloat16 and torch.equal(p, master[name])
        assert p.data_ptr() != master[name].data_ptr()  # a copy, not the storage
        spacing = 2.0 ** (math.floor(math.log2(reference[name].abs().max())) - 7)  # bf16's at the tensor's largest
        torch.testing.assert_close(master[name].double(), reference[name], rtol=0, atol=4 * spacing)


def test_compiled_target_does_not_recompile():
    online = qnet(torch.float32)
    ema = polyak.EMA(online, tau=0.1, target="copy")
    ema.target.eval()
    compiled = torch.compile(ema.target, backend="eager")
    x = torch.randn(5, 4)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        first = compiled(x)
        outputs = []
        for _ in train_steps(online, 6):
            ema.update()
            outputs.append((compiled(x), ema.target(x)))
    for got, want in outputs:
        torch.testing.assert_close(got, want)  # the compiled forward reads the updated weights
    assert not torch.equal(outputs[-1][0], first)


def snapshots(steps: int) -> list[dict[str, torch.Tensor]]:
    """The states of a real training run after each step."""
    online = qnet()
    return [copy.deepcopy(online.state_dict()) for _ in train_steps(online, steps)]


def test_target_resume_and_start_step():
    """A target resumes exactly; with start_step it starts from the model at the step before averaging."""
    states = snapshots(12)
    online, reference = qnet(), qnet()
    straight = polyak.EMA(online, tau=0.2, target="copy", start_step=3)
    saved = {}
    for step, state in enumerate(states, start=1):
        online.load_state_dict(state)
        straight.update()
        if step == 3:
            reference.load_state_dict(state)
        elif step > 3:
            sb3_polyak_update(online.parameters(), reference.parameters(), 0.2)
            sb3_polyak_update(
                [b for b in online.buffers() if b.is_floating_point()],
                [b for b in reference.buffers() if b.is_floating_point()],
                0.2,
            )
        if step == 6:
            saved = copy.deepcopy(straight.state_dict())
    for got, want in zip(straight.target.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-14)
    # resume at step 6 into a fresh user-built target and replay the rest
    online2 = qnet()
    resumed = polyak.EMA(online2, tau=0.2, target=qnet(), start_step=3)
    resumed.load_state_dict(saved)
    for state in states[6:]:
        online2.load_state_dict(state)
        resumed.update()
    for got, want in zip(resumed.target.state_dict().values(), straight.target.state_dict().values(), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    shadow_only = polyak.EMA(qnet(), tau=0.2, start_step=3)
    with pytest.raises(ValueError, match="target"):
        shadow_only.load_state_dict(saved)


def test_target_update_costs_no_sync_and_no_allocation():
    from polyak.commands.bench import Census

    online = qnet(torch.float32)
    ema = polyak.EMA(online, tau=0.005, target="copy")
    ema.update()
    with Census() as census:
        for _ in range(3):
            ema.update()
    assert census.syncs == 0
    assert census.allocated == 0


def test_target_skips_nonfinite_updates():
    online = qnet(torch.float32)
    ema = polyak.EMA(online, tau=0.1, target="copy", nonfinite="skip")
    for _ in train_steps(online, 2):
        ema.update()
    before = {k: v.clone() for k, v in ema.target.state_dict().items()}
    with torch.no_grad():
        online[0].weight[0, 0] = float("nan")
    ema.update()
    assert ema.skipped_updates == 1
    for key, value in ema.target.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, before[key]), key
    with pytest.raises(RuntimeError, match=r"'0\.weight' holds inf or NaN"):  # the starting copy is checked too
        polyak.EMA(online, tau=0.1, target="copy", nonfinite="raise")
    raising = polyak.EMA(qnet(torch.float32), tau=0.1, target="copy", nonfinite="raise")
    with pytest.raises(RuntimeError, match=r"'0\.weight' holds inf or NaN"):
        raising.update(online)


def test_target_converted_after_construction_keeps_the_average():
    """target.double() replaces the target's tensors; the average follows them instead of going stale."""
    online = qnet(torch.float32)
    ema = polyak.EMA(online, tau=0.5, target="copy")
    reference = copy.deepcopy(online).double()
    for _ in train_steps(online, 2):
        ema.update()
        sb3_polyak_update(online.parameters(), reference.parameters(), 0.5)
    ema.target.double()
    online.double()
    for _ in train_steps(online, 3):
        ema.update()
        sb3_polyak_update(online.parameters(), reference.parameters(), 0.5)
    assert ema.target[0].weight.dtype == torch.float64
    for got, want in zip(ema.target.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
