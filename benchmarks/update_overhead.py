"""The fixed Python cost of ``EMA.update`` on a small network, against a bare ``_foreach_lerp_``.

``python benchmarks/update_overhead.py [--src PATH]`` times, on the SAC twin critic (12 tensors, 144k elements,
one thread), a bare ``torch._foreach_lerp_`` over the same tensors and ``EMA.update``, interleaved in short
samples (so load from other processes hits both alike), and prints the median ratio and times. ``--src``
points at another checkout's ``src`` to compare versions. On a loaded machine this resolves a few percent
where ``polyak bench``'s longer samples do not.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--src", default=str(Path(__file__).resolve().parent.parent / "src"), help="polyak's src folder")
parser.add_argument("--rounds", type=int, default=60, help="interleaved samples of each (default 60)")
parser.add_argument("--calls", type=int, default=200, help="calls per sample (default 200)")
args = parser.parse_args()
sys.path.insert(0, args.src)

import torch  # noqa: E402
from torch import nn  # noqa: E402

from polyak import EMA  # noqa: E402

torch.set_num_threads(1)


def critic() -> nn.Sequential:
    return nn.Sequential(nn.Linear(23, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 1))


model = nn.ModuleDict({"q1": critic(), "q2": critic()})
ema = EMA(model, decay=0.999)
ema.update()
ema.update()
models = [p.detach() for p in model.parameters()]
averages = [t.clone() for t in models]


def bare() -> None:
    torch._foreach_lerp_(averages, models, 0.001)


times: dict[str, list[float]] = {"bare _foreach_lerp_": [], "EMA.update": []}
for _ in range(args.rounds):
    for name, call in zip(times, (bare, ema.update), strict=True):
        start = time.perf_counter()
        for _ in range(args.calls):
            call()
        times[name].append((time.perf_counter() - start) / args.calls)
ratio = statistics.median(e / b for b, e in zip(*times.values(), strict=True))
medians = ", ".join(f"{name} {statistics.median(v) * 1e6:.1f} us" for name, v in times.items())
print(f"SAC twin critic, 1 thread: EMA.update / bare foreach = {ratio:.3f} (medians: {medians})")
