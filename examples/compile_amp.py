"""A torch.compile + bf16 autocast training loop with an EMA of the weights.

Run: python examples/compile_amp.py [--steps N] [--no-compile]
The model trains in float32 under bf16 autocast and runs compiled; the EMA lives in float32 beside it, pairs with
the compiled module by name (the ``_orig_mod.`` prefix is looked through), and is swapped into the compiled module
in place for evaluation, so the compiled graph runs with the averaged weights without recompiling.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import polyak


def main(steps: int = 300, compile: bool = True) -> dict[str, float]:
    torch.manual_seed(0)
    x = torch.randn(2048, 16)
    y = torch.sin(x @ torch.randn(16, 1)) + 0.3 * torch.randn(2048, 1)
    x_train, y_train, x_test, y_test = x[:1536], y[:1536], x[1536:], y[1536:]

    model = nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 1))
    compiled = torch.compile(model) if compile else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ema = polyak.EMA(compiled, decay=0.98)  # the wrapper is fine: tensors pair by name
    ema.attach(optimizer)  # one update after every optimizer.step()

    def loss_of(inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return nn.functional.mse_loss(compiled(inputs).float(), targets)

    for _ in range(steps):
        index = torch.randint(0, len(x_train), (32,))
        loss = loss_of(x_train[index], y_train[index])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    @torch.no_grad()
    def test_loss() -> float:  # batches of the training shape: the compiled graph is not rebuilt for a new size
        return (
            torch.stack([loss_of(a, b) for a, b in zip(x_test.split(32), y_test.split(32), strict=True)]).mean().item()
        )

    results = {"last iterate": test_loss()}
    with ema.swapped(compiled):  # in place: the compiled graph sees the averaged weights
        results["EMA 0.98"] = test_loss()
    results["last iterate again"] = test_loss()  # restored exactly
    for name, value in results.items():
        print(f"{name:>18}: test MSE {value:.4f}")
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=300, help="optimizer steps (default 300)")
    parser.add_argument("--no-compile", action="store_true", help="run eagerly")
    options = parser.parse_args()
    main(options.steps, compile=not options.no_compile)
