"""Time of one ``update_parameters``: ``torch.optim.swa_utils`` against ``polyak.swa_utils``.

Run: python benchmarks/swa_utils_update.py [--device cuda] [--layers 100] [--width 256] [--repeat 200]
The model is a stack of Linear + BatchNorm1d blocks (many small tensors, float and integer buffers). Prints the
median wall time per update of each averager (synchronised on CUDA).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch
import torch.optim.swa_utils as ts
from torch import nn

import polyak.swa_utils as ps


def torchvision_ema(model: nn.Module, decay: float, device: torch.device) -> ts.AveragedModel:
    """torchvision's ExponentialMovingAverage (references/classification/utils.py), on torch's AveragedModel."""

    def ema_avg(avg, param, num_averaged):
        return decay * avg + (1 - decay) * param

    return ts.AveragedModel(model, device, ema_avg, use_buffers=True)


def median_update_time(averaged: nn.Module, model: nn.Module, repeat: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):
        averaged.update_parameters(model)
    times = []
    for _ in range(repeat):
        sync()
        start = time.perf_counter()
        averaged.update_parameters(model)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--layers", type=int, default=100)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=200)
    args = parser.parse_args()
    device = torch.device(args.device)
    blocks = [m for _ in range(args.layers) for m in (nn.Linear(args.width, args.width), nn.BatchNorm1d(args.width))]
    model = nn.Sequential(*blocks).to(device)
    tensors = len(list(model.parameters())) + len(list(model.buffers()))
    numel = sum(t.numel() for t in model.state_dict().values())
    print(f"device {device}, {tensors} tensors, {numel / 1e6:.1f}M elements, torch {torch.__version__}")
    cases = {
        "SWA (default)": (lambda: ts.AveragedModel(model), lambda: ps.AveragedModel(model)),
        "EMA, get_ema_multi_avg_fn": (
            lambda: ts.AveragedModel(model, multi_avg_fn=ts.get_ema_multi_avg_fn(0.999), use_buffers=True),
            lambda: ps.AveragedModel(model, multi_avg_fn=ps.get_ema_multi_avg_fn(0.999), use_buffers=True),
        ),
        "torchvision ExponentialMovingAverage": (
            lambda: torchvision_ema(model, 0.999, device),
            lambda: ps.ExponentialMovingAverage(model, 0.999, device=device),
        ),
    }
    print(f"{'case':<38}{'torch (ms)':>12}{'polyak (ms)':>13}{'speed-up':>10}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, (theirs, ours) in cases.items():
            t = median_update_time(theirs(), model, args.repeat, device)
            p = median_update_time(ours(), model, args.repeat, device)
            print(f"{name:<38}{t * 1e3:>12.3f}{p * 1e3:>13.3f}{t / p:>9.1f}x")


if __name__ == "__main__":
    main()
