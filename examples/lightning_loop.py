"""A Lightning run with an averaged copy of the weights: validation sees the average, the checkpoint resumes it.

Run: python examples/lightning_loop.py [--epochs N]
Trains a small MLP on a noisy synthetic regression task with a high learning rate. The AveragingCallback keeps an
EMA (validation runs with it swapped in), and at the end it writes the average to a file.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import polyak
from polyak.integrations.lightning import AveragingCallback


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_mse", nn.functional.mse_loss(self(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.3 * torch.randn(1024, 1, generator=g)
    train = DataLoader(TensorDataset(x[:768], y[:768]), batch_size=8, shuffle=True, generator=g)
    return train, DataLoader(TensorDataset(x[768:], y[768:]), batch_size=256)


def main(epochs: int = 5, out: str | None = None) -> dict[str, float]:
    torch.manual_seed(0)
    out_dir = Path(out or tempfile.mkdtemp(prefix="polyak-lightning-"))
    train, val = data()
    model = Regressor()
    # Any polyak averager works: pass a function model -> averager (default: EMA 0.999 with warm-up).
    callback = AveragingCallback(lambda m: polyak.EMA(m, decay=0.99), save_to=out_dir / "averaged.pt")
    trainer = pl.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=2,  # the average updates once per optimizer step, not per batch
        callbacks=[callback],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model, train, val)
    averaged = trainer.callback_metrics["val_mse"].item()  # the last validation ran with the average
    live = trainer.validate(model, val, verbose=False)  # so does this one: the callback swaps for it too
    with torch.no_grad():
        x, y = val.dataset.tensors
        last = nn.functional.mse_loss(model(x), y).item()  # outside the Trainer: the training weights
    results = {"last iterate": last, "EMA 0.99": averaged, "EMA 0.99 (trainer.validate)": live[0]["val_mse"]}
    for name, value in results.items():
        print(f"{name:>27}: val MSE {value:.4f}")
    print(f"averaged weights written to {out_dir / 'averaged.pt'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5, help="epochs (default 5)")
    main(parser.parse_args().epochs)
