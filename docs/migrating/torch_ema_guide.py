"""torch_ema -> polyak: the same numbers from scratch, and a saved torch_ema run continued under polyak."""

import io

import torch
from torch import nn
from torch_ema import ExponentialMovingAverage

import polyak

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).double()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
inputs, targets = torch.randn(256, 8, dtype=torch.float64), torch.randn(256, 1, dtype=torch.float64)


def train_step() -> None:
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


def assert_same(averager: polyak.EMA, peer: ExponentialMovingAverage) -> None:
    for (name, _), shadow in zip(model.named_parameters(), peer.shadow_params, strict=True):
        torch.testing.assert_close(averager.shadow.tensors()[name], shadow, rtol=0, atol=1e-12)


# --8<-- [start:side_by_side]
# torch_ema: copies the parameters when built, then decays by min(decay, (1 + n) / (10 + n)) at its n-th update
peer = ExponentialMovingAverage(model.parameters(), decay=0.99)

# polyak: RationalWarmup is that warm-up; its first update copies, standing for torch_ema's construction
ema = polyak.EMA(model, rule=polyak.rules.RationalWarmup(0.99))  # = polyak.migrate.options(peer) (+ buffers="copy")
ema.update()

for _ in range(200):
    train_step()
    peer.update()
    ema.update()

with peer.average_parameters():  # torch_ema's evaluation ...
    averaged = model(inputs)
with ema.swapped(model):  # ... and polyak's
    torch.testing.assert_close(model(inputs), averaged, rtol=0, atol=1e-12)  # float64: equal to rounding
# --8<-- [end:side_by_side]
assert_same(ema, peer)

# --8<-- [start:checkpoint]
buffer = io.BytesIO()
torch.save(peer.state_dict(), buffer)  # decay, num_updates, shadow_params (in model.parameters() order)
buffer.seek(0)
saved = torch.load(buffer, weights_only=True)

resumed = polyak.EMA(model, **polyak.migrate.options(saved))  # torch_ema's state carries its settings
polyak.migrate.load(resumed, saved)  # paired by model.parameters() order, every shape checked
assert resumed.step == peer.num_updates + 1  # the construction copy counts as polyak's first update
# --8<-- [end:checkpoint]

for _ in range(100):
    train_step()
    peer.update()
    resumed.update()
assert_same(resumed, peer)
