"""Lightning's EMAWeightAveraging -> polyak's callback: the same numbers, and a Lightning checkpoint continued."""

import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EMAWeightAveraging, ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.integrations.lightning import AveragingCallback

torch.manual_seed(0)
data = DataLoader(TensorDataset(torch.randn(160, 8, dtype=torch.float64), torch.randn(160, 1, dtype=torch.float64)),
                  batch_size=16)  # 10 steps an epoch, in the same order every epoch


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1)).double()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        return nn.functional.mse_loss(self.net(inputs), targets)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.05)


def trainer(steps: int, callbacks: list[pl.Callback], folder: str) -> pl.Trainer:
    return pl.Trainer(max_steps=steps, callbacks=callbacks, default_root_dir=folder, logger=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0, accelerator="cpu")


def assert_same(averager: polyak.EMA, module: pl.LightningModule) -> None:
    for name, value in module.state_dict().items():
        torch.testing.assert_close(averager.shadow.state_dict()[name], value, rtol=0, atol=1e-12)


folder = tempfile.mkdtemp()
# --8<-- [start:side_by_side]
# Lightning: the plain decay on every 5th optimizer step from step index 10 (the first update copies)
peer = EMAWeightAveraging(decay=0.99, update_every_n_steps=5, update_starting_at_step=10)

# polyak: the same cadence, without compensating the decay for the 5 steps (compensate=False):
# polyak.EMA(model, decay=0.99, update_every=5, start_step=6, compensate=False)
ours = AveragingCallback(lambda model: polyak.EMA(model, **polyak.migrate.options(peer)), evaluate=False)

saving = ModelCheckpoint(dirpath=folder, every_n_train_steps=60, save_top_k=-1)
model = Regressor()
trainer(60, [peer, ours, saving], folder).fit(model, data)
assert_same(ours.averager, model)  # Lightning copies its average into the model when fit ends
# --8<-- [end:side_by_side]

# --8<-- [start:checkpoint]
checkpoint = torch.load(next(Path(folder).glob("*.ckpt")), weights_only=False)
# Lightning's checkpoint holds the average under "state_dict", the training weights under "current_model_state"
converted = {key: value for key, value in checkpoint.items() if key not in ("averaging_state", "current_model_state")}
converted["state_dict"] = checkpoint["current_model_state"]
model = Regressor()
model.load_state_dict(converted["state_dict"])
ema = polyak.EMA(model, **polyak.migrate.options(peer))
polyak.migrate.load(ema, checkpoint, settings=peer)  # the average and global_step, the cadence checked
callback = AveragingCallback(lambda model: polyak.EMA(model, **polyak.migrate.options(peer)), evaluate=False)
converted["callbacks"] = {callback.state_key: ema.state_dict()}  # polyak's callback resumes from this
torch.save(converted, Path(folder) / "polyak.ckpt")
# --8<-- [end:checkpoint]

peer_run = Regressor()  # the Lightning run, resumed from its own checkpoint ...
peer_checkpoint = str(next(p for p in Path(folder).glob("*.ckpt") if p.name != "polyak.ckpt"))
trainer(100, [EMAWeightAveraging(decay=0.99, update_every_n_steps=5, update_starting_at_step=10)], folder).fit(
    peer_run, data, ckpt_path=peer_checkpoint)
ours_run = Regressor()  # ... and under polyak, from the converted one
trainer(100, [callback], folder).fit(ours_run, data, ckpt_path=str(Path(folder) / "polyak.ckpt"))
assert_same(callback.averager, peer_run)
