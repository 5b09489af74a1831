"""No decay to tune: the EMA width chosen on validation data.

:func:`select` takes the snapshots of a :class:`~polyak.posthoc.PostHocEMA`: every candidate width is
reconstructed in one pass over them (exactly what :func:`~polyak.posthoc.reconstruct` would write, held in
memory), loaded into the model in turn and scored by the user's ``evaluate(model) -> float``; the best one is
returned. :func:`select_average` does the same over averages tracked live (``MultiEMA.select``). Both return a
:class:`Selection`. Selection is exactly "reconstruct, load, evaluate, compare", without the files.
"""

from __future__ import annotations

import fnmatch
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from ..checks import check_int, check_number
from ..io import TensorSpec, output_format, save_state_dict
from ..module_tensors import unwrap
from ..rules import PowerFunction
from ..swap import exporting_average
from .fit import MAX_FIT_ERROR
from .snapshots import PATTERN, version
from .synthesis import Combinable, combine, load_snapshots

__all__ = ["GRID_SIZE", "MAX_MEMORY", "Selection", "select", "select_average"]

Mode = Literal["min", "max"]
Key = float | str  # a candidate: a width (snapshots) or an average's name (averages tracked live)

GRID_SIZE = 12
"""Log-spaced widths in the default grid of :func:`select` (the tracked widths are added to them)."""
MAX_MEMORY = 8 << 30
"""Default ``max_memory`` of :func:`select`: bytes of reconstructed candidates held at once (8 GiB)."""
_SCAN = np.geomspace(1e-3, 0.28, 200)  # widths probed for the range the snapshots express
_NEAR = 0.05  # a grid width within 5% of a tracked width gives way to it
_GOLDEN = (3.0 - math.sqrt(5.0)) / 2.0  # golden-section step: the new point's share of the larger interval


@dataclass(frozen=True)
class Selection:
    """The outcome of :func:`select` or :func:`select_average`.

    Attributes:
        chosen: the best candidate: a width ``sigma_rel`` (snapshots) or an average's name (averages tracked live).
        scores: what ``evaluate`` returned for each scored candidate, as plain floats, in the order evaluated.
        mode: ``"min"`` or ``"max"``: whether the lowest or the highest score won.
        state_dict: the chosen average's tensors (snapshots: what ``reconstruct`` writes for that width; live
            averages: the model's state dict with the average in place).
        output: the file they were written to, if ``output=`` was given.
        widths: each candidate's ``sigma_rel`` (live averages: those with a power-function rule only).
        fit_errors: relative L2 error of each candidate width's fitted profile, scored or not (snapshots only).
        tracked: the widths the snapshots hold. reach: the lowest and highest width they express within
            :data:`~polyak.posthoc.MAX_FIT_ERROR` (None: live averages, or none). step: the snapshot step.
        passes: reads of the snapshots (one per batch of candidates under ``max_memory``, one per refinement).
    """

    chosen: Key
    scores: dict[Key, float]
    mode: Mode
    state_dict: dict[str, Tensor] = field(repr=False)
    output: Path | None = None
    widths: dict[Key, float] = field(default_factory=dict)
    fit_errors: dict[float, float] = field(default_factory=dict)
    tracked: tuple[float, ...] = ()
    reach: tuple[float, float] | None = None
    step: int | None = None
    passes: int = 0

    @property
    def sigma_rel(self) -> float | None:
        """The chosen width (None for a live average whose rule is not a power function)."""
        return self.widths.get(self.chosen)

    @property
    def left_out(self) -> dict[float, float]:
        """Candidate widths the snapshots cannot express (fit error above the bound), with their fit errors."""
        return {width: error for width, error in self.fit_errors.items() if width not in self.scores}

    def plot(self, path: str | Path, *, score: str = "score") -> None:
        """Write a PNG of the score (``score`` names it on the axis) against ``sigma_rel`` (log axis), the chosen
        and the tracked widths marked and widths the snapshots cannot express shaded. Needs matplotlib
        (``pip install 'polyak[plot]'``)."""
        from .plot import plot_selection

        plot_selection(self, Path(path), score)


def select(
    directory: str | Path,
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    sigma_rels: Sequence[float] | None = None,
    step: int | None = None,
    mode: Mode = "min",
    grid_size: int = GRID_SIZE,
    refine: int = 0,
    max_memory: int = MAX_MEMORY,
    dtype: torch.dtype = torch.float32,
    output: str | Path | None = None,
) -> Selection:
    """The EMA width whose average, reconstructed from the snapshots in ``directory``, scores best on ``evaluate``.

    Candidates: ``sigma_rels``, or by default ``grid_size`` log-spaced widths over the range the snapshots
    express (fit error at most :data:`~polyak.posthoc.MAX_FIT_ERROR`; 3 significant digits, one within 5% of a
    tracked width replaced by it) plus the tracked widths, ascending. A candidate the snapshots cannot express
    is not scored: it is reported in ``fit_errors`` / ``left_out``.
    ``refine=n`` then takes n golden-section steps on log ``sigma_rel`` between the best candidate's neighbours,
    each one more reconstruction (and pass over the snapshots) and evaluation; default 0.

    Each candidate is what :func:`~polyak.posthoc.reconstruct` writes for it at ``step`` (default: the latest
    snapshot's) in ``dtype``, loaded into ``model`` with ``load_state_dict(strict=False)``; its score is
    ``evaluate(model)`` (a number; put the model in the mode evaluation needs, e.g. ``model.eval()``). ``mode``:
    ``"min"`` (a loss) or ``"max"`` (an accuracy); a tie goes to the candidate evaluated first. A NaN score is
    an error naming the width (it cannot be ranked): return ``inf`` (``-inf`` for ``"max"``) to rank a
    candidate last. On return, and on any exception, ``model`` holds its own weights again, bit for bit, and
    every module is in the train/eval mode it was in.

    Cost: one evaluation per candidate plus one pass over the snapshots (read in 1Mi-element pieces, as by
    ``reconstruct``). Memory: one copy of the model's state (to restore it) plus one model per candidate in
    ``dtype``; when all candidates together would exceed ``max_memory`` bytes (default :data:`MAX_MEMORY`,
    8 GiB), they are reconstructed in batches that fit (at least one candidate each), one pass per batch, the
    best so far kept.

    Returns a :class:`Selection` holding the chosen average's tensors, also written to ``output`` (atomically,
    ``.safetensors`` or ``.pt``) if given. Refused (``ValueError``): fewer than two snapshots at or before
    ``step``, a ``step`` that is not a snapshot's, snapshot tensors the model lacks or shapes it does not
    have, and candidates none of which the snapshots can express.
    """
    mode = _check_mode(mode)
    check_int("grid_size", grid_size, low=2, hint="the number of log-spaced widths to try, e.g. 12")
    check_int("refine", refine, low=0, hint="golden-section steps after the grid, e.g. 0 or 4")
    check_int("max_memory", max_memory, low=1, hint="bytes of candidates held at once, e.g. 8 << 30")
    _check_callable(evaluate)
    if output is not None:
        output_format(output)  # an unknown suffix is refused before any work
        where = Path(os.path.realpath(output))
        if where.parent == Path(os.path.realpath(directory)) and fnmatch.fnmatch(where.name, PATTERN):
            raise ValueError(
                f"output {str(output)!r} is named like a snapshot in the snapshot directory; name it otherwise"
            )
    found = load_snapshots(directory, step, dtype=dtype)
    if found.used < 2:
        raise ValueError(
            f"{str(directory)!r} holds {found.used} snapshot at or before step {found.step}; choosing a width needs "
            "at least 2 (one snapshot expresses little beyond its own widths): snapshot more often (snapshot_every)"
        )
    target = unwrap(model)
    _check_fits(found, target)
    _, scan_errors = found.solve(_SCAN.tolist())
    expressible = _SCAN[scan_errors <= MAX_FIT_ERROR]
    reach = (float(expressible[0]), float(expressible[-1])) if expressible.size else None
    tracked = tuple(found.last.sigma_rels)
    candidates = _candidates(sigma_rels, reach, tracked, grid_size)
    coefficients, errors = found.solve(candidates)
    fit_errors = {width: float(error) for width, error in zip(candidates, errors, strict=True)}
    reachable = [j for j, error in enumerate(errors) if error <= MAX_FIT_ERROR]
    if not reachable:
        raise ValueError(
            f"the snapshots cannot express any of sigma_rels {[f'{w:g}' for w in candidates]} (fit errors "
            f"{[f'{e:.2g}' for e in errors]}, above {MAX_FIT_ERROR:g}); they express {_described(reach)}"
        )
    names = list(found.specs)
    per_candidate = sum(spec.nbytes for spec in found.specs.values())
    batch = max(1, max_memory // max(per_candidate, 1))
    scores: dict[Key, float] = {}
    best: tuple[float, dict[str, Tensor]] | None = None
    passes = 0

    def scored(columns: np.ndarray, widths: list[float]) -> None:
        nonlocal best, passes
        held = [_Held(found.specs, names) for _ in widths]
        combine(found, columns, held, names)
        passes += 1
        for width, candidate in zip(widths, held, strict=True):
            target.load_state_dict(candidate.tensors, strict=False)
            scores[width] = _score(evaluate(model), f"sigma_rel {width:g}")
            if best is None or _better(scores[width], scores[best[0]], mode):
                best = (width, candidate.tensors)

    with _restoring(target):
        for first in range(0, len(reachable), batch):
            part = reachable[first : first + batch]
            scored(coefficients[:, part], [candidates[j] for j in part])
        for width in _golden(scores, mode, refine):
            if width is None or width in fit_errors:
                break
            columns, (error,) = found.solve([width])
            fit_errors[width] = float(error)
            if error > MAX_FIT_ERROR:
                break
            scored(columns, [width])
    assert best is not None
    chosen, state = best
    where_to = None
    if output is not None:
        metadata = {"sigma_rel": repr(chosen), "step": str(found.step), "relative_error": repr(fit_errors[chosen])}
        save_state_dict(state, output, metadata={**metadata, "polyak_version": version()})
        where_to = Path(output)
    widths: dict[Key, float] = {width: float(width) for width in scores}
    return Selection(chosen, scores, mode, state, where_to, widths, fit_errors, tracked, reach, found.step, passes)


def select_average(
    averages: Mapping[str, Any] | Iterable[tuple[str, Any]],
    model: nn.Module,
    evaluate: Callable[[nn.Module], float],
    *,
    mode: Mode = "min",
    output: str | Path | None = None,
) -> Selection:
    """The average (by name) that scores best on ``evaluate``, among averages tracked live, e.g. a MultiEMA's.

    Each average is swapped into ``model`` in turn (``average.swapped(model)``) and scored by ``evaluate(model)``;
    scores, ties, NaN and the model's restoration are as in :func:`select`. The chosen average's tensors are
    the model's state dict with it in place, also written to ``output`` if given. Memory: one copy of the
    model's state. ``MultiEMA.select(model, evaluate, mode=...)`` calls this on its averages.
    """
    mode = _check_mode(mode)
    _check_callable(evaluate)
    if output is not None:
        output_format(output)
    items = list(averages.items() if isinstance(averages, Mapping) else averages)
    if not items:
        raise ValueError("no averages to choose from; give (name, average) pairs, e.g. a MultiEMA's items()")
    for name, average in items:
        if getattr(average, "num_updates", 0) == 0:
            raise ValueError(f"average {name!r} has no update yet, so there is nothing to score; select after training")
    scores: dict[Key, float] = {}
    target = unwrap(model)
    with _restoring(target):
        for name, average in items:
            with average.swapped(model):
                scores[name] = _score(evaluate(model), f"average {name!r}")
    chosen = str(_chosen(scores, mode))
    with dict(items)[chosen].swapped(model), exporting_average():
        state = {name: value.detach().clone() for name, value in target.state_dict().items()}
    if output is not None:
        save_state_dict(state, output, metadata={"average": str(chosen), "polyak_version": version()})
    widths: dict[Key, float] = {
        name: average.rule.sigma_rel
        for name, average in items
        if isinstance(getattr(average, "rule", None), PowerFunction)
    }
    return Selection(chosen, scores, mode, state, Path(output) if output is not None else None, widths)


class _Held:
    """A :class:`~polyak.posthoc.synthesis.Sink` that keeps one candidate's tensors in memory."""

    def __init__(self, specs: Mapping[str, TensorSpec], names: Sequence[str]) -> None:
        self.tensors = {name: torch.empty(specs[name].shape, dtype=specs[name].dtype) for name in names}
        self._flat = [tensor.view(-1) for tensor in self.tensors.values()]
        self._index = 0
        self._done = 0  # elements of the current tensor filled

    def write(self, data: Tensor) -> None:
        while self._done == self._flat[self._index].numel():
            self._index, self._done = self._index + 1, 0
        self._flat[self._index][self._done : self._done + data.numel()].copy_(data.reshape(-1))
        self._done += data.numel()


@contextmanager
def _restoring(model: nn.Module) -> Iterator[None]:
    """Within the block ``model`` may hold anything; on exit its state dict (bit for bit) and every module's
    train/eval mode are as they were, also after an exception."""
    modes = [(module, module.training) for module in model.modules()]
    saved = {name: value.detach().clone() for name, value in model.state_dict().items()}
    try:
        yield
    finally:
        model.load_state_dict(saved)
        for module, training in modes:
            module.training = training


def _check_fits(found: Combinable, model: nn.Module) -> None:
    """Refuse snapshots whose tensors the model lacks or holds in another shape (before any work)."""
    state = model.state_dict()
    for name, spec in found.specs.items():
        if name not in state:
            raise ValueError(
                f"the snapshots hold tensor {name!r}, which the model lacks; pass the model they were taken of"
            )
        if tuple(state[name].shape) != spec.shape:
            raise ValueError(
                f"tensor {name!r} has shape {list(spec.shape)} in the snapshots but {list(state[name].shape)} in the "
                "model; pass the model they were taken of"
            )


def _candidates(
    sigma_rels: Sequence[float] | None, reach: tuple[float, float] | None, tracked: tuple[float, ...], size: int
) -> list[float]:
    """The given widths (checked, duplicates dropped), or ``size`` log-spaced ones over ``reach`` plus ``tracked``."""
    if sigma_rels is not None:
        if isinstance(sigma_rels, (str, bytes)) or not isinstance(sigma_rels, Iterable):
            raise TypeError(f"sigma_rels: expected a sequence of widths, e.g. (0.05, 0.1), got {sigma_rels!r}")
        bounds: dict[str, Any] = {"low": 1e-9, "high": 12.0**-0.5, "high_open": True}
        given = [check_number(f"sigma_rels[{i}]", s, **bounds) for i, s in enumerate(sigma_rels)]
        if not given:
            raise ValueError("sigma_rels is empty; give at least one width, or None for the default grid")
        return list(dict.fromkeys(given))
    if reach is None:
        return sorted(set(tracked))
    low, high = _rounded(reach[0], math.ceil), _rounded(reach[1], math.floor)
    grid = [low, *(_rounded(w, round) for w in np.geomspace(low, high, size)[1:-1]), high]
    grid = [w for w in grid if all(abs(math.log(w / t)) > _NEAR for t in tracked)]  # a tracked width stands in
    return sorted({*grid, *tracked})


def _rounded(width: float, how: Callable[[float], int]) -> float:
    """``width`` to 3 significant digits, rounded by ``how`` (``math.ceil`` rounds up: stays inside a range)."""
    unit = 10.0 ** (math.floor(math.log10(width)) - 2)
    return float(f"{how(width / unit) * unit:.3g}")


def _golden(scores: dict[Key, float], mode: Mode, steps: int) -> Iterator[float | None]:
    """Golden-section steps on log width between the best scored width's neighbours: yields the next width to
    score (reading ``scores`` again after each), or None when the bracket has closed."""
    for _ in range(steps):
        widths = sorted(float(w) for w in scores)
        best = float(_chosen(scores, mode))
        at = widths.index(best)
        low, high = widths[max(at - 1, 0)], widths[min(at + 1, len(widths) - 1)]
        a, b, c = math.log(low), math.log(best), math.log(high)
        if c - a < 1e-6:
            yield None
            return
        x = b + _GOLDEN * (c - b) if c - b >= b - a else b - _GOLDEN * (b - a)
        yield float(f"{math.exp(x):.4g}")


def _chosen(scores: Mapping[Key, float], mode: Mode) -> Key:
    """The best-scoring key; the first evaluated among equals."""
    best: Key | None = None
    for key, score in scores.items():
        if best is None or _better(score, scores[best], mode):
            best = key
    assert best is not None
    return best


def _better(score: float, than: float, mode: Mode) -> bool:
    return score < than if mode == "min" else score > than


def _score(value: Any, what: str) -> float:
    """``evaluate``'s result for ``what`` as a float; not a number, or NaN, is refused naming ``what``."""
    if isinstance(value, Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"evaluate returned a {type(value).__name__} for {what}; return one number, e.g. the loss")
    score = float(value)
    if math.isnan(score):
        raise ValueError(
            f"evaluate returned NaN for {what}, which cannot be ranked; fix the evaluation, or return inf "
            "(-inf with mode='max') to rank a candidate last"
        )
    return score


def _check_mode(mode: Any) -> Mode:
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' (a loss) or 'max' (an accuracy), got {mode!r}")
    return mode


def _check_callable(evaluate: Any) -> None:
    if not callable(evaluate):
        raise TypeError(f"evaluate must be a function model -> score, got {type(evaluate).__name__}")


def _described(reach: tuple[float, float] | None) -> str:
    return "no width" if reach is None else f"widths from about {reach[0]:.3g} to {reach[1]:.3g}"
