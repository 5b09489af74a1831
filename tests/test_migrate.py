"""polyak.migrate: peers' states continue in polyak with equal numbers; anything that does not fit is refused whole.

The numbers are compared with the real peer packages (each skipped with its name when missing) or, for SB3's
float32 target update, with a float64 recurrence written here.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import polyak


def _setup(seed: int = 0, dtype: torch.dtype = torch.float64) -> tuple[nn.Module, Any]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    inputs, targets = torch.randn(32, 4, dtype=dtype), torch.randn(32, 2, dtype=dtype)

    def train_step() -> None:
        optimizer.zero_grad()
        nn.functional.mse_loss(model(inputs), targets).backward()
        optimizer.step()

    return model, train_step


def _snapshot(averager: polyak.EMA) -> dict[str, Any]:
    state = averager.state_dict()
    return {k: ({n: t.clone() for n, t in v.items()} if k == "shadow" else v) for k, v in state.items()}


def _assert_unchanged(averager: polyak.EMA, before: dict[str, Any]) -> None:
    after = averager.state_dict()
    assert {k: v for k, v in after.items() if k != "shadow"} == {k: v for k, v in before.items() if k != "shadow"}
    for name, value in before["shadow"].items():
        assert torch.equal(after["shadow"][name], value), name


def test_damaged_partial_and_mismatched_states_are_refused_in_one_line_changing_nothing() -> None:
    model, train_step = _setup()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    averager = polyak.EMA(model, decay=0.9)
    for _ in range(3):
        train_step()
        peer.update_parameters(model)
        averager.update()
    good = peer.state_dict()
    before = _snapshot(averager)
    weight = "module.0.weight"
    params = [p.detach().clone() for p in model.parameters()]
    cases: list[tuple[Any, dict[str, Any], str]] = [
        ({k: v for k, v in good.items() if k != weight}, {}, "has no tensor '0.weight'"),
        (good | {weight: torch.zeros(3, 3, dtype=torch.float64)}, {}, r"'0.weight' has shape \(3, 3\)"),
        (good | {weight: torch.full((8, 4), float("nan"), dtype=torch.float64)}, {}, "inf or NaN"),
        (good | {"module.9.weight": torch.zeros(1)}, {}, "'9.weight', which the model does not have"),
        (good | {"n_averaged": torch.tensor(-1)}, {}, "n_averaged is -1, expected an int >= 0"),
        ({"weights": torch.zeros(1)}, {}, "cannot tell which library"),
        ({"shadow_params": params, "num_updates": 3, "decay": 0.9, "optimization_step": 3}, {}, "any of"),
        ({"shadow_params": params[:-1], "num_updates": 3, "decay": 0.9}, {}, "holds 5 tensors but the model has 6"),
        ({"shadow_params": params[::-1], "num_updates": 3, "decay": 0.9}, {}, "tensor 0 has shape"),
        ({"shadow_params": params[:2], "decay": 0.9}, {"source": "torch_ema"}, "not a torch_ema"),
        ({"shadow_params": params, "optimization_step": 3, "decay": 0.9}, {}, "lacks 'min_decay'"),
        (good, {"step": 0}, "has made no update yet"),
        (good, {"source": "diffusers"}, "not a diffusers EMAModel"),
        (good, {"source": "keras"}, "source must be 'auto' or one of"),
        (good, {"settings": AveragedModel(model)}, "does not continue the averaged_model schedule"),
    ]
    for state, kwargs, message in cases:
        with pytest.raises((ValueError, TypeError), match=message) as error:
            polyak.migrate.load(averager, state, **kwargs)
        assert "\n" not in str(error.value)
        _assert_unchanged(averager, before)
    with pytest.raises(TypeError, match=r"polyak\.EMA or polyak\.SWA"):
        polyak.migrate.load(polyak.MultiEMA(model, decays=(0.9, 0.99)), good)


@pytest.mark.parametrize("lazy", [False, True])
def test_averaged_model_ema_continues_in_a_plain_or_lazy_averager(lazy: bool) -> None:
    model, train_step = _setup()
    peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    for _ in range(5):
        train_step()
        peer.update_parameters(model)
    averager = polyak.EMA(model, decay=0.9, lazy=lazy)
    assert polyak.migrate.load(averager, copy.deepcopy(peer.state_dict()), settings=peer) == "averaged_model"
    assert (averager.step, averager.num_updates) == (5, 5)
    for _ in range(5):
        train_step()
        peer.update_parameters(model)
        averager.update()
    for name, value in peer.module.state_dict().items():
        torch.testing.assert_close(averager.shadow.state_dict()[name], value, rtol=0, atol=1e-12)


# ---------------------------------------------------------------------- compensate=False against the real peers


@pytest.mark.parametrize(
    ("every", "after", "warmup"),
    [(10, 100, True), (10, 100, False), (4, 9, True), (1, 5, True), (5, 2, False)],
)
def test_uncompensated_cadence_reproduces_ema_pytorch(every: int, after: int, warmup: bool) -> None:
    """ema-pytorch's update_every / update_after_step / warm-up, from scratch and after a migration."""
    ema_pytorch = pytest.importorskip("ema_pytorch", reason="ema-pytorch is not installed (polyak[migrate])")
    model, train_step = _setup()
    # warm-up off: a power so large that the decay is clamped to beta from its first blend on
    peer = ema_pytorch.EMA(model, beta=0.95, update_after_step=after, update_every=every, power=0.7 if warmup else 60)
    ours = polyak.EMA(model, **polyak.migrate.options(peer))
    compensated = polyak.EMA(model, **(polyak.migrate.options(peer) | {"compensate": True}))
    exact_from_scratch = after >= every or every == 1  # else ema-pytorch's first copy lies off polyak's grid
    for _ in range(120):
        train_step()
        peer.update()
        ours.update()
        compensated.update()
    resumed = polyak.EMA(model, **polyak.migrate.options(peer))
    polyak.migrate.load(resumed, peer.state_dict(), settings=peer)
    for _ in range(60):
        train_step()
        peer.update()
        resumed.update()
        ours.update()
    # ema-pytorch computes its decay in float32 (~6e-8 relative): the averages agree to ~1e-8 on this model
    expected = peer.ema_model.state_dict()
    for name, value in resumed.shadow.tensors().items():
        torch.testing.assert_close(value, expected[name], rtol=0, atol=1e-7)
        if exact_from_scratch:
            torch.testing.assert_close(ours.shadow.tensors()[name], expected[name], rtol=0, atol=1e-7)
    if every > 1:  # the default, compensated cadence gives other numbers: the comparison can fail
        gap = (compensated.shadow.tensors()["0.weight"] - expected["0.weight"]).abs().max()
        assert gap > 1e-4


def test_uncompensated_cadence_reproduces_sb3_target_update_nearer_float64() -> None:
    """SB3's polyak_update every k-th step (its DQN cadence) on a float32 target, against a float64 recurrence."""
    utils = pytest.importorskip("stable_baselines3.common.utils", reason="stable-baselines3 is not installed")
    model, train_step = _setup(dtype=torch.float32)
    every, tau = 3, 0.2
    sb3_target = copy.deepcopy(model)
    ours = polyak.EMA(model, tau=tau, update_every=every, compensate=False, target="copy")
    reference = [p.detach().double().clone() for p in model.parameters()]
    for calls in range(1, 301):
        train_step()
        ours.update()
        if calls % every == 0:  # DQN._on_step: self._n_calls % target_update_interval == 0
            utils.polyak_update(model.parameters(), sb3_target.parameters(), tau)
            for r, p in zip(reference, model.parameters(), strict=True):
                r.mul_(1 - tau).add_(p.detach().double(), alpha=tau)
    assert ours.target is not None
    for r, theirs, mine in zip(reference, sb3_target.parameters(), ours.target.parameters(), strict=True):
        # float32 blends: each update rounds once or twice (~6e-8 relative); 100 updates of values ~1
        assert (mine.double() - r).abs().max() <= 2e-6
        assert (theirs.double() - r).abs().max() <= 2e-6
        torch.testing.assert_close(mine, theirs, rtol=0, atol=2e-6)


def test_uncompensated_cadence_reproduces_lightning_every_n_steps() -> None:
    """EMAWeightAveraging(update_every_n_steps=3, update_starting_at_step=4) beside polyak's callback."""
    callbacks = pytest.importorskip("lightning.pytorch.callbacks", reason="lightning is not installed")
    if not hasattr(callbacks, "EMAWeightAveraging"):
        pytest.skip("lightning without EMAWeightAveraging (< 2.6)")
    import lightning.pytorch as pl
    from torch.utils.data import DataLoader, TensorDataset

    from polyak.integrations.lightning import AveragingCallback

    class Net(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Linear(4, 2).double()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return nn.functional.mse_loss(self.net(batch[0]), batch[1])

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(64, 4).double(), torch.randn(64, 2).double()), batch_size=8)
    peer = callbacks.EMAWeightAveraging(decay=0.9, update_every_n_steps=3, update_starting_at_step=4)
    options = polyak.migrate.options(peer)
    assert options == {"decay": 0.9, "update_every": 3, "start_step": 4, "compensate": False}
    ours = AveragingCallback(lambda m: polyak.EMA(m, **options), evaluate=False)
    module = Net()
    pl.Trainer(
        max_steps=40,
        callbacks=[peer, ours],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
    ).fit(module, data)
    for name, value in module.state_dict().items():  # Lightning copies its average into the model at the end
        torch.testing.assert_close(ours.averager.shadow.state_dict()[name], value, rtol=0, atol=1e-12)


def test_diffusers_default_warmup_continues_as_rational_warmup() -> None:
    training_utils = pytest.importorskip("diffusers.training_utils", reason="diffusers is not installed")
    model, train_step = _setup()
    peer = training_utils.EMAModel(model.parameters(), decay=0.99, update_after_step=3)
    for _ in range(20):
        train_step()
        peer.step(model.parameters())
    state = copy.deepcopy(peer.state_dict())
    averager = polyak.EMA(model, **polyak.migrate.options(state))
    assert isinstance(averager.rule, polyak.rules.RationalWarmup) and averager.start_step == 3
    polyak.migrate.load(averager, state)
    with pytest.raises(ValueError, match="does not continue the diffusers schedule"):
        polyak.migrate.load(polyak.EMA(model, decay=0.99, start_step=3), state)
    for _ in range(20):
        train_step()
        peer.step(model.parameters())
        averager.update()
    for (name, _), shadow in zip(model.named_parameters(), peer.shadow_params, strict=True):
        torch.testing.assert_close(averager.shadow.tensors()[name], shadow, rtol=0, atol=1e-12)
