"""PostHocEMA: several power-function EMAs of one model, updated together and saved as snapshots."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checks import check_int, check_number
from ..front_end import FrontEnd, check_schedule
from ..io import TensorSpec, open_writer
from ..kernels import Mix
from ..options import NonFinite, Options, Policy, Rounding
from ..rules import PowerFunction
from ..state import Listed, Spec
from .snapshots import FORMAT, PATTERN, find_snapshots, version

__all__ = ["PostHocEMA"]


class PostHocEMA(FrontEnd):
    """Several power-function EMAs of one model, updated in one pass, saved as snapshots for reconstruction.

    Call :meth:`update` after every optimizer step (or :meth:`attach` the optimizer). Each average uses
    :class:`~polyak.rules.PowerFunction`, exact for any ``update_every``. Every ``snapshot_every`` steps (a
    multiple of ``update_every``) all averages are written to one file ``phema-<step>.safetensors`` in
    ``directory`` (see :meth:`snapshot`), ``<step>`` counting optimizer steps since averaging began. Save
    :meth:`state_dict` with your checkpoint to resume.

    Each run has an identity (``run_id``, written in its snapshots and its state): a new run refuses a folder
    that holds another run's snapshots (it would overwrite some and mix with the rest), and a run resumed from
    its state continues there. Processes that write into one folder (DDP ranks) are one run: give them rank 0's
    ``run_id`` (the trainer callbacks do), or write snapshots on one rank only.

    Args:
        model: the model being trained.
        sigma_rels: relative widths of the tracked profiles (default 0.05 and 0.10, as in the paper).
        gammas: the profiles' exponents, instead of ``sigma_rels``.
        directory: where snapshots go (created if missing); None to only snapshot on demand to a given directory.
        snapshot_every: optimizer steps between snapshots; None for on-demand snapshots only.
        update_every: optimizer steps between updates (>= 1). start_step: steps before averaging begins.
        snapshot_dtype: dtype of averaged tensors in snapshots (float32).
        nonfinite, buffers, frozen, exclude, include_nonpersistent, dtype, device, rounding, lazy, watch: how the
            averages are kept (:class:`~polyak.options.Options`), as for :class:`~polyak.EMA`.
    """

    SPEC = Spec(FORMAT, "PostHocEMA", Listed("shadows"))

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
        nonfinite: NonFinite = "propagate",
        buffers: Policy = "average",
        frozen: Policy = "copy",
        exclude: Sequence[str] = (),
        include_nonpersistent: bool = False,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        rounding: Rounding = "nearest",
        lazy: bool = False,
        watch: bool = True,
    ) -> None:
        self.update_every, self.start_step = check_schedule(model, update_every, "start_step", start_step)
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
            hint = "give optimizer steps between snapshots, or None"
            snapshot_every = check_int("snapshot_every", snapshot_every, low=1, hint=hint)
            if snapshot_every % self.update_every:
                raise ValueError(
                    f"snapshot_every must be a positive multiple of update_every={self.update_every} (optimizer "
                    f"steps), got {snapshot_every!r}"
                )
        if snapshot_every is not None and directory is None:
            raise ValueError("snapshot_every needs a directory to write the snapshots to")
        if not (isinstance(snapshot_dtype, torch.dtype) and snapshot_dtype.is_floating_point):
            raise TypeError(f"snapshot_dtype must be a floating torch.dtype, got {snapshot_dtype!r}")
        self.directory = Path(directory) if directory is not None else None
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = snapshot_dtype
        self.run_id: str | None = uuid.uuid4().hex  # a resumed run takes its saved one (None: saved before ids)
        self._checked: set[Path] = set()  # folders known to hold no other run's snapshots
        options = Options(
            buffers=buffers,
            frozen=frozen,
            exclude=exclude,  # type: ignore[arg-type]  # checked and made a tuple there
            include_nonpersistent=include_nonpersistent,
            dtype=dtype,
            device=device,  # type: ignore[arg-type]  # checked and made a device there
            rounding=rounding,
            nonfinite=nonfinite,
            lazy=lazy,
            watch=watch,
        )
        self._init_averages(model, options, len(self.rules))

    @property
    def sigma_rels(self) -> list[float]:
        """Relative widths of the tracked profiles."""
        return self._sigma_rels or [rule.sigma_rel for rule in self.rules]

    def _weights(self, t: int) -> tuple[Sequence[float], bool] | None:
        if t < 1 or t % self.update_every:
            return None
        return [rule.weight(t, t - self.last_update_step) for rule in self.rules], True

    def _after_update(self, module: nn.Module, t: int) -> None:
        if self.snapshot_every is not None and t % self.snapshot_every == 0:
            self.snapshot()

    def snapshot(self, directory: str | Path | None = None) -> Path:
        """Write all averages, as of the last update, to ``directory/phema-<step>.safetensors`` (atomically).

        Tensor ``k/<name>`` holds profile k; the metadata records the step (since averaging began), the
        optimizer step, the profiles' ``sigma_rels`` and ``gammas``, the tensor names, which are copied, and the
        run's identity. Refused (``ValueError``) in a folder that holds another run's snapshots.
        """
        if self.num_updates == 0:
            raise RuntimeError(f"nothing to snapshot before the first update (step={self.step})")
        where = Path(directory) if directory is not None else self.directory
        if where is None:
            raise ValueError("snapshot() needs a directory: pass one here or to PostHocEMA(directory=...)")
        where.mkdir(parents=True, exist_ok=True)
        self._check_folder(where)
        shadow = self.shadow
        modes = shadow.modes()
        metadata = {
            "format": FORMAT,
            "step": str(self.last_update_step),
            "optimizer_step": str(self.start_step + self.last_update_step),
            "sigma_rels": json.dumps(self.sigma_rels),
            "gammas": json.dumps([rule.gamma for rule in self.rules]),
            "names": json.dumps(list(modes)),
            "copied": json.dumps([name for name, mode in modes.items() if mode == "copy"]),
            "aliases": json.dumps(shadow.aliases),  # other names of tied tensors
            "run": self.run_id or "",
            "polyak_version": version(),
        }
        specs, tensors = {}, {}
        for k in range(self.count):
            for name, tensor in shadow.tensors(k).items():
                dtype = self.snapshot_dtype if modes[name] == "average" else tensor.dtype
                specs[f"{k}/{name}"] = TensorSpec(tuple(tensor.shape), dtype)
                tensors[f"{k}/{name}"] = tensor
        path = where / f"phema-{self.last_update_step:012d}.safetensors"
        with open_writer(path, specs, format="safetensors", metadata=metadata) as writer:
            for key in writer.names:
                writer.write(tensors[key].to(specs[key].dtype))
        return path

    def _check_folder(self, where: Path) -> None:
        """Refuse a folder holding another run's snapshots (once per folder: later ones are this run's)."""
        resolved = where.resolve()
        if resolved in self._checked:
            return
        others = sorted({s.run or "(unnamed)" for s in find_snapshots(where) if s.run != self.run_id})
        if others:
            raise ValueError(
                f"{str(where)!r} holds snapshots of another run ({', '.join(others)}); this run ({self.run_id}) "
                f"would overwrite some and mix with the rest. To continue that run, load its state "
                f"(load_state_dict); else pick another directory or move its {PATTERN} files out"
            )
        self._checked.add(resolved)

    @contextmanager
    def swapped(self, model: nn.Module | None = None, profile: int = 0) -> Iterator[nn.Module]:
        """Within the block the model holds profile number ``profile``; its own weights come back on exit."""
        with super().swapped(model, profile) as swapped_model:
            yield swapped_model

    def copy_to(self, model: nn.Module | None = None, profile: int = 0) -> None:
        """Write profile number ``profile`` into the model, permanently."""
        super().copy_to(model, profile)

    def averaged_model(self, profile: int = 0, *, dtype: torch.dtype | None = None) -> nn.Module:
        """A new module holding profile number ``profile`` (eval mode, no grad; see :meth:`FrontEnd.averaged_model`)."""
        return super().averaged_model(profile, dtype=dtype)

    def _mix(self, index: int) -> tuple[Mix, Mix | None]:
        """Profile number ``index`` as it is."""
        if not 0 <= index < self.count:
            raise ValueError(f"profile must be in 0..{self.count - 1} (sigma_rels {self.sigma_rels}), got {index!r}")
        return Mix.copy(index, self.count), None

    def _config(self) -> dict[str, Any]:
        return {
            "gammas": [rule.gamma for rule in self.rules],
            "update_every": self.update_every,
            "start_step": self.start_step,
            "snapshot_every": self.snapshot_every,
            "policy": self.options.saved(),
        }

    def _extra_state(self) -> dict[str, Any]:
        return {"run": self.run_id}

    def _check_extra(self, state: dict[str, Any]) -> Callable[[], None]:
        run = state.get("run")  # None: a state saved before runs had an identity (its snapshots have none)
        if run is not None and not (isinstance(run, str) and run):  # "" would read back from snapshots as None
            raise ValueError(f"saved PostHocEMA has run={run!r}, expected a non-empty str. The state is damaged")

        def apply() -> None:
            self.run_id = run
            self._checked.clear()

        return apply


def _numbers(name: str, values: Any, **bounds: Any) -> list[float]:
    """Each of ``values`` checked as ``name[i]`` (see :func:`polyak.checks.check_number`)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise TypeError(f"{name}: expected a sequence of numbers, e.g. (0.05, 0.10), got {values!r}")
    return [check_number(f"{name}[{i}]", value, **bounds) for i, value in enumerate(values)]
