"""Per-update cost of a soft target-network update on RL shapes: polyak's live target against the loops RL code uses.

Run: PYTHONPATH=src python benchmarks/target_update.py [--repeats 2000] [--threads 1]

Shapes: the DQN CartPole Q-network (4-128-128-2), a TD3/SAC critic pair (256-256 MLPs, 2 Q-functions) and the
Nature-DQN Atari CNN. Contenders, each updating a target module in place after one optimizer step:
``sb3 loop`` (Stable-Baselines3's ``polyak_update``: ``mul_`` then ``add_`` per tensor), ``foreach lerp``
(one ``torch._foreach_lerp_`` over prebuilt lists, the fastest hand-written form) and ``polyak``
(``EMA(net, tau=0.005, target="copy").update()``). Reported: median microseconds per update over rounds in
which the contenders take turns (in a rotating order), and the median over rounds of polyak's time over
``foreach lerp``'s in the same round.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

import polyak

TAU = 0.005


def shapes() -> dict[str, nn.Module]:
    mlp = lambda i, o, h: nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, o))  # noqa: E731
    atari = nn.Sequential(
        nn.Conv2d(4, 32, 8, 4), nn.ReLU(), nn.Conv2d(32, 64, 4, 2), nn.ReLU(), nn.Conv2d(64, 64, 3, 1), nn.ReLU(),
        nn.Flatten(), nn.Linear(3136, 512), nn.ReLU(), nn.Linear(512, 18),
    )  # fmt: skip
    return {
        "DQN CartPole Q-net": mlp(4, 2, 128),
        "TD3/SAC critics (2x 256-256)": nn.ModuleList([mlp(20, 1, 256), mlp(20, 1, 256)]),
        "Nature-DQN Atari CNN": atari,
    }


def contenders(online: nn.Module) -> dict[str, Callable[[], None]]:
    target_sb3, target_foreach = copy.deepcopy(online), copy.deepcopy(online)
    params = list(online.parameters())
    sb3_targets, foreach_targets = list(target_sb3.parameters()), list(target_foreach.parameters())
    ema = polyak.EMA(online, tau=TAU, target="copy")

    @torch.no_grad()
    def sb3() -> None:
        for param, target in zip(params, sb3_targets, strict=True):
            target.mul_(1 - TAU)
            target.add_(param, alpha=TAU)

    @torch.no_grad()
    def foreach() -> None:
        torch._foreach_lerp_(foreach_targets, params, TAU)

    return {"sb3 loop": sb3, "foreach lerp": foreach, "polyak": ema.update}


def main(repeats: int = 2000, threads: int = 1) -> dict[str, dict[str, float]]:
    torch.set_num_threads(threads)
    results: dict[str, dict[str, float]] = {}
    print(f"| shape | parameters | {' | '.join(['sb3 loop', 'foreach lerp', 'polyak'])} | polyak / foreach |")
    print("|---|---|---|---|---|---|")
    for name, model in shapes().items():
        calls = contenders(model)
        times: dict[str, list[float]] = {key: [] for key in calls}
        for fn in calls.values():  # warm up
            for _ in range(20):
                fn()
        batch, keys = 10, list(calls)
        for round_ in range(max(1, repeats // batch)):
            for key in keys[round_ % 3 :] + keys[: round_ % 3]:  # the order rotates from round to round
                start = time.perf_counter()
                for _ in range(batch):
                    calls[key]()
                times[key].append((time.perf_counter() - start) / batch * 1e6)
        medians = {key: statistics.median(values) for key, values in times.items()}
        ratios = [a / b for a, b in zip(times["polyak"], times["foreach lerp"], strict=True)]
        medians["polyak / foreach"] = ratio = statistics.median(ratios)  # within each round, then the median
        results[name] = medians
        count = sum(p.numel() for p in model.parameters())
        cells = " | ".join(f"{medians[key]:.1f} µs" for key in calls)
        print(f"| {name} | {count:,} | {cells} | {ratio:.2f} |", flush=True)
    return results


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2000)
    parser.add_argument("--threads", type=int, default=1)
    options = parser.parse_args()
    main(options.repeats, options.threads)
