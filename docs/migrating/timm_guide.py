"""timm's ModelEmaV3 -> polyak: the same numbers from scratch, and a timm checkpoint continued under polyak."""

import io

import torch
from timm.utils.model_ema import ModelEmaV3
from torch import nn

import polyak

torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).double()
optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
inputs, labels = torch.randn(32, 3, 8, 8, dtype=torch.float64), torch.randint(0, 4, (32,))


def train_step() -> None:
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(inputs), labels).backward()
    optimizer.step()


def assert_same(averager: polyak.EMA, peer: ModelEmaV3) -> None:
    for name, value in peer.module.state_dict().items():  # parameters and BatchNorm buffers alike
        torch.testing.assert_close(averager.shadow.state_dict()[name], value, rtol=0, atol=1e-12)


# --8<-- [start:side_by_side]
# timm: the caller passes the step (timm's train.py: num_updates, counted after the optimizer step);
# with use_warmup the decay is 1 - (1 + n / warmup_gamma) ** -warmup_power, n counted from update_after_step
peer = ModelEmaV3(model, decay=0.9998, use_warmup=True, warmup_power=3 / 4, update_after_step=5)

# polyak: counts the steps itself; the warm-up is PowerWarmup and update_after_step is start_step
rule = polyak.rules.PowerWarmup(0.9998, inv_gamma=1.0, power=3 / 4)
ema = polyak.EMA(model, rule=rule, start_step=5)  # = polyak.migrate.options(peer)

num_updates = 0
for _ in range(150):
    train_step()
    num_updates += 1
    peer.update(model, step=num_updates)
    ema.update()
# --8<-- [end:side_by_side]
assert_same(ema, peer)

# --8<-- [start:checkpoint]
buffer = io.BytesIO()  # the layout of timm's CheckpointSaver: the average under state_dict_ema, no step
torch.save({"epoch": 2, "state_dict": model.state_dict(), "state_dict_ema": peer.module.state_dict()}, buffer)
buffer.seek(0)
checkpoint = torch.load(buffer, weights_only=True)

resumed = polyak.EMA(model, **polyak.migrate.options(peer))
polyak.migrate.load(resumed, checkpoint, step=num_updates, settings=peer)  # timm keeps no step: give it
# --8<-- [end:checkpoint]

for _ in range(100):
    train_step()
    num_updates += 1
    peer.update(model, step=num_updates)
    resumed.update()
assert_same(resumed, peer)
