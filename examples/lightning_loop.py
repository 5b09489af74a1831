"""A Lightning run with an averaged copy of the weights: validation reports both, the checkpoint resumes it.

Run: python examples/lightning_loop.py [--epochs N] [--out DIR]
Trains a small MLP on a noisy synthetic regression task with a high learning rate. The AveragingCallback keeps an
EMA: every validation runs with the training weights (``val_mse``) and with the average (``val_mse_ema``), a
ModelCheckpoint keeps the epoch whose average validated best, and at the end the average is written to a file.
Without --out everything goes to a temporary folder that is removed at the end.
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
        self.log("val_mse", nn.functional.mse_loss(self(x), y))  # logged as val_mse_ema for the average

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def data(seed: int = 0) -> tuple[DataLoader, DataLoader]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1024, 8, generator=g)
    y = torch.sin(x @ torch.randn(8, 1, generator=g)) + 0.3 * torch.randn(1024, 1, generator=g)
    train = DataLoader(TensorDataset(x[:768], y[:768]), batch_size=8, shuffle=True, generator=g)
    return train, DataLoader(TensorDataset(x[768:], y[768:]), batch_size=256)


class Report(pl.Callback):
    """Prints both metrics after each epoch's validation."""

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            m = trainer.callback_metrics
            print(f"epoch {trainer.current_epoch}: val_mse {m['val_mse']:.4f}  val_mse_ema {m['val_mse_ema']:.4f}")


def main(epochs: int = 5, out: str | None = None) -> dict[str, float]:
    if out is None:
        with tempfile.TemporaryDirectory(prefix="polyak-lightning-") as scratch:
            results = main(epochs, scratch)
            print(f"(removed {scratch}: pass --out DIR to keep the files)")
            return results
    torch.manual_seed(0)
    out_dir = Path(out)
    train, val = data()
    model = Regressor()
    # Any polyak averager works: pass a function model -> averager (default: EMA 0.999 with warm-up).
    callback = AveragingCallback(lambda m: polyak.EMA(m, decay=0.99), save_to=out_dir / "averaged.pt")
    best = pl.callbacks.ModelCheckpoint(dirpath=out_dir / "checkpoints", monitor="val_mse_ema", save_top_k=1)
    trainer = pl.Trainer(
        max_epochs=epochs,
        accumulate_grad_batches=2,  # the average updates once per optimizer step, not per batch
        callbacks=[callback, best, Report()],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=out_dir,
    )
    trainer.fit(model, train, val)
    (validated,) = trainer.validate(model, val, verbose=False)  # by hand: both again, the model unchanged after
    with torch.no_grad():
        x, y = val.dataset.tensors
        last = nn.functional.mse_loss(model(x), y).item()  # outside the Trainer: the training weights
    results = {
        "last iterate": last,
        "last iterate (trainer.validate)": validated["val_mse"],
        "EMA 0.99 (trainer.validate)": validated["val_mse_ema"],
    }
    for name, value in results.items():
        print(f"{name:>31}: val MSE {value:.4f}")
    print(f"best checkpoint by val_mse_ema: {best.best_model_path}")
    print(f"averaged weights written to {out_dir / 'averaged.pt'}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5, help="epochs (default 5)")
    parser.add_argument("--out", help="folder to write to (default: a temporary folder, removed at the end)")
    options = parser.parse_args()
    main(options.epochs, options.out)
