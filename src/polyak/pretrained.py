"""The average as the ecosystem loads models: a Hugging Face model folder (transformers or diffusers), or a PEFT
adapter folder.

Two ways in:

- :func:`save_pretrained` takes a live averager and the model it averages, and lets the model's own
  ``save_pretrained`` write the folder with the averaged weights swapped in: a ``transformers`` or ``diffusers``
  model gives ``config.json`` + safetensors (``from_pretrained`` loads it), a PEFT model gives its adapter folder
  (``PeftModel.from_pretrained`` loads it; average the adapter only with ``frozen="skip"``).
- :func:`export_pretrained` takes a file (an averager state, or a training checkpoint holding one) and a
  reference folder of the same model (the one training started from, or any ``save_pretrained`` of it): the
  averaged weights are written under the reference's tensor names, beside copies of its other files.

Either way the files are written beside the target and moved into it (:func:`polyak.io.folder_writer`): the
target keeps every other file it holds, a file of the same name is replaced only with ``overwrite=True``, and an
interrupted write leaves each file as it was or complete.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoints import export_weights, open_checkpoint
from .io import (
    CheckpointError,
    Input,
    LazyStateDict,
    TensorSpec,
    check_names,
    check_output,
    folder_writer,
    save_state_dict,
)
from .swap import exporting_average

__all__ = ["export_pretrained", "save_pretrained"]

# Weight files of a reference folder, in the order they are looked for; the first found names the output.
_WEIGHTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "adapter_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.safetensors",
)
_SKIPPED = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json")  # never copied from the reference


def save_pretrained(
    averager: Any, directory: str | os.PathLike[str], model: nn.Module | None = None, *, overwrite: bool = False
) -> Path:
    """Write the average as ``model.save_pretrained(directory)`` would, with the averaged weights swapped in.

    ``averager`` is any polyak front end with ``swapped`` (EMA, SWA, BEMA, PostHocEMA's first profile);
    ``model`` defaults to the one it was built on. The model's own weights are back on return, also on error.
    The files are added to ``directory``; one it holds already is replaced only with ``overwrite=True``. The
    folder the model was loaded from is an input, never written. Returns the folder.
    """
    target = model if model is not None else getattr(averager, "model", None)
    save = getattr(target, "save_pretrained", None)
    if not callable(save):
        raise TypeError(
            f"save_pretrained needs a transformers or PEFT model (with .save_pretrained), got "
            f"{type(target).__name__}; for any other module use averager.averaged_model() and "
            "polyak.save_state_dict(model.state_dict(), path)"
        )
    directory = Path(directory)
    writing = folder_writer(directory, overwrite=overwrite, inputs=_loaded_from(target))
    with writing as building, averager.swapped(target), exporting_average():  # the average is wanted
        save(building)
    return directory


def _loaded_from(model: Any) -> list[Input]:
    """The local folder ``model`` was loaded from (the ``_name_or_path`` of a transformers or diffusers config)."""
    config = getattr(model, "config", None)
    path = config.get("_name_or_path") if isinstance(config, Mapping) else getattr(config, "_name_or_path", None)
    if isinstance(path, (str, os.PathLike)) and os.path.isdir(path):
        return [("the folder the model was loaded from", path)]
    return []


def _reference_specs(like: Path) -> tuple[str, dict[str, TensorSpec]]:
    """The weight file name to write and the tensors (names, shapes) of the reference folder ``like``."""
    if not like.is_dir():
        raise CheckpointError(f"{like}: the reference must be a model or adapter folder (from save_pretrained)")
    for name in _WEIGHTS:
        if (like / name).is_file():
            output = name.removesuffix(".index.json")
            return output, dict(open_checkpoint(like / name).specs)
    raise CheckpointError(
        f"{like}: no {' / '.join(_WEIGHTS)} in this folder; give the folder save_pretrained wrote (safetensors)"
    )


def _match(reference: list[str], exported: list[str]) -> dict[str, str]:
    """Map each reference name to an exported one: the same name, or the name with one segment more (a PEFT
    adapter file drops the adapter's name: ``…lora_A.weight`` in the file is ``…lora_A.default.weight``)."""
    have = set(exported)
    widened: dict[str, list[str]] = {}
    for name in exported:
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            widened.setdefault(".".join(parts[:i] + parts[i + 1 :]), []).append(name)
    pairs: dict[str, str] = {}
    for name in reference:
        if name in have:
            pairs[name] = name
        elif len(widened.get(name, ())) == 1:
            pairs[name] = widened[name][0]
    return pairs


def export_pretrained(
    checkpoint: str | os.PathLike[str],
    like: str | os.PathLike[str],
    directory: str | os.PathLike[str],
    *,
    key: str | None = None,
    strip_prefix: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
) -> tuple[Path, list[str]]:
    """Write the averaged weights of ``checkpoint`` as a folder laid out like the reference folder ``like``.

    Every tensor of the reference must be found in the average, with the same shape (else
    :class:`~polyak.io.CheckpointError` names it); the files beside the reference's weights (``config.json``,
    ``adapter_config.json``, tokenizer files, ...) are copied. ``key``, ``strip_prefix`` and ``dtype`` are as for
    :func:`~polyak.checkpoints.export_weights`. Returns the folder and the averaged tensors left out because the
    reference does not hold them (e.g. a tied ``lm_head.weight``, which ``from_pretrained`` re-ties).

    The files are added to ``directory``, which keeps every other file; one it holds already is refused unless
    ``overwrite=True``, and then only that file is replaced. ``directory`` may not be, be inside or hold
    ``checkpoint`` or ``like`` (inputs are read-only), nor be the current directory.
    """
    like, directory = Path(like), Path(directory)
    inputs: list[Input] = [("the checkpoint being exported", checkpoint), ("the reference folder", like)]
    check_output(directory, inputs, folder=True)  # refused before anything is read
    output, reference = _reference_specs(like)
    copied = [item for item in like.iterdir() if item.is_file() and not item.name.endswith(_SKIPPED)]
    if directory.is_dir():
        check_names(directory, [output, *(item.name for item in copied)], overwrite=overwrite)
    exported = export_weights(checkpoint, key=key, strip_prefix=strip_prefix, dtype=dtype)
    pairs = _match(list(reference), list(exported))
    missing = [name for name in reference if name not in pairs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(
            f"{checkpoint}: the average has no tensor for {missing[0]!r} of {like}{more}; export against the "
            "folder of the model that was averaged (an adapter folder if only the adapter was averaged)"
        )
    for name, source in pairs.items():
        want, have = tuple(reference[name].shape), tuple(exported.specs[source].shape)
        if want != have:
            raise CheckpointError(f"{name!r}: {like} holds shape {list(want)}, the average {list(have)}")
    specs = {name: exported.specs[source] for name, source in pairs.items()}
    weights: Mapping[str, Tensor] = LazyStateDict(specs, lambda name: exported[pairs[name]], exported.sources)
    with folder_writer(directory, overwrite=overwrite, inputs=inputs) as building:
        for item in copied:
            shutil.copy2(item, building / item.name)
        save_state_dict(weights, building / output)
    left_out = sorted(set(exported) - set(pairs.values()))
    return directory, left_out
