"""diffusers' EMAModel -> polyak: the same numbers from scratch, and a saved EMAModel continued under polyak."""

import io

import torch
from diffusers.training_utils import EMAModel
from torch import nn

import polyak

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.SiLU(), nn.Linear(16, 1)).double()
model[0].bias.requires_grad_(False)  # a frozen parameter: both copy it instead of averaging
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
inputs, targets = torch.randn(256, 8, dtype=torch.float64), torch.randn(256, 1, dtype=torch.float64)


def train_step() -> None:
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


def assert_same(averager: polyak.EMA, peer: EMAModel) -> None:
    for (name, _), shadow in zip(model.named_parameters(), peer.shadow_params, strict=True):
        torch.testing.assert_close(averager.shadow.tensors()[name], shadow, rtol=0, atol=1e-12)


# --8<-- [start:side_by_side]
# diffusers: with use_ema_warmup the decay is 1 - (1 + n / inv_gamma) ** -power (n counted from
# update_after_step), without it (1 + n) / (10 + n); both capped at decay and floored at min_decay
peer = EMAModel(model.parameters(), decay=0.999, use_ema_warmup=True, power=3 / 4, update_after_step=10)

# polyak: the same warm-up is polyak.rules.PowerWarmup; diffusers' update_after_step is start_step
rule = polyak.rules.PowerWarmup(0.999, inv_gamma=1.0, power=3 / 4)
ema = polyak.EMA(model, rule=rule, start_step=10)

for _ in range(200):
    train_step()
    peer.step(model.parameters())
    ema.update()
# --8<-- [end:side_by_side]
assert_same(ema, peer)

# --8<-- [start:checkpoint]
buffer = io.BytesIO()
torch.save(peer.state_dict(), buffer)  # shadow_params, optimization_step and the warm-up settings
buffer.seek(0)
saved = torch.load(buffer, weights_only=True)

resumed = polyak.EMA(model, **polyak.migrate.options(saved))  # the settings come with the state
polyak.migrate.load(resumed, saved)
assert resumed.step == peer.optimization_step
# --8<-- [end:checkpoint]

for _ in range(100):
    train_step()
    peer.step(model.parameters())
    resumed.update()
assert_same(resumed, peer)
