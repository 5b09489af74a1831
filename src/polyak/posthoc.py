"""Power-function EMA with snapshots, and post-hoc reconstruction of other EMA lengths (EDM2).

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv:2312.02696.
The average taken at step t with exponent gamma weighs the iterate at step tau by the profile
``p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`` on ``[0, t]``. :class:`PostHocEMA` keeps a few such
averages (different widths ``sigma_rel``) and saves them now and then; :func:`reconstruct` later combines the
saved averages linearly so that their combined profile approximates any other ``(sigma_rel, step)``, by least
squares in L2 (the paper's Algorithm 3), and writes the combined weights. Steps are optimizer steps since
averaging began (``step - start_step``), the time the profiles are defined in.
"""

from __future__ import annotations

import fnmatch
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .checks import check_flag, check_int, check_number
from .front_end import FrontEnd, check_schedule, eager_when_compiled
from .io import SafetensorsFile, TensorSpec, open_writer, output_format
from .rules import PowerFunction, sigma_rel_to_gamma
from .shadow import Policy, Shadow, check_same_layout, update_many

__all__ = ["PostHocEMA", "Reconstruction", "Snapshot", "find_snapshots", "reconstruct", "solve_coefficients"]

_FORMAT = "polyak.posthoc/1"
_PATTERN = "phema-*.safetensors"
_CHUNK = 1 << 20  # reconstruction combines tensors in flat pieces of this many elements


# ---------------------------------------------------------------------- the least-squares fit


def _inner(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """``<p_a, p_b>`` in L2 for all pairs (a down, b across): the integral over ``[0, min(t_a, t_b)]``.

    ``(g_a+1)(g_b+1) / (g_a+g_b+1) * (lo/hi)**g / hi`` where ``hi``, ``lo`` are the larger and smaller time and
    ``g`` the exponent of the profile ending at ``hi`` (arXiv:2312.02696, Algorithm 3).
    """
    ta, ga, tb, gb = t_a[:, None], g_a[:, None], t_b[None, :], g_b[None, :]
    hi, lo = np.maximum(ta, tb), np.minimum(ta, tb)
    g = np.where(ta <= tb, gb, ga)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (lo / hi) ** g / hi


def solve_coefficients(
    steps: Sequence[float],
    sigma_rels: Sequence[float],
    target_step: float,
    target_sigma_rels: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients that combine saved power-function averages into averages of other widths.

    Args:
        steps: the step (since averaging began) of each saved average, > 0.
        sigma_rels: the relative width of each saved average (same length as ``steps``).
        target_step: the step of the wanted averages; only saved averages at or before it are used.
        target_sigma_rels: the wanted relative widths.

    Returns:
        ``(coefficients, errors)``: a float64 array with one row per saved average and one column per target
        (rows of unused averages are 0; each column sums to 1), and for each target the relative L2 error
        ``||p_target - sum_i x_i p_i|| / ||p_target||`` of the fitted profile.
    """
    t = np.asarray(steps, dtype=np.float64).reshape(-1)
    s = np.asarray(sigma_rels, dtype=np.float64).reshape(-1)
    targets = np.asarray(target_sigma_rels, dtype=np.float64).reshape(-1)
    if t.shape != s.shape:
        raise ValueError(f"steps and sigma_rels must have the same length, got {t.size} and {s.size}")
    if not (np.all(np.isfinite(t)) and np.all(t > 0)):
        raise ValueError(f"steps must be positive finite numbers of steps, got {t.tolist()}")
    if not (np.isfinite(target_step) and target_step > 0):
        raise ValueError(f"target_step must be a positive number of steps, got {target_step}")
    if targets.size == 0:
        raise ValueError("target_sigma_rels is empty; give at least one relative width, e.g. [0.1]")
    gammas = np.array([sigma_rel_to_gamma(x) for x in s])
    target_gammas = np.array([sigma_rel_to_gamma(x) for x in targets])
    used = t <= target_step
    if not used.any():
        raise ValueError(
            f"no saved average at or before target_step={target_step}; the earliest is at step {t.min():g}"
        )
    pairs = list(zip(t[used].tolist(), s[used].tolist(), strict=True))
    if len(set(pairs)) != len(pairs):
        duplicate = next(p for p in pairs if pairs.count(p) > 1)
        raise ValueError(f"the saved average (step, sigma_rel) = {duplicate} appears twice; pass each once")
    tu = t[used] / float(target_step)  # the fit depends only on step ratios; this keeps the numbers near 1
    gu = gammas[used]
    a = _inner(tu, gu, tu, gu)
    b = _inner(tu, gu, np.ones_like(target_gammas), target_gammas)
    x = np.linalg.solve(a, b)
    x /= x.sum(axis=0, keepdims=True)
    norm2 = (target_gammas + 1) ** 2 / (2 * target_gammas + 1)  # <p_r, p_r> at t = 1
    residual2 = norm2 - 2 * np.sum(x * b, axis=0) + np.sum(x * (a @ x), axis=0)
    errors = np.sqrt(np.maximum(residual2, 0.0) / norm2)
    coefficients = np.zeros((t.size, targets.size))
    coefficients[used] = x
    return coefficients, errors


# ---------------------------------------------------------------------- the tracker


class PostHocEMA(FrontEnd):
    """Several power-function EMAs of one model, updated in one pass, saved as snapshots for :func:`reconstruct`.

    Call :meth:`update` after every optimizer step (or :meth:`attach` the optimizer). Each average uses
    :class:`~polyak.rules.PowerFunction`, exact for any ``update_every``. Every ``snapshot_every`` steps (a
    multiple of ``update_every``) all averages are written to one file ``phema-<step>.safetensors`` in
    ``directory`` (see :meth:`snapshot`), ``<step>`` counting optimizer steps since averaging began. Save
    :meth:`state_dict` with your checkpoint to resume.

    Args:
        model: the model being trained.
        sigma_rels: relative widths of the tracked profiles (default 0.05 and 0.10, as in the paper).
        gammas: the profiles' exponents, instead of ``sigma_rels``.
        directory: where snapshots go (created if missing); None to only snapshot on demand to a given directory.
        snapshot_every: optimizer steps between snapshots; None for on-demand snapshots only.
        update_every: optimizer steps between updates (>= 1). start_step: steps before averaging begins.
        snapshot_dtype: dtype of averaged tensors in snapshots (float32).
        buffers: which buffers take part; this and ``frozen``, ``exclude``, ``include_nonpersistent``,
            ``dtype`` and ``device`` are :class:`~polyak.shadow.Shadow`'s options.
    """

    _FORMAT = _FORMAT
    _WHAT = "PostHocEMA"

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Sequence[float] | None = None,
        *,
        gammas: Sequence[float] | None = None,
        directory: str | Path | None = None,
        snapshot_every: int | None = None,
        update_every: int = 1,
        start_step: int = 0,
        snapshot_dtype: torch.dtype = torch.float32,
        buffers: Policy = "average",
        frozen: Policy = "copy",
        exclude: Sequence[str] = (),
        include_nonpersistent: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        check_schedule(model, update_every, "start_step", start_step)
        if sigma_rels is not None and gammas is not None:
            raise ValueError("give sigma_rels or gammas, not both")
        if gammas is None and sigma_rels is None:
            sigma_rels = (0.05, 0.10)
        # The widths as given (0.1, not the 0.09999999999999999 that its gamma maps back to), or None.
        self._sigma_rels: list[float] | None = None
        if gammas is not None:
            self.rules = [PowerFunction(g) for g in _numbers("gammas", gammas, low=0.0, low_open=True)]
        else:
            bounds = {"low": 1e-9, "high": 12.0**-0.5, "high_open": True}
            self._sigma_rels = _numbers("sigma_rels", sigma_rels, **bounds)
            self.rules = [PowerFunction(sigma_rel=s) for s in self._sigma_rels]
        if not self.rules:
            name = "gammas" if gammas is not None else "sigma_rels"
            raise ValueError(f"{name}: expected at least one profile, got none; e.g. sigma_rels=(0.05, 0.10)")
        if snapshot_every is not None:
            check_int("snapshot_every", snapshot_every, low=1, hint="give optimizer steps between snapshots, or None")
            if snapshot_every % update_every:
                raise ValueError(
                    f"snapshot_every must be a positive multiple of update_every={update_every} (optimizer steps), "
                    f"got {snapshot_every!r}"
                )
        check_flag("include_nonpersistent", include_nonpersistent)
        if snapshot_every is not None and directory is None:
            raise ValueError("snapshot_every needs a directory to write the snapshots to")
        if not (isinstance(snapshot_dtype, torch.dtype) and snapshot_dtype.is_floating_point):
            raise TypeError(f"snapshot_dtype must be a floating torch.dtype, got {snapshot_dtype!r}")
        self.model = model
        self.directory = Path(directory) if directory is not None else None
        self.snapshot_every = snapshot_every
        self.update_every = update_every
        self.start_step = start_step
        self.snapshot_dtype = snapshot_dtype
        options: dict[str, Any] = dict(
            buffers=buffers,
            frozen=frozen,
            exclude=exclude,
            include_nonpersistent=include_nonpersistent,
            dtype=dtype,
            device=device,
        )
        self.shadows = [Shadow(model, **options) for _ in self.rules]
        for other in self.shadows[1:]:
            check_same_layout(self.shadows[0], other)
        self.step = 0
        self.num_updates = 0
        self.last_update_step = 0

    @property
    def sigma_rels(self) -> list[float]:
        """Relative widths of the tracked profiles."""
        return self._sigma_rels or [rule.sigma_rel for rule in self.rules]

    @eager_when_compiled  # inside a compiled step: one graph break, no recompile per step
    def update(self, model: nn.Module | None = None) -> None:
        """Count one optimizer step; fold the model into every average on update steps; snapshot when due."""
        t = self.step + 1 - self.start_step
        due = t >= 1 and t % self.update_every == 0
        if due:
            weights: list[float | torch.Tensor] = [rule.weight(t, t - self.last_update_step) for rule in self.rules]
            update_many(self.shadows, self._model(model), weights)
            self.last_update_step = t
            self.num_updates += 1
        self.step += 1  # counted once the update went through
        if due and self.snapshot_every is not None and t % self.snapshot_every == 0:
            self.snapshot()

    def snapshot(self, directory: str | Path | None = None) -> Path:
        """Write all averages, as of the last update, to ``directory/phema-<step>.safetensors`` (atomically).

        Tensor ``k/<name>`` holds profile k; the metadata records the step (since averaging began), the
        optimizer step, the profiles' ``sigma_rels`` and ``gammas``, the tensor names and which are copied.
        """
        if self.num_updates == 0:
            raise RuntimeError(f"nothing to snapshot before the first update (step={self.step})")
        where = Path(directory) if directory is not None else self.directory
        if where is None:
            raise ValueError("snapshot() needs a directory: pass one here or to PostHocEMA(directory=...)")
        where.mkdir(parents=True, exist_ok=True)
        modes = self.shadows[0].modes()
        metadata = {
            "format": _FORMAT,
            "step": str(self.last_update_step),
            "optimizer_step": str(self.start_step + self.last_update_step),
            "sigma_rels": json.dumps(self.sigma_rels),
            "gammas": json.dumps([rule.gamma for rule in self.rules]),
            "names": json.dumps(list(modes)),
            "copied": json.dumps([name for name, mode in modes.items() if mode == "copy"]),
            "aliases": json.dumps(self.shadows[0].aliases),  # other names of tied tensors
            "polyak_version": _version(),
        }
        specs, tensors = {}, {}
        for k, shadow in enumerate(self.shadows):
            for name, tensor in shadow.tensors().items():
                dtype = self.snapshot_dtype if modes[name] == "average" else tensor.dtype
                specs[f"{k}/{name}"] = TensorSpec(tuple(tensor.shape), dtype)
                tensors[f"{k}/{name}"] = tensor
        path = where / f"phema-{self.last_update_step:012d}.safetensors"
        with open_writer(path, specs, format="safetensors", metadata=metadata) as writer:
            for key in writer.names:
                writer.write(tensors[key].to(specs[key].dtype))
        return path

    @contextmanager
    def swapped(self, model: nn.Module | None = None, profile: int = 0) -> Iterator[nn.Module]:
        """Within the block the model holds average number ``profile``; its own weights come back on exit."""
        with self.shadows[self._profile(profile)].swapped(self._model(model)) as swapped:
            yield swapped

    def copy_to(self, model: nn.Module | None = None, profile: int = 0) -> None:
        """Write average number ``profile`` into the model, permanently."""
        self.shadows[self._profile(profile)].copy_to(self._model(model))

    def averaged_model(self, profile: int = 0) -> nn.Module:
        """A new module (a deep copy of the model) holding average number ``profile``, for evaluation or export."""
        return self.shadows[self._profile(profile)].clone_module(self.model)

    def _profile(self, profile: int) -> int:
        if self.num_updates == 0:
            raise RuntimeError(f"no average yet: the first update has not happened (step={self.step})")
        if not 0 <= profile < len(self.rules):
            raise ValueError(
                f"profile must be in 0..{len(self.rules) - 1} (sigma_rels {self.sigma_rels}), got {profile!r}"
            )
        return profile

    def _config(self) -> dict[str, Any]:
        return {
            "gammas": [rule.gamma for rule in self.rules],
            "update_every": self.update_every,
            "start_step": self.start_step,
            "snapshot_every": self.snapshot_every,
            "policy": self.shadows[0].policy(),
        }

    def state_dict(self) -> dict[str, Any]:
        """Counters, configuration (checked on load) and the averages; snapshots already written stay on disk."""
        self.shadows[0].check(self.model)  # a model changed since the last update: refused here too
        return self._state(shadows=[shadow.state_dict() for shadow in self.shadows])

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a :meth:`state_dict`; raises before changing anything if it does not fit."""
        counters = self._checked_counters(state)
        shadows = self._entry(state, "shadows", list)
        if len(shadows) != len(self.shadows):
            raise ValueError(
                f"saved PostHocEMA holds {len(shadows)} averages, this one {len(self.shadows)} (gammas "
                f"{state.get('gammas')!r}). The state is damaged: load an intact copy"
            )
        for shadow, saved in zip(self.shadows, shadows, strict=True):
            shadow.check_state_dict(saved)
        for shadow, saved in zip(self.shadows, shadows, strict=True):
            shadow.load_state_dict(saved)
        self._set_counters(counters)


def _numbers(name: str, values: Any, **bounds: Any) -> list[float]:
    """Each of ``values`` checked as ``name[i]`` (see :func:`polyak.checks.check_number`)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a sequence of numbers, e.g. (0.05, 0.10), got {values!r}")
    return [check_number(f"{name}[{i}]", value, **bounds) for i, value in enumerate(values)]


def _version() -> str:
    from . import __version__

    return __version__


# ---------------------------------------------------------------------- snapshots on disk and reconstruction


@dataclass(frozen=True)
class Snapshot:
    """One snapshot file: its step (since averaging began), profiles, tensor names and layout."""

    path: Path
    step: int
    sigma_rels: tuple[float, ...]
    names: tuple[str, ...]
    copied: frozenset[str]
    aliases: dict[str, str]
    tensors: SafetensorsFile


def find_snapshots(directory: str | Path) -> list[Snapshot]:
    """The snapshots (``phema-*.safetensors``) in ``directory``, by step; each file's header and checksums checked."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ValueError(f"snapshot directory {str(directory)!r} does not exist or is not a directory")
    snapshots = []
    for path in sorted(directory.glob(_PATTERN)):
        tensors = SafetensorsFile(path)
        metadata = tensors.metadata
        if metadata.get("format") != _FORMAT:
            raise ValueError(
                f"{str(path)!r} is not a polyak snapshot (format {metadata.get('format')!r}, expected {_FORMAT!r}); "
                "move it out of the snapshot directory"
            )
        try:
            snapshot = Snapshot(
                path,
                int(metadata["step"]),
                tuple(float(s) for s in json.loads(metadata["sigma_rels"])),
                tuple(str(n) for n in json.loads(metadata["names"])),
                frozenset(str(n) for n in json.loads(metadata["copied"])),
                {str(a): str(n) for a, n in json.loads(metadata["aliases"]).items()},
                tensors,
            )
            if not 0 < snapshot.step < 2**63:
                raise ValueError(f"step {snapshot.step} is not a positive int64")
            for sigma_rel in snapshot.sigma_rels:
                sigma_rel_to_gamma(sigma_rel)
        except (KeyError, ValueError, TypeError, AttributeError, RecursionError) as error:
            raise ValueError(f"{str(path)!r}: snapshot metadata is incomplete or malformed ({error})") from None
        keys = [f"{k}/{name}" for k in range(len(snapshot.sigma_rels)) for name in snapshot.names]
        missing = [key for key in keys if key not in tensors]
        if missing:
            raise ValueError(f"{str(path)!r} lacks tensor {missing[0]!r} ({len(missing)} missing); it is not usable")
        snapshots.append(snapshot)
    return sorted(snapshots, key=lambda s: s.step)


@dataclass(frozen=True)
class Reconstruction:
    """What :func:`reconstruct` combined: ``coefficients[row, target]`` for ``rows[row] = (snapshot, profile)``."""

    step: int
    sigma_rels: tuple[float, ...]
    snapshots: list[Snapshot]
    rows: list[tuple[int, int]]
    coefficients: np.ndarray
    errors: np.ndarray


MAX_FIT_ERROR = 0.1
"""The largest relative L2 error of a fitted profile that :func:`reconstruct` accepts without ``force``."""


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

    Refused (``ValueError``): snapshots whose tensors differ in names, shapes or dtypes; an output that a later
    run would read as a snapshot (``phema-*.safetensors`` in ``directory``); and, unless ``force``, a target the
    snapshots cannot express: a ``step`` that is not a snapshot's step (after the last one nothing was seen;
    between two, the training since the earlier one is missing), or a fit whose relative profile error is
    above :data:`MAX_FIT_ERROR`.
    """
    targets = tuple(float(s) for s in sigma_rels)
    if len(outputs) != len(targets):
        raise ValueError(f"give one output path per target sigma_rel: {len(targets)} targets, {len(outputs)} outputs")
    formats = [output_format(output) for output in outputs]
    directory = Path(directory)
    if len({os.path.realpath(output) for output in outputs}) != len(outputs):
        raise ValueError(f"two outputs are the same file ({', '.join(map(str, outputs))}); give one per target")
    for output in outputs:
        where = Path(os.path.realpath(output))
        if where.parent == Path(os.path.realpath(directory)) and fnmatch.fnmatch(where.name, _PATTERN):
            raise ValueError(
                f"output {str(output)!r} is named like a snapshot in the snapshot directory, where a later run "
                "would read it as one; write it elsewhere or under another name"
            )
    snapshots = find_snapshots(directory)
    if not snapshots:
        raise ValueError(f"no snapshots ({_PATTERN}) in {str(directory)!r}; write them with PostHocEMA(directory=...)")
    if step is not None and (isinstance(step, bool) or not 0 < int(step) < 2**63):
        raise ValueError(f"step must be a positive number of steps since averaging began, got {step}")
    step = snapshots[-1].step if step is None else int(step)
    steps = [snap.step for snap in snapshots]
    if not force and step not in steps:
        position = "after the last snapshot" if step > steps[-1] else "between snapshots"
        raise ValueError(
            f"step {step} is {position} (snapshot steps: {_listed(steps)}); the snapshots hold no average of the "
            "training since the one before it, so the result would not be that EMA: pick a snapshot's step, "
            "or force it (--force)"
        )
    rows = [(i, k) for i, snap in enumerate(snapshots) for k in range(len(snap.sigma_rels))]
    coefficients, errors = solve_coefficients(
        [snapshots[i].step for i, _ in rows], [snapshots[i].sigma_rels[k] for i, k in rows], step, targets
    )
    worst = int(np.argmax(errors))
    if not force and float(errors[worst]) > MAX_FIT_ERROR:
        raise ValueError(
            f"sigma_rel {targets[worst]:g} at step {step} is fitted with a relative profile error of "
            f"{float(errors[worst]):.2g}, above {MAX_FIT_ERROR:g}: the snapshots' widths "
            f"({_listed(sorted({s for snap in snapshots for s in snap.sigma_rels}))}) cannot express it; pick a "
            "width nearer theirs, or force it (--force)"
        )
    used = [i for i, snap in enumerate(snapshots) if snap.step <= step]
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
    live = [(row, i, k) for row, (i, k) in enumerate(rows) if np.any(coefficients[row] != 0)]
    with ExitStack() as stack:
        writers = []
        for target, error, output, fmt in zip(targets, errors, outputs, formats, strict=True):
            metadata = {
                "format": "polyak.posthoc.reconstruction/1",
                "sigma_rel": repr(target),
                "gamma": repr(sigma_rel_to_gamma(target)),
                "step": str(step),
                "relative_error": repr(float(error)),
                "snapshots": str(len(used)),
                "polyak_version": _version(),
            }
            writers.append(stack.enter_context(open_writer(output, specs, format=fmt, metadata=metadata)))
        # Buffers allocated once and reused, so memory does not depend on how the allocator recycles them.
        sums = torch.empty(len(targets), _CHUNK, dtype=torch.float64)
        buffers: dict[torch.dtype, torch.Tensor] = {}

        def buffer(dtype: torch.dtype, n: int) -> torch.Tensor:
            if dtype not in buffers:
                buffers[dtype] = torch.empty(_CHUNK, dtype=dtype)
            return buffers[dtype][:n]

        for out_name in writers[0].names:  # every writer takes the tensors in the same order
            out_dtype, name, numel = specs[out_name].dtype, sources[out_name], specs[out_name].numel
            for start in range(0, numel, _CHUNK):
                stop = min(numel, start + _CHUNK)
                if name in last.copied:
                    value = last.tensors.read(f"0/{name}", start, stop, buffer(out_dtype, stop - start))
                    for writer in writers:
                        writer.write(value)
                    continue
                totals = sums[:, : stop - start].zero_()
                for row, i, k in live:
                    tensors, key = snapshots[i].tensors, f"{k}/{name}"
                    value = tensors.read(key, start, stop, buffer(tensors.specs[key].dtype, stop - start))
                    value = buffer(torch.float64, stop - start).copy_(value)  # no hidden temporary in add_
                    for r, total in enumerate(totals):
                        if coefficients[row, r] != 0:
                            total.add_(value, alpha=float(coefficients[row, r]))
                for writer, total in zip(writers, totals, strict=True):
                    writer.write(buffer(out_dtype, stop - start).copy_(total))
    return Reconstruction(step, targets, snapshots, rows, coefficients, errors)


def _listed(numbers: Sequence[float]) -> str:
    """Plain numbers for a message (never ``np.float64(0.5)``), eliding a long middle."""
    shown = [f"{float(x):g}" for x in numbers]
    return ", ".join(shown if len(shown) <= 8 else [*shown[:3], "...", *shown[-3:]])
