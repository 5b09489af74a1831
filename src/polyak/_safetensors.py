"""Safetensors metadata, and a safetensors writer that takes each tensor in flat pieces.

:func:`polyak.io.save_state_dict` writes one whole tensor at a time to one file; post-hoc reconstruction
writes several files at once, a piece of a tensor at a time, so that memory does not grow with the largest
tensor. The bytes go through :func:`polyak.io.atomic_write` (temporary file, fsync, rename, fsync of the
folder). Reading tensors is :func:`polyak.io.open_safetensors`; :func:`read_metadata` adds the header's
string metadata, which it does not keep.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType

import torch
from torch import Tensor

from .io import CheckpointError, atomic_write

__all__ = ["AtomicWriter", "read_metadata"]

_CODES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}


class AtomicWriter:
    """Writes a safetensors file piece by piece; the file appears at ``path`` only on :meth:`commit`.

    ``layout`` lists ``(name, shape, dtype)`` in file order; :meth:`write` then takes the data in that order,
    whole tensors or consecutive flat pieces of them (any device, already in the layout's dtype). As a
    context manager it commits on success and removes the temporary file on error.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        layout: Sequence[tuple[str, Sequence[int], torch.dtype]],
        metadata: dict[str, str],
    ) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this big-endian host is not supported")
        self.path = Path(path)
        header: dict[str, object] = {"__metadata__": metadata}
        offset = 0
        self._expected: list[tuple[str, torch.dtype, int]] = []  # name, dtype, bytes
        for name, shape, dtype in layout:
            if dtype not in _CODES:
                raise TypeError(
                    f"tensor {name!r} has dtype {dtype}, which safetensors cannot store; "
                    f"supported: {', '.join(str(d) for d in _CODES)}"
                )
            dims = [int(n) for n in shape]
            size = dtype.itemsize
            for n in dims:
                size *= n
            header[name] = {"dtype": _CODES[dtype], "shape": dims, "data_offsets": [offset, offset + size]}
            self._expected.append((name, dtype, size))
            offset += size
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)
        self._stack = ExitStack()
        self._file = self._stack.enter_context(atomic_write(self.path))
        self._file.write(len(encoded).to_bytes(8, "little"))
        self._file.write(encoded)
        self._index, self._left = 0, self._expected[0][2] if self._expected else 0

    def _skip_full(self) -> None:
        while self._index < len(self._expected) and self._left == 0:
            self._index += 1
            self._left = self._expected[self._index][2] if self._index < len(self._expected) else 0

    def write(self, data: Tensor) -> None:
        """Append ``data``: the next tensor of the layout, or the next flat piece of it (empty data: no-op)."""
        if data.numel() == 0:
            return
        self._skip_full()
        if self._index == len(self._expected):
            raise RuntimeError(f"{self.path}: all {len(self._expected)} tensors are already written")
        name, dtype, _ = self._expected[self._index]
        raw = data.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if data.dtype != dtype or raw.numel() > self._left:
            raise ValueError(
                f"tensor {name!r}: expected {dtype} data of at most {self._left} bytes, "
                f"got {data.dtype} of {raw.numel()} bytes"
            )
        self._file.write(raw.numpy().data)
        self._left -= raw.numel()

    def commit(self) -> None:
        """Flush, fsync and rename into place, then fsync the folder."""
        self._skip_full()
        if self._index != len(self._expected):
            error = RuntimeError(f"{self.path}: only {self._index} of {len(self._expected)} tensors were written")
            self.abort(error)
            raise error
        self._stack.close()

    def abort(self, error: BaseException | None = None) -> None:
        """Remove the temporary file; ``path`` keeps its previous content."""
        error = error if error is not None else RuntimeError(f"{self.path}: writing abandoned")
        self._stack.__exit__(type(error), error, error.__traceback__)

    def __enter__(self) -> AtomicWriter:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        if error is None:
            self.commit()
        else:
            self.abort(error)


def read_metadata(path: str | os.PathLike[str]) -> dict[str, str]:
    """The string metadata (``__metadata__``) of a safetensors file; check the file with ``open_safetensors``."""
    try:
        with open(path, "rb") as file:
            header = json.loads(file.read(int.from_bytes(file.read(8), "little")))
        metadata = header.get("__metadata__") or {}
        return {str(key): str(value) for key, value in metadata.items()}
    except (OSError, ValueError, AttributeError) as error:
        raise CheckpointError(f"{path}: cannot read the safetensors header ({error})") from None
