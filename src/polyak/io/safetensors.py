"""The one safetensors reader and writer of the package.

Reading checks the header (valid JSON of bounded size and depth, known dtypes, shapes and offsets of
non-negative integers, tensors inside the file and not overlapping) and reads tensors with ``pread`` into
the caller's buffer. Writing streams tensors (whole, or in flat pieces) through :func:`atomic_write`.

Files polyak writes carry CRC-32 checksums in their metadata (``polyak.crc32``: the header's, then each
tensor's in file order), filled in when the writing ends. The reader checks the header's when it opens such
a file and a tensor's whenever the tensor has been read from start to end in order, so a damaged file is
refused instead of averaged. Files written by others have no checksum; their bytes are taken as they are.
"""

from __future__ import annotations

import json
import os
import re
import sys
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import torch
from torch import Tensor

from .base import (
    CheckpointError,
    TensorFile,
    TensorSpec,
    TensorWriter,
    atomic_write,
    crc32,
    identity,
    one_line,
    open_regular,
    regular_file,
)
from .base import pread_into as _pread_into

__all__ = ["SafetensorsFile", "SafetensorsWriter"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "C64": torch.complex64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
CODES = {dtype: code for code, dtype in DTYPES.items()}
MAX_HEADER = 100 << 20  # bytes; the limit the safetensors library enforces too
CHECKSUM_KEY = "polyak.crc32"
_KEPT_OPEN = 32  # files whose descriptor stays open between reads (an average reads its inputs in turn)
_recent: OrderedDict[int, weakref.ref[SafetensorsFile]] = OrderedDict()
_CHECKSUM_FIELD = re.compile(rb'"polyak\.crc32":"([0-9a-f ]*)"')
_DAMAGED = "re-create or re-download it"


def _parse(raw: bytes) -> dict[str, Any]:
    header = json.loads(raw)  # deep nesting raises RecursionError, caught by the caller
    if not isinstance(header, dict):
        raise TypeError(f"the header is a JSON {type(header).__name__}, not an object")
    return header


def _entry(name: str, value: Any) -> tuple[TensorSpec, tuple[int, int]]:
    if not isinstance(value, dict):
        raise TypeError(f"tensor {name!r} is described by a {type(value).__name__}, not an object")
    code: Any = value.get("dtype")
    shape: Any = value.get("shape")
    offsets: Any = value.get("data_offsets")
    dtype = DTYPES.get(code) if isinstance(code, str) else None
    if dtype is None:
        raise TypeError(f"tensor {name!r} has unsupported dtype {code!r}")
    numbers = [*shape, *offsets] if isinstance(shape, list) and isinstance(offsets, list) else None
    if not (numbers and len(offsets) == 2 and all(type(n) is int and n >= 0 for n in numbers)):  # no bools
        raise TypeError(f"tensor {name!r} has shape {shape!r} and offsets {offsets!r}; expected non-negative integers")
    spec = TensorSpec(tuple(shape), dtype)
    begin, stop = offsets
    if stop - begin != spec.nbytes:
        raise ValueError(f"tensor {name!r} spans {stop - begin} bytes, its {spec} needs {spec.nbytes}")
    return spec, (begin, stop)


def _one_off(key: str) -> bool:
    """Whether ``key`` is polyak's checksum key with one character changed."""
    return len(key) == len(CHECKSUM_KEY) and sum(a != b for a, b in zip(key, CHECKSUM_KEY, strict=True)) == 1


def _bytes(tensor: Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor, as a writable buffer over its memory."""
    return memoryview(tensor.view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


class SafetensorsFile(TensorFile):
    """A safetensors file, its header checked against the file; tensors are read with ``pread``.

    ``metadata``: the header's string metadata. ``checked``: whether the file carries polyak's checksums.
    """

    def __init__(self, path: Path) -> None:
        with open_regular(path) as f:
            self._identity = identity(f.fileno())
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(size - 8, MAX_HEADER):
                found = f"a header of {length} bytes in a file of {size}" if length >= 0 else f"{size} bytes"
                raise CheckpointError(f"{path}: truncated or corrupt safetensors file ({found}); {_DAMAGED}")
            raw = f.read(length)
        try:
            header = _parse(raw)
            metadata = header.pop("__metadata__", None) or {}
            if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
                raise TypeError("__metadata__ must map strings to strings")
            entries = {name: _entry(name, value) for name, value in header.items()}
        except (ValueError, TypeError, RecursionError) as error:
            raise CheckpointError(f"{path}: corrupt safetensors header ({one_line(error)}); {_DAMAGED}") from None
        self._start = 8 + length
        data = size - self._start
        end = 0
        order = sorted(entries, key=lambda n: entries[n][1])
        for name in order:
            begin, stop = entries[name][1]
            if begin < end or stop > data:
                reason = f"ends at byte {stop} of {data}" if stop > data else "overlaps another tensor"
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file: tensor {name!r} {reason}; {_DAMAGED}"
                )
            end = stop
        self._offsets = {name: begin for name, (_, (begin, _)) in entries.items()}
        super().__init__(path, {name: spec for name, (spec, _) in entries.items()})
        self.metadata: dict[str, str] = metadata
        self._expected = self._checksums(raw, order)
        self.checked = self._expected is not None
        self._running: dict[str, tuple[int, int]] = {}
        self._file: IO[bytes] | None = None  # tensor -> (next element, CRC so far), for in-order reads

    def _checksums(self, raw: bytes, order: list[str]) -> dict[str, int] | None:
        field = _CHECKSUM_FIELD.search(raw)
        if CHECKSUM_KEY not in self.metadata:
            if any(_one_off(key) for key in self.metadata):  # polyak's key itself hit: not a foreign file
                raise CheckpointError(
                    f"{self.path}: damaged safetensors file (its checksum key is altered); {_DAMAGED}"
                )
            return None
        words = self.metadata[CHECKSUM_KEY].split()
        if field is None or len(words) != len(order) + 1 or field.group(1).decode() != self.metadata[CHECKSUM_KEY]:
            raise CheckpointError(f"{self.path}: damaged safetensors file (its checksum list is malformed); {_DAMAGED}")
        blank = raw[: field.start(1)] + re.sub(rb"[0-9a-f]", b"0", field.group(1)) + raw[field.end(1) :]
        if f"{crc32(blank):08x}" != words[0]:
            raise CheckpointError(f"{self.path}: damaged safetensors file (its header fails its checksum); {_DAMAGED}")
        return {name: int(word, 16) for name, word in zip(order, words[1:], strict=True)}

    def read(self, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        spec = self.specs[name]
        stop = spec.numel if stop is None else min(stop, spec.numel)
        count = max(stop - start, 0)
        out = torch.empty(count, dtype=spec.dtype) if out is None else out[:count]
        if not count:
            return out
        buffer = _bytes(out)
        fd = self._fd()
        offset = self._start + self._offsets[name] + start * spec.dtype.itemsize
        if not self._same_file(fd) or _pread_into(fd, buffer, offset) != len(buffer):
            raise CheckpointError(f"{self.path}: the file changed while it was being read; open it again")
        if self._expected is not None:
            self._check(name, start, stop, buffer)
        return out

    def _fd(self) -> int:
        """The file's descriptor, kept open between reads for the most recently read files (at most _KEPT_OPEN)."""
        if self._file is None:
            self._file = regular_file(self.path)
        key = id(self)
        if key in _recent and _recent[key]() is self:
            _recent.move_to_end(key)
            return self._file.fileno()
        _recent.pop(key, None)
        _recent[key] = weakref.ref(self)
        while len(_recent) > _KEPT_OPEN:
            other = _recent.popitem(last=False)[1]()
            if other is not None and other._file is not None:
                other._file.close()
                other._file = None
        return self._file.fileno()

    def _same_file(self, fd: int) -> bool:
        """Whether ``fd`` still holds the version opened, and ``path`` still names it (not replaced, not rewritten)."""
        try:
            named = os.stat(self.path)
        except OSError:
            return False
        return identity(fd) == self._identity and (named.st_dev, named.st_ino) == self._identity[:2]

    def _check(self, name: str, start: int, stop: int, data: memoryview) -> None:
        at, crc = self._running.pop(name, (0, 0))
        if start != at:  # out of order: this pass cannot be checked; a later one from the start will be
            if start != 0:
                return
            crc = 0
        crc = crc32(data, crc)
        if stop < self.specs[name].numel:
            self._running[name] = (stop, crc)
        elif crc != self._expected[name]:  # type: ignore[index]
            raise CheckpointError(f"{self.path}: damaged file: tensor {name!r} fails its checksum; {_DAMAGED}")


class SafetensorsWriter(TensorWriter):
    """Writes a safetensors file, tensors in decreasing item size (so every tensor stays aligned), with checksums.

    ``metadata`` (strings) goes into the header next to ``"format": "pt"``.
    """

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], metadata: Mapping[str, str] | None = None) -> None:
        if sys.byteorder != "little":
            raise RuntimeError("safetensors files are little-endian; this big-endian host is not supported")
        names = sorted(specs, key=lambda n: -specs[n].dtype.itemsize)
        super().__init__(path, specs, names)
        extra = dict(metadata or {})
        if "__metadata__" in specs or not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
            raise CheckpointError(
                "safetensors metadata must map strings to strings; no tensor may be named __metadata__"
            )
        if CHECKSUM_KEY in extra:
            raise CheckpointError(f"metadata key {CHECKSUM_KEY!r} is polyak's own; pick another name")
        for name, spec in self.specs.items():
            if spec.dtype not in CODES:
                raise CheckpointError(
                    f"tensor {name!r} has dtype {spec.dtype}, which safetensors cannot store; write .pt instead"
                )
        self._metadata = {"format": "pt", **extra}
        self._crcs = [0] * len(names)
        self._header = self._encode(None)
        self._stack = ExitStack()
        self._file = self._stack.enter_context(atomic_write(path))
        try:
            self._file.write(len(self._header).to_bytes(8, "little") + self._header)
        except BaseException as error:
            self.abort(error)
            raise

    def _encode(self, crcs: list[int] | None) -> bytes:
        """The header; with ``crcs=None`` its checksums are zeros (the form the header's own CRC covers)."""
        words = ["00000000"] * (len(self.names) + 1) if crcs is None else [f"{c:08x}" for c in crcs]
        header: dict[str, Any] = {"__metadata__": {**self._metadata, CHECKSUM_KEY: " ".join(words)}}
        offset = 0
        for name in self.names:
            spec = self.specs[name]
            header[name] = {
                "dtype": CODES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        return blob + b" " * (-len(blob) % 8)  # the data starts 8-byte aligned

    def _put(self, name: str, start: int, flat: Tensor, keep: bool) -> None:
        data = _bytes(flat.contiguous())
        self._crcs[self._index] = crc32(data, self._crcs[self._index])
        self._file.write(data)

    def _finish(self) -> None:
        header = self._encode([crc32(self._header), *self._crcs])
        try:
            self._file.seek(8)
            self._file.write(header)
        except BaseException as error:
            self.abort(error)
            raise
        self._stack.close()

    def abort(self, error: BaseException | None = None) -> None:
        error = error if error is not None else RuntimeError(f"{self.path}: writing abandoned")
        self._stack.__exit__(type(error), error, error.__traceback__)
