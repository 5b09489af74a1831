"""The one path's two goals, each a ratio measured in one run on this machine (medians of interleaved repeats).

1. K averages in one read: ``MultiEMA`` with K=3 decays against three separate ``EMA``s, on 40 float32 tensors
   of 1 Mi elements each (goal: <= 0.85x).
2. Foreign events cost nothing: an ``EMA``'s update while, between its updates, another library changes its own
   modules (torch's ``AveragedModel.update_parameters``; a module whose ``.data`` is assigned every step), against
   the same update alone (goal: <= 1.10x), on a small model (11 tensors) and a 600-tensor one.

Uses the public API only, so the same script measures an older polyak (``PYTHONPATH=<old>/src``) for the
before/after figures:

    python benchmarks/one_path.py [--repeats 30] [--json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import polyak

GOALS = {"multi_k3_vs_three": 0.85, "foreign_events": 1.10}


def _median_ns(run: Callable[[], None], before: Callable[[], None], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        before()
        start = time.perf_counter_ns()
        run()
        times.append(time.perf_counter_ns() - start)
    return statistics.median(times)


def multi_ratio(repeats: int, tensors: int = 40, numel: int = 1 << 20) -> dict[str, float]:
    """MultiEMA K=3 against three EMAs of the same decays, 40 x 1 Mi float32 (one thread)."""
    model = nn.ParameterList([nn.Parameter(torch.randn(numel)) for _ in range(tensors)])
    decays = (0.99, 0.999, 0.9999)
    three = [polyak.EMA(model, decay=d) for d in decays]
    multi = polyak.MultiEMA(model, decays=decays)
    for _ in range(3):  # first updates copy; plans and scratch are made
        multi.update()
        for ema in three:
            ema.update()
    pairs = []
    for _ in range(max(3, repeats // 5)):
        t_multi = _median_ns(multi.update, lambda: None, 5)
        t_three = _median_ns(lambda: [ema.update() for ema in three], lambda: None, 5)
        pairs.append((t_multi, t_three))
    multi_ns = statistics.median(p[0] for p in pairs)
    three_ns = statistics.median(p[1] for p in pairs)
    return {"multi_ms": multi_ns / 1e6, "three_ms": three_ns / 1e6, "ratio": multi_ns / three_ns}


def _mlp(tensors: int) -> nn.Module:
    layers = [nn.Linear(16, 16) for _ in range(tensors // 2)]
    return nn.Sequential(*layers, *([nn.Linear(16, 16, bias=False)] if tensors % 2 else []))


def foreign_ratio(repeats: int, tensors: int) -> dict[str, float]:
    """An EMA's update alone, and with another library's events between its updates (interleaved)."""
    model = _mlp(tensors)
    ema = polyak.EMA(model, decay=0.999)
    other = _mlp(tensors)
    averaged = torch.optim.swa_utils.AveragedModel(other, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn())
    assigned = nn.Linear(16, 16)
    fresh = [torch.randn(16, 16) for _ in range(2)]
    step = [0]

    def assign() -> None:
        step[0] += 1
        assigned.weight.data = fresh[step[0] % 2]  # a BYOL-style target update, by .data

    for _ in range(3):
        ema.update()
        averaged.update_parameters(other)
    rows = {"alone": [], "averaged_model": [], "data_assigned": []}  # type: dict[str, list[float]]
    for _ in range(repeats):
        rows["alone"].append(_median_ns(ema.update, lambda: None, 9))
        rows["averaged_model"].append(_median_ns(ema.update, lambda: averaged.update_parameters(other), 9))
        rows["data_assigned"].append(_median_ns(ema.update, assign, 9))
    alone = statistics.median(rows["alone"])
    return {
        "alone_us": alone / 1e3,
        "beside_averaged_model": statistics.median(rows["averaged_model"]) / alone,
        "beside_data_assignment": statistics.median(rows["data_assigned"]) / alone,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=30, help="interleaved rounds per figure (default 30)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = {
        "polyak": polyak.__file__,
        "multi": multi_ratio(args.repeats),
        "foreign_11": foreign_ratio(args.repeats, 11),
        "foreign_600": foreign_ratio(args.repeats, 600),
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    multi = results["multi"]
    met = "met" if multi["ratio"] <= GOALS["multi_k3_vs_three"] else "NOT met"
    print(f"polyak from {results['polyak']}")
    print(
        f"MultiEMA K=3, 40 x 1Mi float32: {multi['multi_ms']:.1f} ms vs three EMAs {multi['three_ms']:.1f} ms = "
        f"{multi['ratio']:.2f}x (goal <= {GOALS['multi_k3_vs_three']}x: {met})"
    )
    for key in ("foreign_11", "foreign_600"):
        row = results[key]
        worst = max(row["beside_averaged_model"], row["beside_data_assignment"])
        met = "met" if worst <= GOALS["foreign_events"] else "NOT met"
        print(
            f"EMA update, {key.split('_')[1]} tensors: alone {row['alone_us']:.1f} us; beside torch's AveragedModel "
            f"{row['beside_averaged_model']:.2f}x, beside a .data assignment {row['beside_data_assignment']:.2f}x "
            f"(goal <= {GOALS['foreign_events']}x: {met})"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
