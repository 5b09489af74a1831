"""Time the finiteness check of ``nonfinite="skip"`` on a ResNet-50-sized float32 model: the old 2-norm (which
overflows past ~1.8e19) against :func:`polyak.kernels.all_finite`, and whole updates with and without it.

    PYTHONPATH=src python tools/time_finite_check.py [--threads 1] [--repeats 20]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch

import polyak
from polyak.commands.bench.models import ResNet50Shape
from polyak.kernels import all_finite


def best_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = ResNet50Shape()
    tensors = [p.detach() for p in model.parameters()]
    ema = polyak.EMA(model, decay=0.999, nonfinite="skip")
    plain = polyak.EMA(model, decay=0.999)
    ema.update()
    plain.update()
    rows = {
        "old check: float32 2-norm": lambda: torch.stack(torch._foreach_norm(tensors, 2)).lt(math.inf).all(),
        "new check: all_finite (float64 2-norm)": lambda: all_finite(tensors),
        'whole EMA.update(), nonfinite="skip"': ema.update,
        "whole EMA.update(), no check": plain.update,
    }
    n = sum(t.numel() for t in tensors)
    print(f"ResNet-50 shapes: {len(tensors)} tensors, {n / 1e6:.1f}M float32 values, {args.threads} thread(s)")
    for name, fn in rows.items():
        print(f"{name:42s} {best_ms(fn, args.repeats):7.1f} ms (best of {args.repeats})")


if __name__ == "__main__":
    main()
