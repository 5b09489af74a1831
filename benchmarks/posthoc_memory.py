"""Post-hoc EMA at scale: reconstruction error and peak memory on a >= 25M-parameter model, >= 20 snapshots.

Trains an MLP (about 25.2M float32 parameters) with SGD while a PostHocEMA (sigma_rel 0.05 and 0.10) writes
snapshots, and a direct power EMA of the target width runs beside it. Then, in a fresh process, reconstructs
the target from the snapshots and reports its peak resident memory above the process's baseline (after
importing torch and polyak) as a multiple of one float32 copy of the model. Not a test: run it by hand.

    PYTHONPATH=src python benchmarks/posthoc_memory.py [--dir /tmp/polyak-posthoc-bench] [--keep]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

import polyak
from polyak.io import open_safetensors
from polyak.rules import PowerFunction


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(directory: str, target: float, output: str) -> None:
    """Reconstruct in this (fresh) process and print its memory figures as JSON."""
    baseline = _status_kib("VmRSS")
    start = time.perf_counter()
    result = polyak.posthoc.reconstruct(directory, [target], [output])
    seconds = time.perf_counter() - start
    used = sum(1 for s in result.snapshots if s.step <= result.step)
    print(
        json.dumps(
            {
                "baseline_kib": baseline,
                "peak_kib": _status_kib("VmHWM"),
                "seconds": seconds,
                "error": float(result.errors[0]),
                "snapshots": used,
                "step": result.step,
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default="/tmp/polyak-posthoc-bench")
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--update-every", type=int, default=4)
    parser.add_argument("--snapshot-every", type=int, default=20)
    parser.add_argument("--target", type=float, default=0.07)
    parser.add_argument("--keep", action="store_true", help="keep the snapshot directory")
    parser.add_argument("--child", nargs=3, metavar=("DIR", "SIGMA_REL", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], float(args.child[1]), args.child[2])
        return

    torch.manual_seed(0)
    torch.set_num_threads(1)
    directory = Path(args.dir)
    shutil.rmtree(directory, ignore_errors=True)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(args.width, args.width), nn.Tanh()) for _ in range(args.layers)])
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    tracker = polyak.PostHocEMA(
        model, directory=directory, snapshot_every=args.snapshot_every, update_every=args.update_every
    )
    direct = polyak.EMA(model, rule=PowerFunction(sigma_rel=args.target), update_every=args.update_every)
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    teacher = torch.randn(args.width, args.width) / args.width**0.5
    start = time.perf_counter()
    for _ in range(args.steps):
        x = torch.randn(32, args.width)
        loss = (model(x) - torch.tanh(x @ teacher)).square().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        tracker.update()
        direct.update()
    train_seconds = time.perf_counter() - start
    snapshots = sorted(directory.glob("phema-*.safetensors"))

    output = directory / "reconstructed.safetensors"
    run = subprocess.run(
        [sys.executable, __file__, "--child", str(directory), str(args.target), str(output)],
        check=True,
        capture_output=True,
        text=True,
    )
    figures = json.loads(run.stdout.strip().splitlines()[-1])
    model_kib = params * 4 / 1024
    reconstructed = open_safetensors(output)
    diff2 = ref2 = moved2 = 0.0
    for name, value in direct.shadow.tensors().items():
        start_value = initial[name]
        got = reconstructed[name].double()
        diff2 += float((got - value.double()).square().sum())
        ref2 += float(value.double().square().sum())
        moved2 += float((value.double() - start_value.double()).square().sum())
    peak_multiple = (figures["peak_kib"] - figures["baseline_kib"]) / model_kib
    print(f"model: {params:,} parameters ({model_kib / 1024:.1f} MiB in float32), {args.steps} SGD steps")
    print(f"snapshots: {len(snapshots)} files x 2 profiles (sigma_rel 0.05, 0.10), {figures['snapshots']} used")
    print(f"target sigma_rel {args.target} at step {figures['step']}")
    print(f"  profile fit, relative L2 error:                 {figures['error']:.3e}")
    print(f"  weights vs direct EMA, ||diff|| / ||direct||:   {(diff2 / ref2) ** 0.5:.3e}")
    print(f"  weights vs direct EMA, ||diff|| / ||direct - init||: {(diff2 / moved2) ** 0.5:.3e}")
    print(
        f"  reconstruction peak RSS above baseline: {(figures['peak_kib'] - figures['baseline_kib']) / 1024:.1f} MiB "
        f"= {peak_multiple:.3f} x one float32 model ({figures['seconds']:.1f} s)"
    )
    print(f"training with tracker + direct EMA + snapshots: {train_seconds:.1f} s")
    if not args.keep:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
