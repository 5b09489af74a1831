"""ema-pytorch -> polyak: the same numbers from scratch, and a saved ema-pytorch run continued under polyak."""

import io

import torch
from ema_pytorch import EMA as PeerEMA
from torch import nn

import polyak

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 1)).double()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
inputs, targets = torch.randn(256, 8, dtype=torch.float64), torch.randn(256, 1, dtype=torch.float64)


def train_step() -> None:
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


# --8<-- [start:side_by_side]
# ema-pytorch: the decay warms up as 1 - (1 + n / inv_gamma) ** -power, clamped to [min_value, beta];
# the average is copied on every 10th step up to update_after_step, then blended on every 10th step.
peer = PeerEMA(model, beta=0.999, update_after_step=100, update_every=10, power=3 / 4)

# polyak: the same schedule; options() spells it out for this peer:
# PowerWarmup(0.999, power=0.75, offset=-9), update_every=10, start_step=91, compensate=False
ema = polyak.EMA(model, **polyak.migrate.options(peer))

for _ in range(300):
    train_step()
    peer.update()
    ema.update()
# --8<-- [end:side_by_side]

# ema-pytorch computes its decay in float32 (its step is a tensor): its weights are off by ~6e-8 relative,
# which moves the average by ~1e-8 here (a float64 model); everything else agrees to rounding
for name, value in ema.shadow.tensors().items():
    torch.testing.assert_close(value, peer.ema_model.state_dict()[name], rtol=0, atol=1e-7)

# --8<-- [start:checkpoint]
buffer = io.BytesIO()
torch.save(peer.state_dict(), buffer)  # what an ema-pytorch run saves: ema_model.*, online_model.*, step, initted
buffer.seek(0)
saved = torch.load(buffer, weights_only=True)

resumed = polyak.EMA(model, **polyak.migrate.options(peer))
polyak.migrate.load(resumed, saved, settings=peer)  # settings: the schedule is checked against the peer's
assert resumed.step == 300
# --8<-- [end:checkpoint]

for _ in range(200):
    train_step()
    peer.update()
    resumed.update()
for name, value in resumed.shadow.tensors().items():
    torch.testing.assert_close(value, peer.ema_model.state_dict()[name], rtol=0, atol=1e-7)
