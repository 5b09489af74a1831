"""Lightning callback: keep a polyak average while a ``lightning.pytorch.Trainer`` fits.

Install with ``pip install polyak[lightning]``.
"""

from __future__ import annotations

import inspect
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..distributed import full_state_dict
from ..io import atomic_write
from ..storage.dtensor import is_dtensor
from ..swa_utils import update_bn
from . import AveragerFactory, averaged_full_state, build_averager, check_factory, check_suffix, require
from .selection import check_mode, check_selectable, choose, exported, metric_name, share_run

require("lightning", "lightning")
import lightning.pytorch as pl  # noqa: E402

__all__ = ["AveragingCallback"]


def recompute_bn(loader: Any, model: nn.Module, device: torch.device | None = None) -> None:
    """Recompute the normalisation statistics of ``model`` over ``loader`` (see :func:`polyak.swa_utils.update_bn`)."""
    update_bn(loader, model, device=device)


def save_weights(state: dict[str, Tensor], path: str | Path) -> None:
    """Write a state dict atomically (:func:`polyak.io.atomic_write`): safetensors for a ``.safetensors`` path,
    else ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        if path.suffix == ".safetensors":
            safetensors_torch = require("safetensors.torch", "safetensors")
            f.write(safetensors_torch.save({k: v.contiguous() for k, v in state.items()}))
        else:
            torch.save(state, f)


def _sharded(value: Any) -> bool:
    """True when a (nested) state holds a DTensor."""
    return any(map(_sharded, value.values())) if isinstance(value, dict) else is_dtensor(value)


class _Logging:
    """Stands in for ``pl_module.log`` during validation and test: during an averaged pass the metric names get
    that averager's suffix; during the training weights' pass, averagers without an update yet (whose average
    is the training weights) receive the same values under their suffixed names."""

    def __init__(self, log: Any) -> None:
        self.log = log
        self.suffix: str | None = None  # set during an averaged pass
        self.tee: list[str] = []

    def __call__(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if self.suffix is None:
            self.log(name, value, *args, **kwargs)
            for suffix in self.tee:
                self.log(name + suffix, value, *args, **kwargs)
            return
        if not isinstance(value, (Tensor, int, float)):  # e.g. a torchmetrics Metric
            raise TypeError(
                f"validation/test step logs {name!r} as a {type(value).__name__}: one object would accumulate the "
                "training weights' and the average's results together. Log a tensor or number per batch, use "
                "separate metric objects, or pass evaluate_both=False to AveragingCallback"
            )
        self.log(name + self.suffix, value, *args, **kwargs)

    @staticmethod
    def install(module: pl.LightningModule) -> _Logging:
        current = module.__dict__.get("log")
        if not isinstance(current, _Logging):
            current = _Logging(module.log)
            module.__dict__["log"] = current  # an instance attribute: log_dict and the user's code call it
        return current

    @staticmethod
    def remove(module: pl.LightningModule) -> None:
        if isinstance(module.__dict__.get("log"), _Logging):
            del module.__dict__["log"]


class AveragingCallback(pl.Callback):
    """Keeps an average of the LightningModule's weights: one update per optimizer step.

    * Updates once per optimizer step (each increase of ``trainer.global_step``), so gradient accumulation is
      respected. With several optimizers in manual optimization, Lightning counts every one's steps.
    * Validation and test report both (``evaluate_both``, default): each batch's step runs with the training
      weights (metrics under their names, ``val_loss``), then again with the average swapped in (names with
      ``metric_suffix``, ``val_loss_ema``), so ``ModelCheckpoint(monitor="val_loss_ema")`` follows the average.
      Cost: one extra step per batch plus two in-place copies of the weights. The swap lasts one step: an
      exception or Ctrl-C anywhere leaves the training weights in the model. Before the first update the
      average is the training weights, logged under both names without an extra step. Metric objects
      (torchmetrics) logged from the step would mix both passes and are refused there: log tensors.
    * ``evaluate_both=False``: validation and test run once, with the average swapped in (plain names).
    * Saves its state in the Lightning checkpoint (sharded under FSDP2 with a distributed checkpoint) and
      resumes exactly. A checkpoint never holds the averaged weights as the model's.
    * At the end of fit, optionally copies the average into the model (``copy_at_end``), recomputes its BatchNorm
      statistics on the training data (``update_bn``, implies ``copy_at_end``) and writes it (``save_to``).
    * ``select_on="val_loss"`` (a PostHocEMA averager with a ``directory``): at the end of fit the EMA width is
      chosen on the validation data (:func:`polyak.posthoc.select`): each candidate width is loaded into the
      model and scored by one run of the trainer's validation loop (other callbacks and loggers are left out of
      these runs), ``min`` or ``max`` by ``mode``. Each width's score is logged to the trainer's loggers as
      ``<select_on>_sigma_rel_<width>`` (also in ``trainer.callback_metrics``), the result is kept as
      ``callback.selection``, and ``copy_at_end`` / ``save_to`` take the chosen average. Under DDP every rank
      validates its share of each candidate; log the metric with ``sync_dist=True`` so that it covers all
      shares (the ranks take rank 0's value, so they agree on the choice).

    Args:
        averager: a function ``model -> averager`` (any polyak averager); default
            :func:`polyak.integrations.default_averager`, an EMA of decay 0.999 with warm-up.
        evaluate: evaluate the average in validation and test (default True).
        evaluate_both: also evaluate the training weights, side by side (default True). With several callbacks
            each logs its own set (distinct ``metric_suffix``); ``evaluate_both=False`` allows only one.
        metric_suffix: appended to the averaged metrics' names (default ``"_ema"``).
        copy_at_end: at the end of fit, write the averaged weights into the model for good.
        update_bn: at the end of fit, copy the average into the model and recompute its BatchNorm statistics
            with one pass over the training data.
        save_to: at the end of fit, write the averaged weights of the LightningModule to this file (rank 0;
            gathered in full when sharded); ``.safetensors`` or ``torch.save`` format.
        require_saved_state: when a checkpoint without this callback's state is loaded, raise (default) instead
            of starting a new average from the loaded weights.
        name: distinguishes several averaging callbacks in one Trainer (their state keys in the checkpoint).
        select_on: a metric logged in ``validation_step`` (e.g. ``"val_loss"``) to choose the EMA width on at the
            end of fit; None (default) keeps the averager's own average. Not with ``update_bn``.
        mode: ``"min"`` (default) or ``"max"``: whether the lowest or the highest ``select_on`` wins.

    The averager is built when the model is on its device (``on_fit_start`` / ``on_validation_start`` / ...)
    and is available afterwards as ``callback.averager``.
    """

    def __init__(
        self,
        averager: AveragerFactory | None = None,
        *,
        evaluate: bool = True,
        evaluate_both: bool = True,
        metric_suffix: str = "_ema",
        copy_at_end: bool = False,
        update_bn: bool = False,
        save_to: str | Path | None = None,
        require_saved_state: bool = True,
        name: str = "average",
        select_on: str | None = None,
        mode: Literal["min", "max"] = "min",
    ) -> None:
        super().__init__()
        if select_on is not None and (not isinstance(select_on, str) or not select_on):
            raise ValueError(f"select_on must name a logged validation metric such as 'val_loss', got {select_on!r}")
        if select_on is not None and update_bn:
            raise ValueError("select_on scores each width as it is; update_bn would change the chosen one: pick one")
        self.select_on = select_on
        self.mode = check_mode(mode)
        self.selection: Any = None  # the polyak.posthoc.Selection made at the end of fit (select_on)
        self.factory = check_factory(averager)
        self.evaluate = bool(evaluate)
        self.evaluate_both = bool(evaluate_both)
        self.metric_suffix = check_suffix(metric_suffix)
        self.copy_at_end = bool(copy_at_end or update_bn)
        self.update_bn = bool(update_bn)
        self.save_to = Path(save_to) if save_to is not None else None
        self.require_saved_state = bool(require_saved_state)
        self.name = str(name)
        self.averager: Any = None
        self._loaded: dict[str, Any] | None = None  # state read from a checkpoint, waiting for the averager
        self._seen_step = 0  # trainer.global_step already folded into the average
        self._swap: ExitStack | None = None
        self._final = False  # the model holds the average after copy_at_end: nothing to swap

    @property
    def state_key(self) -> str:
        return self._generate_state_key(name=self.name)

    # ------------------------------------------------------------------ building and updating

    def _ready(self, pl_module: pl.LightningModule) -> Any:
        """The averager, built on first use (the model is on its device by then), with any loaded state."""
        if self.averager is None:
            self.averager = build_averager(self.factory, pl_module)
        if self._loaded is not None:
            self.averager.load_state_dict(self._loaded)
            self._loaded = None
        return self.averager

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        evaluating = [c for c in trainer.callbacks if isinstance(c, AveragingCallback) and c.evaluate]  # type: ignore[attr-defined]
        if len(evaluating) > 1 and not all(c.evaluate_both for c in evaluating):
            raise ValueError(
                f"{len(evaluating)} AveragingCallbacks evaluate their average and one has evaluate_both=False "
                "(its average replaces the training weights for the whole evaluation); only one can. "
                "Pass evaluate=False to the others, or evaluate_both=True to all."
            )
        suffixes = [c.metric_suffix for c in evaluating]
        if len(set(suffixes)) < len(suffixes):
            raise ValueError(
                f"AveragingCallbacks log their metrics with the same suffixes {suffixes}; "
                "give each a distinct metric_suffix"
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._final = False
        averager = self._ready(pl_module)
        if self.select_on is not None:
            check_selectable(averager)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Strategies that restore after setup (ModelParallelStrategy) load the state after on_fit_start.
        share_run(self._ready(pl_module))
        self._seen_step = trainer.global_step  # after a restore: the steps already in the average

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # global_step counts optimizer steps: it stands still on accumulation batches.
        while self._seen_step < trainer.global_step:
            self._seen_step += 1
            self.averager.update(pl_module)

    # ------------------------------------------------------------------ evaluation with the average

    def _swap_in(self, pl_module: pl.LightningModule) -> None:
        if self._swap is not None:
            return
        stack = ExitStack()
        stack.enter_context(self._ready(pl_module).swapped(pl_module))
        self._swap = stack

    def _swap_out(self) -> None:
        stack, self._swap = self._swap, None
        if stack is not None:
            stack.close()

    def _evaluation_start(self, pl_module: pl.LightningModule) -> None:
        if not self.evaluate or self._final:
            return
        averager = self._ready(pl_module)
        if not self.evaluate_both:
            if averager.num_updates > 0:  # nothing averaged yet: evaluate the training weights
                self._swap_in(pl_module)
            return
        logging = _Logging.install(pl_module)
        if averager.num_updates == 0:
            logging.tee.append(self.metric_suffix)

    def _evaluate_batch(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        step: str,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        """Run ``step`` once more on ``batch`` with the average swapped in, logging under suffixed names."""
        if not (self.evaluate and self.evaluate_both) or self._final or self.averager.num_updates == 0:
            return
        function = getattr(pl_module, step)
        parameters = inspect.signature(function).parameters
        if "dataloader_iter" in parameters:
            raise RuntimeError(
                f"evaluate_both=True needs {step}(batch, batch_idx), not the dataloader_iter form; "
                "pass evaluate_both=False to AveragingCallback"
            )
        loaders = trainer.num_test_batches if step == "test_step" else trainer.num_val_batches
        variadic = any(p.kind is p.VAR_POSITIONAL for p in parameters.values())
        takes_index = "batch_idx" in parameters or variadic or len(parameters) >= 2
        args: tuple[Any, ...] = (batch, batch_idx) if takes_index else (batch,)
        args += (dataloader_idx,) if len(loaders) > 1 else ()
        logging = _Logging.install(pl_module)
        previous = pl_module._current_fx_name
        pl_module._current_fx_name = step  # logs count as the step's (their defaults and aggregation)
        logging.suffix = self.metric_suffix
        try:
            self._swap_in(pl_module)
            getattr(trainer.strategy, step)(*args)
        finally:
            self._swap_out()
            logging.suffix = None
            pl_module._current_fx_name = previous

    def _evaluation_end(self, pl_module: pl.LightningModule) -> None:
        self._swap_out()
        _Logging.remove(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_start(pl_module)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluate_batch(trainer, pl_module, "validation_step", batch, batch_idx, dataloader_idx)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_end(pl_module)  # runs before ModelCheckpoint's on_validation_end (checkpoints come last)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_start(pl_module)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._evaluate_batch(trainer, pl_module, "test_step", batch, batch_idx, dataloader_idx)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._evaluation_end(pl_module)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._evaluation_end(pl_module)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._evaluation_end(pl_module)

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        """The averager's state; a sharded (FSDP2) one gathered in full on rank 0, which alone writes the
        callbacks' states (a collective: Lightning asks every rank)."""
        if self.averager is None:
            return dict(self._loaded or {})
        if self._swap is not None:
            # A save during evaluation: leave the swap (closing is idempotent); on_save_checkpoint, which
            # Lightning calls next, fixes the model entries and re-swaps.
            self._swap.close()
        state = self.averager.state_dict()
        return full_state_dict(state) if _sharded(state) else state

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self._swap is None:
            return
        # A save during evaluation: the model's entries hold the average; write the training weights instead.
        self._swap_out()
        training = {key: value.detach().clone() for key, value in pl_module.state_dict().items()}
        model_state = checkpoint.get("state_dict", {})
        for key in model_state:
            if key in training:
                model_state[key] = training[key]
        self._swap_in(pl_module)

    def on_load_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]
    ) -> None:
        if self.state_key not in checkpoint.get("callbacks", {}) and self.require_saved_state:
            raise RuntimeError(
                f"the checkpoint holds no state for {self.state_key}, so the average would restart from the "
                "loaded weights; resume from a checkpoint written with this callback, or pass "
                "require_saved_state=False to start a new average"
            )

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._swap_out()
        self._loaded = dict(state_dict) if state_dict else None

    # ------------------------------------------------------------------ end of fit

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()
        averager = self._ready(pl_module)
        if averager.num_updates == 0:
            return
        if self.select_on is not None:
            self._select(trainer, pl_module)
            return
        if self.copy_at_end:
            averager.copy_to(pl_module)
            self._final = True
            if self.update_bn:
                recompute_bn(trainer.train_dataloader, pl_module, device=pl_module.device)
        if self.save_to is not None:
            # A collective when sharded: every rank gathers, rank 0 writes.
            state = averaged_full_state(None if self.copy_at_end else averager, pl_module)
            if trainer.is_global_zero:
                save_weights(state, self.save_to)

    # ------------------------------------------------------------------ choosing the width (select_on)

    def _select(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Choose the width on the validation loop, log every width's score, then copy / save the chosen one."""
        kept = dict(trainer.callback_metrics)  # the training weights' last validation, restored afterwards
        selection = choose(
            check_selectable(self.averager),
            pl_module,
            lambda model: self._validate(trainer),
            self.mode,
            writer=trainer.is_global_zero,
            barrier=trainer.strategy.barrier,
        )
        trainer.callback_metrics.update(kept)
        scores = {f"{self.select_on}_{metric_name(float(w))}": score for w, score in selection.scores.items()}
        for logger in trainer.loggers:
            logger.log_metrics(scores, step=trainer.global_step)
        trainer.callback_metrics.update({name: torch.tensor(score) for name, score in scores.items()})
        self.selection = selection
        if self.copy_at_end:
            pl_module.load_state_dict(selection.state_dict, strict=False)
            self._final = True
        if self.save_to is not None and trainer.is_global_zero:
            save_weights(exported(pl_module, selection), self.save_to)

    def _validate(self, trainer: pl.Trainer) -> float:
        """One run of the trainer's validation loop on the model as it is; ``select_on``, the same on every rank."""
        loop = trainer.fit_loop.epoch_loop.val_loop
        hooks: Any = trainer  # Trainer.callbacks is not in Lightning's type stubs
        callbacks, loggers = hooks.callbacks, hooks.loggers
        hooks.callbacks, hooks.loggers = [], []  # a scoring pass: no checkpoint, early stop or logged val_loss
        try:
            trainer.validating = True
            loop.run()
        finally:
            trainer.training = True
            hooks.callbacks, hooks.loggers = callbacks, loggers
        value = trainer.callback_metrics.get(str(self.select_on))
        if value is None:
            raise RuntimeError(
                f"select_on={self.select_on!r}: the validation loop logged no such metric (it logged "
                f"{sorted(trainer.callback_metrics)}); log it in validation_step, e.g. self.log('val_loss', loss)"
            )
        return float(trainer.strategy.broadcast(float(value), src=0))
