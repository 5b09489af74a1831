"""The polyak loop on a small real problem: noisy SGD on a synthetic regression task.

Run: python examples/quickstart.py [--steps N]
Trains a small MLP with a high constant learning rate, keeps an EMA and an SWA of its weights, and prints
the held-out loss of the last iterate and of both averages.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import polyak


def main(steps: int = 2000) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(2048, 8)
    true_w = torch.randn(8, 1)
    y = torch.sin(x @ true_w) + 0.3 * torch.randn(2048, 1)
    x_train, y_train, x_test, y_test = x[:1536], y[:1536], x[1536:], y[1536:]

    model = nn.Sequential(nn.Linear(8, 64), nn.Tanh(), nn.Linear(64, 1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = polyak.EMA(model, decay=0.99)
    swa = polyak.SWA(model, start_step=steps // 2)
    ema.attach(optimizer)
    swa.attach(optimizer)

    for _ in range(steps):
        index = torch.randint(0, len(x_train), (4,))
        loss = nn.functional.mse_loss(model(x_train[index]), y_train[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def test_loss() -> float:
        with torch.no_grad():
            return nn.functional.mse_loss(model(x_test), y_test).item()

    results = {"last iterate": test_loss()}
    for name, averager in (("EMA 0.99", ema), ("SWA (2nd half)", swa)):
        with averager.swapped(model):
            results[name] = test_loss()
    for name, value in results.items():
        print(f"{name:>15}: test MSE {value:.4f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000, help="optimizer steps (default 2000)")
    main(parser.parse_args().steps)
