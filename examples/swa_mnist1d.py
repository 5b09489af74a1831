"""torch's SWA/EMA recipe with one import changed: ``polyak.swa_utils`` instead of ``torch.optim.swa_utils``.

Run: python examples/swa_mnist1d.py [--epochs N]
Trains a small 1-D CNN with BatchNorm on MNIST-1D (generated locally by the ``mnist1d`` package, no download),
keeps torchvision's ``ExponentialMovingAverage`` of it and an ``AveragedModel`` (SWA) over the last epochs,
recomputes the SWA model's BatchNorm statistics with ``update_bn``, and prints the test accuracy of all three.
"""

from __future__ import annotations

import argparse

import torch
from mnist1d.data import get_dataset_args, make_dataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from polyak.swa_utils import SWALR, AveragedModel, ExponentialMovingAverage, update_bn


def make_model() -> nn.Module:
    def block(channels_in: int, stride: int) -> list[nn.Module]:
        return [nn.Conv1d(channels_in, 32, 3, stride=stride, padding=1), nn.BatchNorm1d(32), nn.ReLU()]

    return nn.Sequential(
        nn.Unflatten(1, (1, 40)), *block(1, 1), *block(32, 2), *block(32, 2), nn.Flatten(), nn.Linear(320, 10)
    )


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item()


def main(epochs: int = 24, num_samples: int = 5000, ema_decay: float = 0.99) -> dict[str, float]:
    torch.manual_seed(0)
    args = get_dataset_args()
    args.num_samples = num_samples
    data = make_dataset(args)
    x, y = torch.tensor(data["x"], dtype=torch.float32), torch.tensor(data["y"])
    x_test, y_test = torch.tensor(data["x_test"], dtype=torch.float32), torch.tensor(data["y_test"])
    loader = DataLoader(TensorDataset(x, y), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))

    device = torch.device("cpu")
    model = make_model().to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    swa_start = epochs // 2
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(swa_start, 1))
    swa_scheduler = SWALR(optimizer, swa_lr=0.05, anneal_epochs=max(1, epochs // 8))
    model_ema = ExponentialMovingAverage(model, device=device, decay=ema_decay)
    swa_model = AveragedModel(model)

    for epoch in range(epochs):
        model.train()
        for inputs, targets in loader:
            loss = nn.functional.cross_entropy(model(inputs.to(device)), targets.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model_ema.update_parameters(model)
        if epoch >= swa_start:
            swa_model.update_parameters(model)
            swa_scheduler.step()
        else:
            scheduler.step()

    update_bn(loader, swa_model, device=device)  # the averaged weights need their own BatchNorm statistics
    x_test, y_test = x_test.to(device), y_test.to(device)
    return {
        "trained model": accuracy(model, x_test, y_test),
        f"EMA (decay {ema_decay})": accuracy(model_ema, x_test, y_test),
        f"SWA (last {epochs - swa_start} epochs)": accuracy(swa_model, x_test, y_test),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=24)
    for name, value in main(parser.parse_args().epochs).items():
        print(f"{name:>24}: test accuracy {value:.1%}")
