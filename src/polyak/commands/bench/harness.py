"""The timing harness: every contender between two runs of the floor, interleaved, as a ratio to the floor.

A sample lasts at least ``_SAMPLE_S`` so that a time slice lent to another process is a small part of it; each
contender is timed between two floor runs and compared with their geometric mean, so load that changes over
seconds cancels out; the order rotates from round to round; the report is the median ratio over rounds, with
its quartiles.
"""

from __future__ import annotations

import gc
import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .census import Census, live_storages

__all__ = ["DECAY", "Contender", "Result", "Step", "averaged_elements", "measure"]

DECAY = 0.999
_SAMPLE_S = 0.05  # shortest timed sample, in seconds
Step = Callable[[], None]


def _always() -> bool:
    return True


@dataclass
class Contender:
    """One implementation: ``build(model)`` returns the call made after each optimizer step."""

    name: str
    build: Callable[[nn.Module], Step]
    prepare: Callable[[nn.Module], nn.Module] = lambda model: model  # the model it runs on (not counted)
    calls: int = 1  # calls per round; the time reported is per call (per optimizer step)
    note: str = ""
    average_bytes: int = 4  # bytes per averaged element (2 for a bfloat16 average), for the GB/s column
    shapes: tuple[str, ...] = ()  # the shapes it runs on (default: every shape)
    moved_bytes: int = 0  # bytes moved per element, if not a model read plus an average read and write
    available: Callable[[], bool] = _always  # False: not installed here, listed as skipped


@dataclass
class Result:
    """Measurements of one contender on one model shape."""

    name: str
    ms: float  # median time per call (per optimizer step), in milliseconds
    ratio: float  # median over rounds of time / floor time
    ratio_quartiles: tuple[float, float]  # the spread of that ratio over rounds
    rounds: int  # timed rounds
    gb_per_s: float  # the update's minimum traffic divided by its time
    ops: float  # ATen operations per call
    syncs: float  # host synchronisations (_local_scalar_dense) per call
    alloc_mb: float  # new tensor memory per call, in MB (10^6 bytes)
    extra_memory: float  # memory kept alive by the implementation, as a multiple of the model's parameter bytes
    note: str = ""


def averaged_elements(model: nn.Module) -> int:
    """Elements of the floating tensors polyak averages by default (parameters and persistent buffers)."""
    state = model.state_dict(keep_vars=True)
    unique = {id(t): t for t in state.values() if t.is_floating_point()}
    return sum(t.numel() for t in unique.values())


def _parameter_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(model: nn.Module, chosen: Sequence[Contender], repeats: int, budget_s: float) -> list[Result]:
    """Time ``chosen`` on ``model`` (the first is the floor), interleaved; ``repeats`` <= 0 fits ``budget_s``."""
    device = next(model.parameters()).device
    numel = averaged_elements(model)
    steps: list[Step] = []
    counts: list[tuple[float, float, float, float]] = []
    traffic: list[int] = []
    subjects = [contender.prepare(model) for contender in chosen]
    gc.collect()
    live = live_storages()
    for contender, subject in zip(chosen, subjects, strict=True):
        dtype_bytes = next(subject.parameters()).element_size()
        traffic.append(numel * (contender.moved_bytes or dtype_bytes + 2 * contender.average_bytes))
        step = contender.build(subject)
        for _ in range(2 * contender.calls):  # warm up: first calls copy the model, plans are built
            step()
        gc.collect()
        before, live = live, live_storages()
        kept = sum(size for ptr, size in live.items() if ptr not in before)
        with Census() as census:
            for _ in range(contender.calls):
                step()
        n = contender.calls
        extra = kept / _parameter_bytes(subject)
        counts.append((census.ops / n, census.syncs / n, census.allocated / n / 1e6, extra))
        steps.append(step)
    _synchronize(device)

    calls = [contender.calls for contender in chosen]

    def timed(i: int) -> float:
        _synchronize(device)
        start = time.perf_counter()
        for _ in range(calls[i]):
            steps[i]()
        _synchronize(device)
        return (time.perf_counter() - start) / calls[i]

    for i, contender in enumerate(chosen):
        calls[i] = contender.calls * max(1, math.ceil(_SAMPLE_S / max(timed(i) * contender.calls, 1e-9)))

    times: list[list[float]] = [[] for _ in chosen]
    ratios: list[list[float]] = [[1.0]] + [[] for _ in chosen[1:]]
    start = time.perf_counter()
    r = 0
    while r < max(repeats, 1):
        floor_before = timed(0)
        times[0].append(floor_before)
        for k in range(1, len(chosen)):
            i = 1 + (k - 1 + r) % (len(chosen) - 1)
            elapsed, floor_after = timed(i), timed(0)
            times[i].append(elapsed)
            times[0].append(floor_after)
            ratios[i].append(elapsed / math.sqrt(floor_before * floor_after))
            floor_before = floor_after
        if r == 0 and repeats <= 0:  # the first round tells how many fit the budget
            repeats = int(min(50, max(5, budget_s / (time.perf_counter() - start))))
        r += 1
    results = []
    for contender, series, ratio, (ops, syncs, alloc, extra), nbytes in zip(
        chosen, times, ratios, counts, traffic, strict=True
    ):
        median = statistics.median(series)
        results.append(
            Result(
                contender.name,
                median * 1e3,
                statistics.median(ratio),
                _quartiles(ratio),
                r,
                nbytes / median / 1e9,
                ops,
                syncs,
                alloc,
                extra,
                contender.note,
            )
        )
    return results


def _quartiles(values: Sequence[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    low, _, high = statistics.quantiles(values, n=4)
    return low, high
