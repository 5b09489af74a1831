"""Writing a state dict, whole or streamed, in either format."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .base import Format, LazyStateDict, TensorSpec, TensorWriter, output_format
from .outputs import Input, check_output
from .safetensors import SafetensorsWriter
from .torch_files import TorchWriter

__all__ = ["open_writer", "save_state_dict"]


def open_writer(
    path: str | os.PathLike[str],
    specs: Mapping[str, TensorSpec],
    *,
    format: Format | None = None,
    metadata: Mapping[str, str] | None = None,
    inputs: Iterable[Input] = (),
) -> TensorWriter:
    """A :class:`~polyak.io.TensorWriter` for ``path``: write its ``names`` in order (whole or in pieces), then commit.

    ``format``: ``"safetensors"`` (streamed to disk, with polyak's checksums) or ``"pt"`` (a plain dict of
    tensors for ``torch.load``, gathered in memory and saved at commit); by default from the suffix
    (:func:`~polyak.io.output_format`, which refuses an unknown one). ``metadata`` goes into a safetensors
    header; a ``.pt`` file has none. ``inputs``: ``(what, path)`` of the files and folders the data comes
    from; a ``path`` that is, is inside or holds one of them is refused (:func:`~polyak.io.check_output`).
    """
    path = Path(path)
    check_output(path, inputs)
    if (format or output_format(path)) == "pt":
        return TorchWriter(path, specs)
    return SafetensorsWriter(path, specs, metadata)


def save_state_dict(
    state: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    format: Format | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: bool = False,
    inputs: Iterable[Input] = (),
) -> None:
    """Write a state dict to ``path`` atomically (a temporary file, fsync-ed, renamed over ``path``).

    ``format``: ``"safetensors"`` or ``"pt"``; by default from the file name (``.safetensors``, or
    ``.pt/.pth/.bin/.ckpt``; another suffix is refused). A :class:`LazyStateDict` is computed and written one
    tensor (or piece) at a time. ``metadata`` (strings) goes into the safetensors header next to
    ``"format": "pt"``. ``progress`` shows a bar (needs ``tqdm``). See :func:`~polyak.io.atomic_write` for
    what happens to an existing file, a symbolic link or a full disk. ``path`` may not be (or be inside) one of
    ``inputs`` or of the files a :class:`LazyStateDict` reads (its ``sources``): inputs are read-only.
    """
    lazy = state if isinstance(state, LazyStateDict) else None
    specs = lazy.specs if lazy is not None else {name: _spec(name, tensor) for name, tensor in state.items()}
    read = [("a file this state dict is read from", source) for source in (lazy.sources if lazy is not None else ())]
    check_output(path, [*inputs, *read])  # before any progress bar or format check
    bar = _bar(sum(s.nbytes for s in specs.values()), f"writing {Path(path).name}", progress)
    try:
        with open_writer(path, specs, format=format, metadata=metadata, inputs=inputs) as writer:
            for name in writer.names:
                spec, written = specs[name], 0
                for piece in lazy.pieces(name) if lazy is not None else [state[name]]:
                    _check(name, piece, spec, written + piece.numel() if lazy is not None else None)
                    writer.write(piece, keep=lazy is None)
                    written += piece.numel()
                if written != spec.numel:
                    raise RuntimeError(f"tensor {name!r} came out with {written} elements, announced as {spec}")
                bar.update(spec.nbytes)
    finally:
        bar.close()


def _spec(name: str, tensor: Any) -> TensorSpec:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
    if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
        raise TypeError(f"state dict entry {name!r} is a {tensor.layout} tensor; write dense tensors (.to_dense())")
    return TensorSpec(tuple(tensor.shape), tensor.dtype)


def _check(name: str, tensor: Tensor, spec: TensorSpec, written: int | None) -> None:
    if (
        tensor.dtype != spec.dtype
        or (written is None and tuple(tensor.shape) != spec.shape)
        or (written is not None and written > spec.numel)
    ):
        found = f"shape {tuple(tensor.shape)} {str(tensor.dtype).removeprefix('torch.')}"
        raise RuntimeError(f"tensor {name!r} came out as {found}, announced as {spec}")


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(total: int, description: str, enabled: bool) -> Any:
    """A tqdm progress bar in bytes when ``enabled`` and tqdm is installed, else a stand-in that does nothing."""
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm  # optional dependency
    except ImportError:
        return _NoBar()
    return tqdm(total=total, desc=description, unit="B", unit_scale=True, unit_divisor=1024, leave=False, disable=None)
