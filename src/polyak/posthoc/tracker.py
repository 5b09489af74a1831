"""PostHocEMA: several power-function EMAs of one model, updated together and saved as snapshots."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_flag, check_int, check_number
from ..front_end import FrontEnd, check_schedule, eager_when_compiled
from ..io import TensorSpec, open_writer
from ..rules import PowerFunction
from ..shadow import Policy, Shadow, check_same_layout, update_many
from .snapshots import FORMAT, version

__all__ = ["PostHocEMA"]


class PostHocEMA(FrontEnd):
    """Several power-function EMAs of one model, updated in one pass, saved as snapshots for reconstruction.

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

    _FORMAT = FORMAT
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
            "format": FORMAT,
            "step": str(self.last_update_step),
            "optimizer_step": str(self.start_step + self.last_update_step),
            "sigma_rels": json.dumps(self.sigma_rels),
            "gammas": json.dumps([rule.gamma for rule in self.rules]),
            "names": json.dumps(list(modes)),
            "copied": json.dumps([name for name, mode in modes.items() if mode == "copy"]),
            "aliases": json.dumps(self.shadows[0].aliases),  # other names of tied tensors
            "polyak_version": version(),
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
