"""Post-hoc reconstruction: the EMA of any width at a snapshot's step, combined from the snapshots on disk."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..checks import check_int, check_number
from ..io import TensorSpec, check_output, open_writer, output_format
from ..rules import sigma_rel_to_gamma
from .fit import MAX_FIT_ERROR, solve_coefficients
from .snapshots import PATTERN, Snapshot, find_snapshots, version

__all__ = ["Combinable", "Reconstruction", "Sink", "combine", "load_snapshots", "reconstruct"]

_CHUNK = 1 << 20  # reconstruction combines tensors in flat pieces of this many elements


@dataclass(frozen=True)
class Reconstruction:
    """What :func:`reconstruct` combined: ``coefficients[row, target]`` for ``rows[row] = (snapshot, profile)``."""

    step: int
    sigma_rels: tuple[float, ...]
    snapshots: list[Snapshot]
    rows: list[tuple[int, int]]
    coefficients: np.ndarray
    errors: np.ndarray


def reconstruct(
    directory: str | Path,
    sigma_rels: Sequence[float],
    outputs: Sequence[str | Path],
    *,
    step: int | None = None,
    dtype: torch.dtype = torch.float32,
    force: bool = False,
) -> Reconstruction:
    """Synthesise the EMA of each relative width in ``sigma_rels`` at ``step`` from the snapshots in ``directory``.

    Writes one file per target to ``outputs``, in the format of its suffix (``.safetensors``, or
    ``.pt/.pth/.bin/.ckpt`` for ``torch.load``): a state dict of the tracked tensors, averaged ones in ``dtype``.
    Uses only snapshots at or before ``step`` (default: the latest snapshot's step). Tensors are combined in flat
    pieces (accumulated in float64) and streamed to the outputs, so memory stays at about one piece per target
    (1Mi elements; one output model for a ``.pt`` output), whatever the number of snapshots. Copied tensors
    come from the latest snapshot used.

    Refused (``ValueError``): snapshots whose tensors differ in names, shapes or dtypes; an output in ``directory``
    (inputs are read-only, and a later run would read it as a snapshot); and, unless ``force``, a target the
    snapshots cannot express: a ``step`` that is not a snapshot's step (after the last one nothing was seen;
    between two, the training since the earlier one is missing), or a fit whose relative profile error is
    above :data:`MAX_FIT_ERROR`.
    """
    if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
        raise TypeError(f"sigma_rels: expected a sequence of numbers, e.g. (0.05, 0.10), got {sigma_rels!r}")
    width = {"low": 1e-9, "high": 12.0**-0.5, "high_open": True, "hint": "e.g. 0.05 or 0.10"}
    targets = tuple(check_number(f"sigma_rels[{i}]", s, **width) for i, s in enumerate(sigma_rels))
    if step is not None:
        step = check_int("step", step, low=1, hint="the optimizer steps since averaging began; default: the latest")
    if len(outputs) != len(targets):
        raise ValueError(f"give one output path per target sigma_rel: {len(targets)} targets, {len(outputs)} outputs")
    formats = [output_format(output) for output in outputs]
    directory = Path(directory)
    if len({os.path.realpath(output) for output in outputs}) != len(outputs):
        raise ValueError(f"two outputs are the same file ({', '.join(map(str, outputs))}); give one per target")
    for output in outputs:  # a file in the snapshot folder would be read as a snapshot by a later run
        check_output(output, [("the snapshot folder", directory)])
    found = load_snapshots(directory, step, dtype=dtype, force=force)
    step = found.step
    coefficients, errors = found.solve(targets)
    worst = int(np.argmax(errors))
    if not force and float(errors[worst]) > MAX_FIT_ERROR:
        raise ValueError(
            f"sigma_rel {targets[worst]:g} at step {step} is fitted with a relative profile error of "
            f"{float(errors[worst]):.2g}, above {MAX_FIT_ERROR:g}: the snapshots' widths "
            f"({_listed(found.widths)}) cannot express it; pick a width nearer theirs, or force it (--force)"
        )
    with ExitStack() as stack:
        writers = []
        for target, error, output, fmt in zip(targets, errors, outputs, formats, strict=True):
            metadata = {
                "format": "polyak.posthoc.reconstruction/1",
                "sigma_rel": repr(target),
                "gamma": repr(sigma_rel_to_gamma(target)),
                "step": str(step),
                "relative_error": repr(float(error)),
                "snapshots": str(found.used),
                "polyak_version": version(),
            }
            writers.append(stack.enter_context(open_writer(output, found.specs, format=fmt, metadata=metadata)))
        combine(found, coefficients, writers, writers[0].names)  # every writer takes the tensors in that order
    return Reconstruction(step, targets, found.snapshots, found.rows, coefficients, errors)


class Sink(Protocol):
    """Where :func:`combine` puts the tensors of one target: consecutive flat pieces, tensor after tensor."""

    def write(self, data: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class Combinable:
    """Snapshots checked to be of one model, and what combining them at ``step`` yields.

    ``rows[row] = (snapshot, profile)`` over all ``snapshots``; ``used`` of them are at or before ``step``, the
    latest being ``last`` (copied tensors come from it). ``specs``: the output tensors (averaged ones in the
    requested dtype; a tied tensor under each of its names), ``sources[name]`` the snapshot tensor each is read from.
    """

    step: int
    snapshots: list[Snapshot]
    rows: list[tuple[int, int]]
    used: int
    last: Snapshot
    specs: dict[str, TensorSpec]
    sources: dict[str, str]

    @property
    def widths(self) -> list[float]:
        """The distinct widths the used snapshots hold, ascending."""
        return sorted({s for snap in self.snapshots[: self.used] for s in snap.sigma_rels})

    def solve(self, targets: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
        """:func:`~polyak.posthoc.solve_coefficients` for ``targets`` at ``step``: ``(coefficients, errors)``."""
        steps = [self.snapshots[i].step for i, _ in self.rows]
        return solve_coefficients(steps, [self.snapshots[i].sigma_rels[k] for i, k in self.rows], self.step, targets)


def load_snapshots(
    directory: str | Path, step: int | None = None, *, dtype: torch.dtype = torch.float32, force: bool = False
) -> Combinable:
    """The snapshots in ``directory`` ready to combine at ``step`` (default: the latest snapshot's).

    Refused (``ValueError``): no snapshots; snapshots whose tensors differ in names, shapes or dtypes; and, unless
    ``force``, a ``step`` that is not a snapshot's step.
    """
    directory = Path(directory)
    snapshots = find_snapshots(directory)
    if not snapshots:
        raise ValueError(f"no snapshots ({PATTERN}) in {str(directory)!r}; write them with PostHocEMA(directory=...)")
    runs = sorted({s.run or "(unnamed)" for s in snapshots})
    if len(runs) > 1:
        raise ValueError(
            f"{str(directory)!r} holds snapshots of {len(runs)} runs ({', '.join(runs)}); their averages cannot be "
            "combined: move each run's snapshots into a folder of its own"
        )
    step = snapshots[-1].step if step is None else step
    steps = [snap.step for snap in snapshots]
    if not force and step not in steps:
        position = "after the last snapshot" if step > steps[-1] else "between snapshots"
        raise ValueError(
            f"step {step} is {position} (snapshot steps: {_listed(steps)}); the snapshots hold no average of the "
            "training since the one before it, so the result would not be that EMA: pick a snapshot's step, "
            "or force it (--force)"
        )
    used = [i for i, snap in enumerate(snapshots) if snap.step <= step]
    if not used:
        raise ValueError(f"no snapshot at or before step {step}; the earliest is at step {steps[0]}")
    last = snapshots[used[-1]]
    for i in used:
        snap = snapshots[i]
        if (snap.names, snap.copied, snap.aliases) != (last.names, last.copied, last.aliases):
            raise ValueError(
                f"snapshots {str(snapshots[i].path)!r} and {str(last.path)!r} hold different tensors; "
                "reconstruct from snapshots of one model only"
            )
        for key, spec in last.tensors.specs.items():
            found = snap.tensors.specs.get(key)
            if found is not None and (found.shape != spec.shape or found.dtype != spec.dtype):
                raise ValueError(
                    f"tensor {key!r} has {found} in {str(snap.path)!r} but {spec} in {str(last.path)!r}; "
                    "reconstruct from snapshots of one model only"
                )
    tied: dict[str, list[str]] = {}
    for alias, name in last.aliases.items():
        tied.setdefault(name, []).append(alias)
    specs, sources = {}, {}  # a tied tensor is written under each of its names, so the output loads strictly
    for name in last.names:
        spec = last.tensors.specs[f"0/{name}"]
        for out_name in (name, *tied.get(name, ())):
            specs[out_name] = TensorSpec(spec.shape, spec.dtype if name in last.copied else dtype)
            sources[out_name] = name
    rows = [(i, k) for i, snap in enumerate(snapshots) for k in range(len(snap.sigma_rels))]
    return Combinable(step, snapshots, rows, len(used), last, specs, sources)


def combine(found: Combinable, coefficients: np.ndarray, sinks: Sequence[Sink], names: Sequence[str]) -> None:
    """Write ``sum_row coefficients[row, target] * snapshot tensor`` of every tensor in ``names`` to ``sinks[target]``.

    The one place where snapshots are combined. Each snapshot is read once, in flat pieces of 1Mi elements,
    whatever the number of targets; the pieces are accumulated in float64 (one buffer per target) and handed to
    each sink in the output dtype, tensor after tensor in the order ``names``. Copied tensors come from ``last``.
    """
    snapshots, last, specs = found.snapshots, found.last, found.specs
    live = [(row, i, k) for row, (i, k) in enumerate(found.rows) if np.any(coefficients[row] != 0)]
    # Buffers allocated once and reused, so memory does not depend on how the allocator recycles them.
    sums = torch.empty(len(sinks), _CHUNK, dtype=torch.float64)
    buffers: dict[torch.dtype, torch.Tensor] = {}

    def buffer(dtype: torch.dtype, n: int) -> torch.Tensor:
        if dtype not in buffers:
            buffers[dtype] = torch.empty(_CHUNK, dtype=dtype)
        return buffers[dtype][:n]

    for out_name in names:
        out_dtype, name, numel = specs[out_name].dtype, found.sources[out_name], specs[out_name].numel
        for start in range(0, numel, _CHUNK):
            stop = min(numel, start + _CHUNK)
            if name in last.copied:
                value = last.tensors.read(f"0/{name}", start, stop, buffer(out_dtype, stop - start))
                for sink in sinks:
                    sink.write(value)
                continue
            totals = sums[:, : stop - start].zero_()
            for row, i, k in live:
                tensors, key = snapshots[i].tensors, f"{k}/{name}"
                value = tensors.read(key, start, stop, buffer(tensors.specs[key].dtype, stop - start))
                value = buffer(torch.float64, stop - start).copy_(value)  # no hidden temporary in add_
                for r, total in enumerate(totals):
                    if coefficients[row, r] != 0:
                        total.add_(value, alpha=float(coefficients[row, r]))
            for sink, total in zip(sinks, totals, strict=True):
                sink.write(buffer(out_dtype, stop - start).copy_(total))


def _listed(numbers: Sequence[float]) -> str:
    """Plain numbers for a message (never ``np.float64(0.5)``), eliding a long middle."""
    shown = [f"{float(x):g}" for x in numbers]
    return ", ".join(shown if len(shown) <= 8 else [*shown[:3], "...", *shown[-3:]])
