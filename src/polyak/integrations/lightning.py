"""Lightning callback: keep a polyak average while a ``lightning.pytorch.Trainer`` fits.

Install with ``pip install polyak[lightning]``.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..swa_utils import update_bn
from . import AveragerFactory, build_averager, check_factory, require

require("lightning", "lightning")
import lightning.pytorch as pl  # noqa: E402

__all__ = ["AveragingCallback"]


def recompute_bn(loader: Any, model: nn.Module, device: torch.device | None = None) -> None:
    """Recompute the normalisation statistics of ``model`` over ``loader`` (see :func:`polyak.swa_utils.update_bn`)."""
    update_bn(loader, model, device=device)


def save_weights(module: nn.Module, path: str | Path) -> None:
    """Write ``module``'s weights: safetensors for a ``.safetensors`` path (tied tensors once), else ``torch.save``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        safetensors_torch = require("safetensors.torch", "safetensors")
        safetensors_torch.save_model(module, str(path))
    else:
        torch.save(module.state_dict(), path)


class AveragingCallback(pl.Callback):
    """Keeps an average of the LightningModule's weights: one update per optimizer step.

    * Updates once per optimizer step (each increase of ``trainer.global_step``), so gradient accumulation is
      respected. With several optimizers in manual optimization, Lightning counts every one's steps.
    * Validates and tests with the averaged weights swapped in place (compiled modules see them), but only once
      the average holds at least one update: before that (e.g. the sanity check) the training weights are used.
    * Saves its state in the Lightning checkpoint and resumes exactly. A checkpoint never holds the averaged
      weights as the model's: the swap ends before checkpoint callbacks run, and a save during the swap writes
      the training weights.
    * At the end of fit, optionally copies the average into the model (``copy_at_end``), recomputes its BatchNorm
      statistics on the training data (``update_bn``, implies ``copy_at_end``) and writes it (``save_to``).

    Args:
        averager: a function ``model -> averager`` (any polyak averager); default
            :func:`polyak.integrations.default_averager`, an EMA of decay 0.999 with warm-up.
        evaluate: swap the average in for validation and test (default True). At most one callback may.
        copy_at_end: at the end of fit, write the averaged weights into the model for good.
        update_bn: at the end of fit, copy the average into the model and recompute its BatchNorm statistics
            with one pass over the training data.
        save_to: at the end of fit, write the averaged weights of the LightningModule to this file (rank 0);
            ``.safetensors`` or ``torch.save`` format.
        require_saved_state: when a checkpoint without this callback's state is loaded, raise (default) instead
            of starting a new average from the loaded weights.
        name: distinguishes several averaging callbacks in one Trainer (their state keys in the checkpoint).

    The averager is built when the model is on its device (``on_fit_start`` / ``on_validation_start`` / ...)
    and is available afterwards as ``callback.averager``.
    """

    def __init__(
        self,
        averager: AveragerFactory | None = None,
        *,
        evaluate: bool = True,
        copy_at_end: bool = False,
        update_bn: bool = False,
        save_to: str | Path | None = None,
        require_saved_state: bool = True,
        name: str = "average",
    ) -> None:
        super().__init__()
        self.factory = check_factory(averager)
        self.evaluate = bool(evaluate)
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
        if len(evaluating) > 1:
            raise ValueError(
                f"{len(evaluating)} AveragingCallbacks swap their average in for evaluation; only one can. "
                "Pass evaluate=False to the others."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._final = False
        self._ready(pl_module)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
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
        if not self.evaluate or self._final or self._swap is not None:
            return
        averager = self._ready(pl_module)
        if averager.num_updates == 0:  # nothing averaged yet: evaluate the training weights
            return
        stack = ExitStack()
        stack.enter_context(averager.swapped(pl_module))
        self._swap = stack

    def _swap_out(self) -> None:
        stack, self._swap = self._swap, None
        if stack is not None:
            stack.close()

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()  # runs before ModelCheckpoint's on_validation_end (Lightning orders checkpoints last)

    def on_test_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_test_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._swap_out()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._swap_out()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._swap_out()

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> dict[str, Any]:
        if self.averager is None:
            return dict(self._loaded or {})
        if self._swap is not None:
            # A save during evaluation. The averager refuses to save while swapped, so leave the swap (closing
            # is idempotent); on_save_checkpoint, which Lightning calls next, fixes the model entries and re-swaps.
            self._swap.close()
        return self.averager.state_dict()

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
        if self.copy_at_end:
            averager.copy_to(pl_module)
            self._final = True
            if self.update_bn:
                recompute_bn(trainer.train_dataloader, pl_module, device=pl_module.device)
        if self.save_to is not None and trainer.is_global_zero:
            if self.copy_at_end:
                save_weights(pl_module, self.save_to)
            else:
                with averager.swapped(pl_module):
                    save_weights(pl_module, self.save_to)
