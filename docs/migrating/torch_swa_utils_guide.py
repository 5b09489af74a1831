"""torch.optim.swa_utils -> polyak: SWA and EMA from scratch, and a saved AveragedModel continued under polyak."""

import io

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

import polyak

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).double()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
inputs, targets = torch.randn(256, 8, dtype=torch.float64), torch.randn(256, 1, dtype=torch.float64)


def train_step() -> None:
    optimizer.zero_grad()
    nn.functional.mse_loss(model(inputs), targets).backward()
    optimizer.step()


def assert_same(averager: polyak.Averager, peer: AveragedModel) -> None:
    for name, value in peer.module.state_dict().items():
        torch.testing.assert_close(averager.shadow.state_dict()[name], value, rtol=0, atol=1e-12)


# --8<-- [start:side_by_side]
# torch: the loop decides when to average; here every 10 steps after step 50 (SWA), and every step (EMA)
swa_peer = AveragedModel(model)
ema_peer = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.99))

# polyak: the cadence is the averager's; both copy on their first update, as AveragedModel does
swa = polyak.SWA(model, start_step=50, update_every=10)
ema = polyak.EMA(model, decay=0.99)

for step in range(1, 201):
    train_step()
    if step > 50 and step % 10 == 0:
        swa_peer.update_parameters(model)
    ema_peer.update_parameters(model)
    swa.update()
    ema.update()
# --8<-- [end:side_by_side]
assert_same(swa, swa_peer)
assert_same(ema, ema_peer)

# --8<-- [start:checkpoint]
buffer = io.BytesIO()
torch.save(swa_peer.state_dict(), buffer)  # module.* and n_averaged: no step, no averaging function
buffer.seek(0)
saved = torch.load(buffer, weights_only=True)

resumed = polyak.SWA(model, start_step=50, update_every=10)
polyak.migrate.load(resumed, saved, step=200, settings=swa_peer)  # settings: checks it is an equal average
assert resumed.num_updates == int(swa_peer.n_averaged)
# --8<-- [end:checkpoint]

for step in range(201, 301):
    train_step()
    if step % 10 == 0:
        swa_peer.update_parameters(model)
    resumed.update()
assert_same(resumed, swa_peer)
