"""Averaging saved checkpoints, and exporting the averaged weights of a training checkpoint.

Both work tensor by tensor on files opened lazily (:mod:`polyak.io`), so memory stays near one output
tensor (plus the output model when writing a ``.pt`` file) whatever the number or size of the inputs.

Averaging: with normalised weights ``w_i`` (``sum w_i = 1``), each floating-point tensor of the output is
``sum_i w_i x_i``, accumulated in float32 (float64 for float64 inputs) and stored in the inputs' dtype (or
``dtype``). Integer and bool tensors (step counters, ``num_batches_tracked``) are copied from the last
input. Weights: uniform ``1/N``; given (normalised to sum to 1); or an EMA over the files in order,
initialised by the first: ``w_0 = d^(N-1)`` and ``w_i = (1 - d) d^(N-1-i)`` for ``i >= 1``, which is
exactly ``avg <- d * avg + (1 - d) * x_i`` run over the files.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from .checks import check_int, check_number
from .io import (
    TORCH_SUFFIXES,
    CheckpointError,
    LazyStateDict,
    TensorFile,
    TensorSpec,
    load_torch,
    one_line,
    open_regular,
    open_safetensors,
    sniff,
    torch_tensors,
)
from .module_tensors import canonical_name

__all__ = ["Average", "Export", "average_checkpoints", "export_weights", "newest_checkpoints", "open_checkpoint"]

_AVERAGER_FORMAT = "polyak.averager/1"
_MAX_INDEX = 64 << 20  # bytes of a sharded checkpoint's index
_CHUNK = 1 << 18  # elements read from an input at a time: 1 MiB of float32, which stays in the CPU cache
# Names of state dicts that hold a model's own weights, most telling first.
_MODEL_KEYS = ("model", "state_dict", "model_state_dict", "module", "net", "network", "weights", "params")
# A key whose words include one of these holds averaged weights ("ema", "model_ema", "swa_state_dict", ...).
_AVERAGE_WORDS = frozenset({"ema", "swa", "avg", "average", "averaged", "averager", "polyak", "shadow"})

# ---------------------------------------------------------------------------------------------- opening


def open_checkpoint(
    path: str | os.PathLike[str], *, key: str | None = None, prefer: Literal["model", "average"] = "model"
) -> TensorFile:
    """Open a safetensors or PyTorch checkpoint for lazy reading (never unpickling code).

    A sharded checkpoint is opened through its index (``model.safetensors.index.json`` or
    ``pytorch_model.bin.index.json``), as one state dict.

    In a PyTorch training checkpoint (a dict holding a model, an optimizer, ...), ``key`` picks the state
    dict by dotted path (``"model"``, ``"state_dict"``, ``"ema.shadow"``). Without it the state dict is
    found: the only one; else the one named for ``prefer`` (``"model"``: the trained weights, e.g.
    ``model``/``state_dict``; ``"average"``: a polyak averager state, a ``torch.optim.swa_utils``
    ``AveragedModel`` state, or a key naming EMA/SWA). ``TensorFile.note`` says what was picked from what.
    A polyak averager state stands for its ``shadow``.
    """
    path = Path(path)
    if path.name.endswith(".index.json"):
        if key is not None:
            raise CheckpointError(f"{path}: a sharded checkpoint holds one flat state dict; drop --key {key!r}")
        return _Shards(path)
    if sniff(path) == "safetensors":
        if key is not None:
            raise CheckpointError(f"{path}: a safetensors file holds one flat state dict; drop --key {key!r}")
        return open_safetensors(path)
    loaded, mapped = load_torch(path)
    candidates = _state_dicts(loaded, "")
    if key is not None:
        found = _at_key(loaded, key, path, candidates)
        note = None
    else:
        found, note = _choose(candidates, prefer, path)
    opened = torch_tensors(path, found[1], mapped=mapped, key=found[0] or None)
    opened.note = note
    return opened


class _Shards(TensorFile):
    """A state dict split over several files by an index (Hugging Face's ``model.safetensors.index.json``)."""

    def __init__(self, path: Path) -> None:
        with open_regular(path) as f:
            raw = f.read(_MAX_INDEX + 1)
        try:
            if len(raw) > _MAX_INDEX:
                raise ValueError(f"larger than {_MAX_INDEX} bytes")
            weight_map = json.loads(raw)["weight_map"]
            if not all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise TypeError("weight_map must map tensor names to file names")
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as error:
            raise CheckpointError(f"{path}: not a checkpoint index with a weight_map ({one_line(error)})") from None
        shards = {name: open_checkpoint(path.parent / name) for name in sorted(set(weight_map.values()))}
        self._owner = {}
        for name, shard in weight_map.items():
            if name not in shards[shard].specs:
                raise CheckpointError(f"{path}: the index puts tensor {name!r} in {shard}, which does not hold it")
            self._owner[name] = shards[shard]
        super().__init__(path, {name: owner.specs[name] for name, owner in self._owner.items()})
        self.sources = (path, *(source for shard in shards.values() for source in shard.sources))

    def read(self, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        return self._owner[name].read(name, start, stop, out)


def _is_averager(obj: Any) -> bool:
    return isinstance(obj, dict) and obj.get("format") == _AVERAGER_FORMAT and isinstance(obj.get("shadow"), dict)


def _is_tensor_dict(obj: Any) -> bool:
    if not (isinstance(obj, dict) and obj):
        return False
    return all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())


def _state_dicts(obj: Any, where: str, depth: int = 0) -> list[tuple[str, dict[str, Tensor]]]:
    """Every state dict (a dict of tensors by name) in ``obj``, by dotted key, at most four levels deep."""
    if _is_averager(obj):
        return [(f"{where}.shadow".lstrip("."), obj["shadow"])]
    if _is_tensor_dict(obj):
        return [(where, obj)]
    if not isinstance(obj, dict) or depth >= 4:
        return []
    found = []
    for key, value in obj.items():
        if isinstance(key, str):
            found += _state_dicts(value, f"{where}.{key}".lstrip("."), depth + 1)
    return found


def _listing(candidates: list[tuple[str, Any]]) -> str:
    return ", ".join(repr(key or "<whole file>") for key, _ in candidates) or "none"


def _at_key(loaded: Any, key: str, path: Path, candidates: list[tuple[str, Any]]) -> tuple[str, dict[str, Tensor]]:
    obj = loaded
    for part in key.split("."):
        if not isinstance(obj, dict) or part not in obj:
            raise CheckpointError(f"{path}: no key {key!r}; state dicts in this file: {_listing(candidates)}")
        obj = obj[part]
    if _is_averager(obj):
        return f"{key}.shadow", obj["shadow"]
    if not _is_tensor_dict(obj):
        raise CheckpointError(
            f"{path}: key {key!r} holds a {type(obj).__name__}, not a dict of tensors; "
            f"state dicts in this file: {_listing(candidates)}"
        )
    return key, obj


def _choose(
    candidates: list[tuple[str, dict[str, Tensor]]], prefer: str, path: Path
) -> tuple[tuple[str, dict[str, Tensor]], str | None]:
    if len(candidates) == 1:
        key = candidates[0][0]
        return candidates[0], f"using {key!r} (the only state dict in the file)" if key else None

    def words(key: str) -> set[str]:
        return set(re.split(r"[^a-z0-9]+", key.lower()))

    def is_average(key: str, tensors: dict[str, Tensor]) -> bool:
        return "n_averaged" in tensors or bool(words(key) & _AVERAGE_WORDS)

    def model_rank(key: str) -> int:
        last = key.rsplit(".", 1)[-1].lower()
        return _MODEL_KEYS.index(last) if last in _MODEL_KEYS else len(_MODEL_KEYS)

    averaged = [c for c in candidates if is_average(*c)]
    models = sorted((c for c in candidates if not is_average(*c)), key=lambda c: model_rank(c[0]))
    models = [c for c in models if model_rank(c[0]) == model_rank(models[0][0])] if models else []
    pool = (averaged or models) if prefer == "average" else (models or averaged)
    if len(pool) != 1:
        raise CheckpointError(
            f"{path}: holds several state dicts ({_listing(candidates)}) and none is clearly the "
            f"{'averaged weights' if prefer == 'average' else 'model'}; pick one with --key"
        )
    others = [c for c in candidates if c is not pool[0]]
    return pool[0], f"using {pool[0][0]!r} (also holds {_listing(others)}; pick another with --key)"


# ---------------------------------------------------------------------------------------------- averaging


def average_weights(count: int, weights: Sequence[float] | None = None, ema_decay: float | None = None) -> list[float]:
    """The normalised weight of each of ``count`` inputs, oldest first (see the module docstring)."""
    if count < 1:
        raise CheckpointError("no checkpoints to average")
    if weights is not None and ema_decay is not None:
        raise CheckpointError("give explicit weights or an EMA decay, not both")
    if ema_decay is not None:
        d = _checked(check_number, "ema_decay", ema_decay, low=0.0, high=1.0, high_open=True, hint="e.g. 0.9 per file")
        return [d ** (count - 1)] + [(1 - d) * d ** (count - 1 - i) for i in range(1, count)]
    if weights is None:
        return [1.0 / count] * count
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Iterable):
        raise CheckpointError(f"weights: expected a sequence of numbers, one per checkpoint, got {weights!r}")
    weights = list(weights)  # a list, a numpy array, a tensor
    if len(weights) != count:
        raise CheckpointError(f"got {len(weights)} weights for {count} checkpoints; give one weight per checkpoint")
    hint = "weights are relative (normalised to sum to 1), e.g. 1 1 2"
    given = [_checked(check_number, f"weights[{i}]", w, low=0.0, hint=hint) for i, w in enumerate(weights)]
    total = math.fsum(given)
    if total <= 0:
        raise CheckpointError(f"weights: expected weights not all zero, got {given}; {hint}")
    return [w / total for w in given]


def _checked(check: Callable[..., Any], name: str, value: Any, **bounds: Any) -> Any:
    """``check(name, value, **bounds)`` (:mod:`polyak.checks`), its refusal raised as a :class:`CheckpointError`."""
    try:
        return check(name, value, **bounds)
    except (TypeError, ValueError) as error:
        raise CheckpointError(str(error)) from None


class Average(LazyStateDict):
    """The weighted average of checkpoints, computed piece by piece when read (see :func:`average_checkpoints`).

    ``inputs``: the opened files, oldest first; ``weights``: their normalised weights; ``left_out``: tensors
    not in the output (non-strict mode), each with the reason. Each flat piece of ``_CHUNK`` elements is read
    from every input into one reused buffer (``pread``, no mapping) and accumulated in another, small enough to
    stay in the CPU cache; a streaming writer takes the pieces as they come (:meth:`pieces`).
    """

    def __init__(
        self,
        inputs: list[TensorFile],
        weights: list[float],
        specs: Mapping[str, TensorSpec],
        left_out: dict[str, str],
    ) -> None:
        super().__init__(specs, self._average, [source for opened in inputs for source in opened.sources])
        self.inputs = inputs
        self.weights = weights
        self.left_out = left_out
        self._buffers: dict[tuple[str, torch.dtype], Tensor] = {}

    def _buffer(self, role: str, dtype: torch.dtype, count: int) -> Tensor:
        """One reused buffer per role and dtype: no fresh pages to fault in for every piece."""
        buffer = self._buffers.get((role, dtype))
        if buffer is None or buffer.numel() < count:
            buffer = self._buffers[role, dtype] = torch.empty(max(count, _CHUNK), dtype=dtype)
        return buffer[:count]

    def _average(self, name: str) -> Tensor:
        spec = self.specs[name]
        out = torch.empty(spec.numel, dtype=spec.dtype)
        start = 0
        for piece in self.pieces(name):
            out[start : start + piece.numel()].copy_(piece)
            start += piece.numel()
        return out.view(spec.shape)

    def pieces(self, name: str) -> Iterator[Tensor]:
        spec, source = self.specs[name], self.inputs[-1].specs[name]
        averaged = source.dtype.is_floating_point or source.dtype.is_complex
        wide = (torch.float64, torch.complex64, torch.complex128)
        accumulate = source.dtype if source.dtype in wide or not averaged else torch.float32
        for start in range(0, spec.numel, _CHUNK):
            count = min(_CHUNK, spec.numel - start)
            if not averaged:  # integer and bool tensors: copied from the newest input
                yield self.inputs[-1].read(name, start, start + count, out=self._buffer("in", source.dtype, count))
                continue
            total = self._buffer("total", accumulate, count)
            first = True
            for checkpoint, weight in zip(self.inputs, self.weights, strict=True):
                if weight == 0.0:
                    continue
                piece = checkpoint.read(name, start, start + count, out=self._buffer("in", source.dtype, count))
                if first and piece.dtype == accumulate:
                    torch.mul(piece, weight, out=total)
                elif (
                    first or piece.dtype.itemsize == 1
                ):  # float8 takes no part in arithmetic: staged through total's dtype
                    staged = total if first else self._buffer("staged", accumulate, count)
                    staged.copy_(piece)
                    if first:
                        total.mul_(weight)
                    else:
                        total.add_(staged, alpha=weight)
                else:
                    total.add_(piece, alpha=weight)
                first = False
            yield total if spec.dtype == accumulate else self._buffer("out", spec.dtype, count).copy_(total)


def average_checkpoints(
    paths: Sequence[str | os.PathLike[str]],
    *,
    weights: Sequence[float] | None = None,
    ema_decay: float | None = None,
    key: str | None = None,
    strict: bool = True,
    dtype: torch.dtype | None = None,
) -> Average:
    """Average checkpoint files (safetensors or PyTorch), lazily: nothing heavy is read until a tensor is.

    Args:
        paths: the checkpoints, oldest first (the order matters for ``ema_decay``).
        weights: one per file, >= 0, normalised to sum to 1; default: uniform.
        ema_decay: instead of weights, an EMA over the files in order (decay per file), initialised by the first.
        key: the state dict inside each training checkpoint (e.g. ``"model"``); default: found automatically.
        strict: every file must hold the same tensor names, shapes and dtypes (else :class:`CheckpointError`
            names the file and tensor). With ``strict=False`` only the tensors common to all are averaged;
            the rest are listed in ``left_out``.
        dtype: store floating-point results in this dtype (default: the inputs' own).

    Returns a state dict to ``dict()``, load into a model or write with :func:`polyak.save_state_dict`
    (streaming). Floating-point tensors are averaged in float32 or wider; integer/bool ones are copied from the
    last file. Files are checked when opened, so errors come before any averaging.
    """
    normalised = average_weights(len(paths), weights, ema_decay)
    if dtype is not None and not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating-point dtype, got {dtype}")
    inputs = [open_checkpoint(path, key=key) for path in paths]
    first = inputs[0]
    left_out: dict[str, str] = {}
    for other in inputs[1:]:
        for name, spec in first.specs.items():
            if name in left_out:
                continue
            found = other.specs.get(name)
            if found is None:
                left_out[name] = f"tensor {name!r} is in {first.path} but not in {other.path}"
            elif found != spec:
                left_out[name] = f"tensor {name!r} has {found} in {other.path} but {spec} in {first.path}"
        for name in other.specs.keys() - first.specs.keys():
            left_out.setdefault(name, f"tensor {name!r} is in {other.path} but not in {first.path}")
    if strict and left_out:
        reason = next(iter(left_out.values()))
        more = f" (and {len(left_out) - 1} more)" if len(left_out) > 1 else ""
        raise CheckpointError(f"{reason}{more}; pass strict=False to average only the common tensors")
    specs = {
        name: TensorSpec(spec.shape, dtype if dtype is not None and spec.dtype.is_floating_point else spec.dtype)
        for name, spec in first.specs.items()
        if name not in left_out
    }
    return Average(inputs, normalised, specs, left_out)


# ---------------------------------------------------------------------------------------------- exporting


def export_weights(
    path: str | os.PathLike[str],
    *,
    key: str | None = None,
    strip_prefix: str | None = None,
    dtype: torch.dtype | None = None,
) -> Export:
    """The averaged weights of a checkpoint as a model-ready state dict (lazy; write it with ``save_state_dict``).

    Reads a polyak averager state (its ``shadow``), a ``torch.optim.swa_utils.AveragedModel`` state (drops
    ``n_averaged`` and the ``module.`` prefix) or a plain state dict, on its own or inside a training
    checkpoint (see :func:`open_checkpoint`; averaged weights are preferred). Wrapper segments
    (``module.`` on every name, ``_orig_mod.``, ``_fsdp_wrapped_module.``) are removed, then ``strip_prefix``
    (e.g. ``"model."``) where present. ``dtype`` casts the floating-point tensors (e.g. for inference).
    """
    if dtype is not None and not dtype.is_floating_point:
        raise CheckpointError(f"dtype must be a floating-point dtype, got {dtype}")
    source = open_checkpoint(path, key=key, prefer="average")
    names = [n for n in source.specs if n != "n_averaged"]
    renamed = names
    if names and all(n.startswith("module.") for n in names):
        renamed = [n.removeprefix("module.") for n in names]
    renamed = [canonical_name(n) for n in renamed]
    if strip_prefix:
        renamed = [n.removeprefix(strip_prefix) for n in renamed]
    origin = dict(zip(renamed, names, strict=True))
    if len(origin) != len(names):
        clash = next(n for n in renamed if renamed.count(n) > 1)
        raise CheckpointError(f"{path}: two tensors would both be named {clash!r} once prefixes are removed")

    def spec_of(name: str) -> TensorSpec:
        spec = source.specs[origin[name]]
        return TensorSpec(spec.shape, dtype) if dtype is not None and spec.dtype.is_floating_point else spec

    specs = {name: spec_of(name) for name in origin}
    return Export(source, specs, lambda name: source[origin[name]].to(specs[name].dtype))


class Export(LazyStateDict):
    """Model-ready weights read from ``source`` (the opened file; ``source.note`` says which state dict)."""

    def __init__(self, source: TensorFile, specs: Mapping[str, TensorSpec], load: Callable[[str], Tensor]) -> None:
        super().__init__(specs, load, source.sources)
        self.source = source


# ---------------------------------------------------------------------------------------------- choosing files


def newest_checkpoints(where: str | os.PathLike[str], count: int) -> tuple[list[Path], str]:
    """The newest ``count`` checkpoints in a folder (or matching a glob pattern), oldest first; and the ordering.

    Files are ordered by the step number in their name (the last number; for a pattern, else the one in the
    folder's name, as in ``checkpoint-500/model.safetensors``); files without a number are then ignored (and
    named in the ordering), so ``checkpoint_best.pt`` is not counted twice. When no file has a number, by
    modification time.
    """
    where = Path(where)
    count = _checked(check_int, "count", count, low=1, hint="the number of newest checkpoints to take (--last N)")
    if where.is_dir():
        suffixes = (".safetensors", *TORCH_SUFFIXES)
        files = [p for p in where.iterdir() if p.is_file() and p.suffix.lower() in suffixes]
    elif any(c in str(where) for c in "*?["):
        files = [Path(p) for p in glob.glob(str(where)) if os.path.isfile(p)]
    else:
        raise CheckpointError(f"{where}: not a folder, nor a glob pattern like 'run/checkpoint-*/model.safetensors'")

    def step(p: Path) -> int | None:
        numbers = re.findall(r"\d+", p.stem) or (re.findall(r"\d+", p.parent.name) if not where.is_dir() else [])
        return int(numbers[-1]) if numbers else None

    numbered = [p for p in files if step(p) is not None]
    if numbered:
        chosen, how = sorted(numbered, key=lambda p: (step(p), p.stat().st_mtime)), "step number in the name"
        ignored = sorted(p.name for p in files if step(p) is None)
        if ignored:
            shown = ", ".join(ignored[:3]) + (", ..." if len(ignored) > 3 else "")
            how += (
                f"; ignoring {len(ignored)} file{'s' if len(ignored) > 1 else ''} with no number in the name ({shown})"
            )
    else:
        chosen, how = sorted(files, key=lambda p: p.stat().st_mtime), "modification time"
    if len(chosen) < count:
        raise CheckpointError(f"{where}: found {len(chosen)} checkpoint(s) by {how}, asked for the last {count}")
    return chosen[-count:], how
