"""Hugging Face Trainer callback: keep a polyak average while ``transformers.Trainer`` trains.

Install with ``pip install polyak[transformers]``.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..distributed import full_model_state_dict, partitioned_names
from . import AveragerFactory, build_averager, check_factory, require

require("transformers", "transformers")
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR  # noqa: E402

__all__ = ["AVERAGED_DIR", "STATE_FILE", "AveragingCallback", "save_pretrained"]

STATE_FILE = "polyak_averager.pt"  # the averager's state, inside each checkpoint directory
AVERAGED_DIR = "averaged"  # the averaged model, inside each checkpoint directory (``from_pretrained``-able)


def _state_file(model: nn.Module) -> str:
    """The averager's state file: one per rank when the average is partitioned (DeepSpeed ZeRO-3)."""
    if partitioned_names(model):
        return f"polyak_averager.rank{torch.distributed.get_rank()}.pt"
    return STATE_FILE


def save_pretrained(model: nn.Module, directory: str | Path) -> None:
    """Write ``model`` to ``directory`` in safetensors: its ``save_pretrained``, else ``model.safetensors``."""
    directory = Path(directory)
    save: Any = getattr(model, "save_pretrained", None)
    if callable(save):
        save(directory)
    else:
        directory.mkdir(parents=True, exist_ok=True)
        require("safetensors.torch", "safetensors").save_model(model, str(directory / "model.safetensors"))


class AveragingCallback(TrainerCallback):
    """Keeps an average of the model's weights during ``Trainer.train``: one update per optimizer step.

    * Updates after every optimizer step (``on_step_end`` fires after gradient accumulation).
    * Evaluations that the Trainer runs during training use the averaged weights (swapped in place, and back
      before any checkpoint is written); an evaluation before the first update uses the training weights.
    * Each checkpoint directory gets ``averaged/`` (the averaged model, safetensors, loadable with
      ``from_pretrained``) and ``polyak_averager.pt`` (the averager's state). Resuming with
      ``trainer.train(resume_from_checkpoint=...)`` continues the average exactly. Under DeepSpeed ZeRO-3 each rank
      writes its own ``polyak_averager.rank<r>.pt`` (its partitions), and ``averaged/`` is gathered from all ranks.
    * ``copy_at_end``: write the averaged weights into the model when training ends (then ``trainer.save_model()``
      and ``trainer.evaluate()`` use them).

    Args:
        averager: a function ``model -> averager`` (any polyak averager); default
            :func:`polyak.integrations.default_averager`, an EMA of decay 0.999 with warm-up.
        evaluate: evaluate with the average during training (default True).
        save_averaged: write ``averaged/`` into each checkpoint (default True); the state file is always written.
        copy_at_end: write the average into the model at the end of training.
        require_saved_state: when resuming from a checkpoint without ``polyak_averager.pt``, raise (default)
            instead of starting a new average from the resumed weights.

    On resume the state is read from ``TrainingArguments.resume_from_checkpoint`` when it names a directory, else
    from ``output_dir/checkpoint-<step>``. Evaluations you call yourself (``trainer.evaluate()``) see the model as it
    is; use ``with callback.averager.swapped(model): trainer.evaluate()`` or ``copy_at_end``.
    """

    def __init__(
        self,
        averager: AveragerFactory | None = None,
        *,
        evaluate: bool = True,
        save_averaged: bool = True,
        copy_at_end: bool = False,
        require_saved_state: bool = True,
    ) -> None:
        self.factory = check_factory(averager)
        self.evaluate = bool(evaluate)
        self.save_averaged = bool(save_averaged)
        self.copy_at_end = bool(copy_at_end)
        self.require_saved_state = bool(require_saved_state)
        self.averager: Any = None
        self._seen_step = 0  # state.global_step already folded into the average
        self._swap: ExitStack | None = None

    # ------------------------------------------------------------------ building, resuming, updating

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model: nn.Module = kwargs["model"]
        self.averager = build_averager(self.factory, model)  # each run starts its own average ...
        self._seen_step = state.global_step
        if state.global_step > 0:  # ... unless it resumes one
            self._resume(args, state.global_step, _state_file(model))

    def _resume(self, args: TrainingArguments, step: int, state_file: str) -> None:
        places = [Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"]
        if isinstance(args.resume_from_checkpoint, str):
            places.insert(0, Path(args.resume_from_checkpoint))
        for directory in places:
            if (directory / state_file).is_file():
                saved = torch.load(directory / state_file, map_location="cpu", weights_only=True)
                if saved.get("global_step") != step:
                    raise RuntimeError(
                        f"{directory / state_file} was written at step {saved.get('global_step')}, but training "
                        f"resumes at step {step}; resume from the checkpoint that holds it"
                    )
                self.averager.load_state_dict(saved["averager"])
                return
        if self.require_saved_state:
            raise RuntimeError(
                f"training resumes at step {step} but no {state_file} was found in {[str(p) for p in places]}; "
                "set TrainingArguments(resume_from_checkpoint=<checkpoint dir>) if it lies elsewhere, or pass "
                "require_saved_state=False to start a new average from the resumed weights"
            )

    def on_step_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model: nn.Module = kwargs["model"]
        while self._seen_step < state.global_step:
            self._seen_step += 1
            self.averager.update(model)
        if control.should_evaluate:  # the Trainer evaluates right after this event, then saves
            self._swap_in(model)

    def on_epoch_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model: nn.Module = kwargs["model"]
        if control.should_evaluate:
            self._swap_in(model)

    # ------------------------------------------------------------------ evaluation with the average

    def _swap_in(self, model: nn.Module) -> None:
        if not self.evaluate or self._swap is not None or self.averager.num_updates == 0:
            return
        stack = ExitStack()
        stack.enter_context(self.averager.swapped(model))
        self._swap = stack

    def _swap_out(self) -> None:
        stack, self._swap = self._swap, None
        if stack is not None:
            stack.close()

    def on_evaluate(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._swap_out()

    # ------------------------------------------------------------------ checkpoints and the end

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model: nn.Module = kwargs["model"]
        self._swap_out()
        directory = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if partitioned_names(model):  # ZeRO-3: every rank saves its partitions and gathers the export with the others
            self._save_partitioned(args, state, model, directory)
            return
        if not args.should_save:  # not the main process
            return
        if not directory.is_dir():
            raise RuntimeError(f"the Trainer saved a checkpoint, but {directory} does not exist")
        torch.save({"global_step": state.global_step, "averager": self.averager.state_dict()}, directory / STATE_FILE)
        if self.save_averaged and self.averager.num_updates > 0:
            with self.averager.swapped(model):
                save_pretrained(model, directory / AVERAGED_DIR)

    def _save_partitioned(self, args: TrainingArguments, state: TrainerState, model: Any, directory: Path) -> None:
        saved = {"global_step": state.global_step, "averager": self.averager.state_dict()}
        torch.save(saved, directory / _state_file(model))
        if self.save_averaged and self.averager.num_updates > 0:
            with self.averager.swapped(model):
                weights = full_model_state_dict(model)  # on rank 0, one parameter gathered at a time
            if args.should_save:
                model.save_pretrained(directory / AVERAGED_DIR, state_dict=weights)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model: nn.Module = kwargs["model"]
        self._swap_out()
        if self.copy_at_end and self.averager.num_updates > 0:
            self.averager.copy_to(model)
