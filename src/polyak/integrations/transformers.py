"""Hugging Face Trainer callback: keep a polyak average while ``transformers.Trainer`` trains.

Install with ``pip install polyak[transformers]``.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..distributed import full_state_dict
from ..io import folder_writer, load_torch
from ..storage.dtensor import is_dtensor
from ..storage.zero3 import is_partitioned
from . import AveragerFactory, averaged_full_state, build_averager, check_factory, check_suffix, require
from .selection import check_mode, check_selectable, choose, exported, metric_name, share_run

require("transformers", "transformers")
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments  # noqa: E402
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, EvalLoopOutput  # noqa: E402

__all__ = ["AVERAGED_DIR", "STATE_FILE", "AveragingCallback", "save_pretrained"]

STATE_FILE = "polyak_averager.pt"  # the averager's state, inside each checkpoint directory
AVERAGED_DIR = "averaged"  # the averaged model, inside each checkpoint directory (``from_pretrained``-able)


def _partitioned(model: nn.Module) -> bool:
    """True for a model that DeepSpeed ZeRO-3 partitions."""
    return any(is_partitioned(p) for p in model.parameters())


def _state_file(model: nn.Module) -> str:
    """The averager's state file: one per rank when the average is partitioned (DeepSpeed ZeRO-3)."""
    if _partitioned(model):
        return f"polyak_averager.rank{torch.distributed.get_rank()}.pt"
    return STATE_FILE


def save_pretrained(model: nn.Module, directory: str | Path, state: dict[str, Tensor] | None = None) -> None:
    """Write ``model`` (or ``state`` under its names) to ``directory`` in safetensors: ``save_pretrained``, else
    ``model.safetensors``; the files are added to ``directory`` (:func:`polyak.io.folder_writer`)."""
    state = state if state is not None else {k: v.detach() for k, v in model.state_dict().items()}
    save: Any = getattr(model, "save_pretrained", None)
    with folder_writer(directory, overwrite=True) as building:  # the callback's own folder: its files replaced
        if callable(save):
            save(building, state_dict=state)
        else:
            require("safetensors.torch", "safetensors").save_file(
                {k: v.contiguous() for k, v in state.items()}, str(building / "model.safetensors")
            )


def load_weights(model: nn.Module, directory: str | Path) -> None:
    """Load the weights of a folder written by :func:`save_pretrained` into ``model`` (plain or FSDP2-sharded).

    Entries the folder leaves out must be tied to one it holds (e.g. ``lm_head.weight`` to the embedding).
    """
    safetensors_torch = require("safetensors.torch", "safetensors")
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors file in {directory}; was it written with save_averaged=True?")
    state: dict[str, Any] = {}
    for file in files:
        state.update(safetensors_torch.load_file(str(file)))
    names = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    loaded = {names[name] for name in state if name in names}
    untied = [n for n in model.state_dict() if n not in state and names.get(n) not in loaded]
    if untied:
        raise ValueError(f"{directory} lacks {untied[:3]} ({len(untied)} entries of the model); not loaded")
    if any(is_dtensor(p) for p in model.parameters()):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(model, dict(state), options=StateDictOptions(full_state_dict=True, strict=False))
    else:
        model.load_state_dict(state, strict=False)


class _Evaluations:
    """Replaces one Trainer's ``evaluation_loop``: the training weights' pass, then one pass per averager with
    its weights swapped in for the duration of that pass only (so every exit, an exception included, returns
    the training weights), its metrics merged under suffixed names."""

    def __init__(self, loop: Callable[..., EvalLoopOutput]) -> None:
        self.loop = loop
        self.callbacks: list[AveragingCallback] = []

    def __call__(self, dataloader: Any, description: str, *args: Any, **kwargs: Any) -> EvalLoopOutput:
        active = [c for c in self.callbacks if c.evaluate and c.averager is not None]
        if description != "Evaluation" or not active:  # predict() and evaluations before training
            return self.loop(dataloader, description, *args, **kwargs)
        if not active[0].evaluate_both:  # then the only one: the average under the plain names
            return active[0].evaluate_average(self.loop, dataloader, description, *args, **kwargs)
        output = self.loop(dataloader, description, *args, **kwargs)
        raw = dict(output.metrics or {})
        metrics = dict(raw)
        prefix = kwargs.get("metric_key_prefix", args[2] if len(args) > 2 else "eval")
        for callback in active:
            suffix = callback.metric_suffix
            if callback.averager.num_updates == 0:  # the average is the training weights: no extra pass
                metrics.update({k + suffix: v for k, v in raw.items() if not k.endswith("_preparation_time")})
                continue
            started = time.perf_counter()
            averaged = callback.evaluate_average(self.loop, dataloader, description, *args, **kwargs).metrics or {}
            metrics.update({k + suffix: v for k, v in averaged.items() if not k.endswith("_preparation_time")})
            metrics[f"{prefix}_runtime{suffix}"] = round(time.perf_counter() - started, 4)  # the extra pass's cost
        return output._replace(metrics=metrics)


def _calling_trainer(callback: TrainerCallback) -> Trainer:
    """The Trainer whose event called ``callback`` (found on the call stack; the events do not pass it)."""
    frame = inspect.currentframe()
    while frame is not None:
        owner = frame.f_locals.get("self")
        if isinstance(owner, Trainer) and callback in owner.callback_handler.callbacks:
            return owner
        frame = frame.f_back
    raise RuntimeError(
        "AveragingCallback's event did not come from a transformers.Trainer; pass the callback to "
        "Trainer(callbacks=[...]) or trainer.add_callback(...)"
    )


class AveragingCallback(TrainerCallback):
    """Keeps an average of the model's weights during ``Trainer.train``: one update per optimizer step.

    * Updates after every optimizer step (``on_step_end`` fires after gradient accumulation).
    * Every evaluation (during training, and ``trainer.evaluate()`` called by hand afterwards) reports both: the
      training weights' metrics under their names (``eval_loss``) and the average's with ``metric_suffix``
      (``eval_loss_ema``), plus ``eval_runtime_ema``, the seconds the extra pass took. The average is swapped in
      only for its own pass: an exception or Ctrl-C anywhere leaves the training weights in the model and the
      averager usable. Before the first update the average equals the training weights: their metrics are
      reported under both names, with no extra pass. ``metric_for_best_model="loss_ema"`` selects checkpoints
      by the average.
    * Each checkpoint directory gets ``averaged/`` (the averaged model, safetensors, loadable with
      ``from_pretrained``; gathered on rank 0 when sharded) and ``polyak_averager.pt`` (the averager's full
      state). Resuming with ``trainer.train(resume_from_checkpoint=...)`` continues the average exactly. Under
      DeepSpeed ZeRO-3 each rank writes its own ``polyak_averager.rank<r>.pt`` (its partitions) instead.
    * ``load_best_model_at_end``: the Trainer loads the best checkpoint's training weights; with
      ``best_model="averaged"`` the callback then loads that checkpoint's ``averaged/`` copy instead.
    * ``select_on="eval_loss"`` (a PostHocEMA averager with a ``directory``): at the end of training the EMA width
      is chosen on the evaluation data (:func:`polyak.posthoc.select`): each candidate width is loaded into the
      model and scored by one run of the Trainer's evaluation loop (no averaged pass, nothing logged during
      it), ``min`` or ``max`` by ``mode``. Then every width's metric is logged once
      (``eval_sigma_rel_<width>_loss``), the result is kept as ``callback.selection``, the chosen average is
      written to ``output_dir/averaged/`` and, with ``copy_at_end``, into the model. Under DDP every rank
      evaluates its share of each candidate (the Trainer gathers the losses), so the ranks agree on the choice.

    Args:
        averager: a function ``model -> averager`` (any polyak averager); default
            :func:`polyak.integrations.default_averager`, an EMA of decay 0.999 with warm-up.
        evaluate: evaluate with the average (default True).
        evaluate_both: also evaluate the training weights (default True; one extra evaluation pass). False: only
            the average, under the plain metric names (at most one callback per Trainer).
        metric_suffix: appended to the averaged metrics' names (default ``"_ema"``); distinct per callback.
        save_averaged: write ``averaged/`` into each checkpoint (default True); the state file is always written.
        copy_at_end: write the average into the model at the end of training.
        best_model: with ``load_best_model_at_end``, which copy of the best checkpoint ends in the model:
            ``"training"`` (the Trainer's choice, default) or ``"averaged"``.
        require_saved_state: when resuming from a checkpoint without ``polyak_averager.pt``, raise (default)
            instead of starting a new average from the resumed weights.
        select_on: an evaluation metric, named as ``metric_for_best_model`` names it (``"eval_loss"`` or
            ``"loss"``), to choose the EMA width on at the end of training; None (default): no choice.
        mode: ``"min"`` (default) or ``"max"``: whether the lowest or the highest ``select_on`` wins.

    On resume the state is read from ``TrainingArguments.resume_from_checkpoint`` when it names a directory, else
    from ``output_dir/checkpoint-<step>``.
    """

    def __init__(
        self,
        averager: AveragerFactory | None = None,
        *,
        evaluate: bool = True,
        evaluate_both: bool = True,
        metric_suffix: str = "_ema",
        save_averaged: bool = True,
        copy_at_end: bool = False,
        best_model: Literal["training", "averaged"] = "training",
        require_saved_state: bool = True,
        select_on: str | None = None,
        mode: Literal["min", "max"] = "min",
    ) -> None:
        if select_on is not None and (not isinstance(select_on, str) or select_on in ("", "eval_")):
            raise ValueError(f"select_on must name an evaluation metric such as 'eval_loss', got {select_on!r}")
        if select_on is not None and best_model == "averaged":
            raise ValueError(
                "select_on chooses the average at the end; best_model='averaged' chooses another: pick one"
            )
        self.select_on = None if select_on is None else select_on.removeprefix("eval_")
        self.mode = check_mode(mode)
        self.selection: Any = None  # the polyak.posthoc.Selection made at the end of training (select_on)
        if best_model not in ("training", "averaged"):
            raise ValueError(f"best_model must be 'training' or 'averaged', got {best_model!r}")
        if best_model == "averaged" and (copy_at_end or not save_averaged):
            raise ValueError(
                "best_model='averaged' loads the best checkpoint's averaged/ copy: it needs save_averaged=True "
                "and cannot be combined with copy_at_end=True (which writes the final average instead)"
            )
        self.factory = check_factory(averager)
        self.evaluate = bool(evaluate)
        self.evaluate_both = bool(evaluate_both)
        self.metric_suffix = check_suffix(metric_suffix)
        self.save_averaged = bool(save_averaged)
        self.copy_at_end = bool(copy_at_end)
        self.best_model = best_model
        self.require_saved_state = bool(require_saved_state)
        self.averager: Any = None
        self._model: nn.Module | None = None
        self._seen_step = 0  # state.global_step already folded into the average

    # ------------------------------------------------------------------ evaluation with the average

    def _install(self, trainer: Trainer) -> None:
        """Route ``trainer``'s evaluations through :class:`_Evaluations` (once per Trainer, shared by callbacks)."""
        evaluations = trainer.evaluation_loop
        if not isinstance(evaluations, _Evaluations):
            evaluations = _Evaluations(trainer.evaluation_loop)
            trainer.evaluation_loop = evaluations  # type: ignore[method-assign]
        if self in evaluations.callbacks:
            return
        if self.evaluate:
            evaluating = [c for c in evaluations.callbacks if c.evaluate]
            if evaluating and not all(c.evaluate_both for c in [*evaluating, self]):
                raise ValueError(
                    f"{len(evaluating) + 1} AveragingCallbacks evaluate their average and one has evaluate_both="
                    "False (its average replaces the training weights' metrics); only one can. Pass evaluate=False "
                    "to the others, or evaluate_both=True to all"
                )
            if any(c.evaluate_both and c.metric_suffix == self.metric_suffix for c in evaluating):
                raise ValueError(
                    f"two AveragingCallbacks log their metrics with suffix {self.metric_suffix!r}; "
                    "give each a distinct metric_suffix"
                )
        evaluations.callbacks.append(self)

    def evaluate_average(self, loop: Callable[..., EvalLoopOutput], *args: Any, **kwargs: Any) -> EvalLoopOutput:
        """One evaluation pass with the averaged weights swapped in (the training weights before any update)."""
        if self.averager.num_updates == 0 or self._model is None:
            return loop(*args, **kwargs)
        with self.averager.swapped(self._model):
            return loop(*args, **kwargs)

    def on_init_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        self._install(_calling_trainer(self))

    # ------------------------------------------------------------------ building, resuming, updating

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self._install(_calling_trainer(self))
        self._model = kwargs["model"]
        self.averager = build_averager(self.factory, self._model)  # each run starts its own average ...
        if self.select_on is not None:
            check_selectable(self.averager)
        self._seen_step = state.global_step
        if state.global_step > 0:  # ... unless it resumes one
            self._resume(args, state.global_step, _state_file(self._model))
        share_run(self.averager)  # every process writes the periodic snapshots

    def _resume(self, args: TrainingArguments, step: int, state_file: str) -> None:
        places = [Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"]
        if isinstance(args.resume_from_checkpoint, str):
            places.insert(0, Path(args.resume_from_checkpoint))
        for directory in places:
            if (directory / state_file).is_file():
                saved, _ = load_torch(directory / state_file, mmap=False)  # checked: CRCs, sizes, no pickled code
                if saved.get("global_step") != step:
                    raise RuntimeError(
                        f"{directory / state_file} was written at step {saved.get('global_step')}, but training "
                        f"resumes at step {step}; resume from the checkpoint that holds it"
                    )
                self.averager.load_state_dict(saved["averager"])  # a full state: a sharded average keeps its shard
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

    # ------------------------------------------------------------------ checkpoints and the end

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        model: nn.Module = kwargs["model"]
        directory = Path(str(args.output_dir)) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        # Collectives when sharded: every rank gathers, the main process writes.
        if _partitioned(model):  # ZeRO-3: every rank keeps its own partitions (same world size to resume)
            own = {"global_step": state.global_step, "averager": self.averager.state_dict()}
            torch.save(own, directory / _state_file(model))
            saved = None
        else:
            saved = {"global_step": state.global_step, "averager": full_state_dict(self.averager.state_dict())}
        averaged = None
        if self.save_averaged and self.averager.num_updates > 0:
            averaged = averaged_full_state(self.averager, model)
        if not args.should_save:  # not the main process
            return
        if not directory.is_dir():
            raise RuntimeError(f"the Trainer saved a checkpoint, but {directory} does not exist")
        if saved is not None:
            torch.save(saved, directory / STATE_FILE)
        if averaged is not None:
            save_pretrained(model, directory / AVERAGED_DIR, averaged)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        model: nn.Module = kwargs["model"]
        if self.best_model == "averaged" and args.load_best_model_at_end and state.best_model_checkpoint:
            load_weights(model, Path(state.best_model_checkpoint) / AVERAGED_DIR)
        if self.select_on is not None and self.averager.num_updates > 0:
            self._select(_calling_trainer(self), args, state, model)
        elif self.copy_at_end and self.averager.num_updates > 0:
            self.averager.copy_to(model)

    # ------------------------------------------------------------------ choosing the width (select_on)

    def _select(self, trainer: Trainer, args: TrainingArguments, state: TrainerState, model: nn.Module) -> None:
        """Choose the width with the evaluation loop, log every width's metric, write the chosen average."""
        loop = trainer.evaluation_loop
        plain = loop.loop if isinstance(loop, _Evaluations) else loop  # the Trainer's loop, without averaged passes
        dataset = trainer.eval_dataset
        if dataset is None or isinstance(dataset, dict):
            raise ValueError(
                f"select_on={'eval_' + str(self.select_on)!r} needs one eval_dataset to evaluate each width on, "
                f"got {type(dataset).__name__}"
            )
        losses_only = True if trainer.compute_metrics is None else None  # as Trainer.evaluate asks
        key = f"eval_{self.select_on}"

        def evaluate(_: nn.Module) -> float:
            dataloader = trainer.get_eval_dataloader()
            metrics = plain(dataloader, description="Evaluation", prediction_loss_only=losses_only).metrics or {}
            if key not in metrics:
                raise RuntimeError(
                    f"select_on={key!r}: the evaluation gave no such metric (it gave {sorted(metrics)}); name one of "
                    "those, as metric_for_best_model does"
                )
            return _agreed(float(metrics[key]))

        barrier = torch.distributed.barrier if torch.distributed.is_initialized() else lambda: None
        selection = choose(
            check_selectable(self.averager), model, evaluate, self.mode, state.is_world_process_zero, barrier
        )
        self.selection = selection
        trainer.log({f"eval_{metric_name(float(w))}_{self.select_on}": score for w, score in selection.scores.items()})
        if args.should_save:
            save_pretrained(model, Path(str(args.output_dir)) / AVERAGED_DIR, exported(model, selection))
        if self.copy_at_end:
            model.load_state_dict(selection.state_dict, strict=False)


def _agreed(score: float) -> float:
    """Rank 0's ``score`` on every rank (the same number already when the Trainer gathered the losses)."""
    if not torch.distributed.is_initialized():
        return score
    shared = [score]
    torch.distributed.broadcast_object_list(shared, src=0)
    return float(shared[0])
