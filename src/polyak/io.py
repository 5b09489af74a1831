"""Checkpoint files, safely: lazy reading that never runs pickled code, and atomic writing.

Reading: ``.safetensors`` files are parsed here (header checked against the file size, tensors read with
plain file reads); PyTorch files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``) are loaded with
``torch.load(weights_only=True, mmap=True)``, and the mapped pages of a tensor are handed back to the OS
once it has been read. Either way a tensor is read on demand, in pieces if asked, so reading costs about
one piece of memory, not one file. The format is recognised from the file's first bytes, not its name.

Writing: :func:`save_state_dict` writes safetensors (streamed, one tensor in memory at a time) or a
PyTorch file through :func:`atomic_write`: a temporary file in the same folder, flushed and fsync-ed, then
renamed over the target. A crash or a full disk leaves the previous file intact.

Every problem with a file raises :class:`CheckpointError` with a one-line message that names the file.
"""

from __future__ import annotations

import ctypes
import errno
import json
import mmap
import os
import pickle
import re
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Literal

import torch
from torch import Tensor

__all__ = [
    "CheckpointError",
    "LazyStateDict",
    "TensorFile",
    "TensorSpec",
    "atomic_write",
    "load_torch",
    "one_line",
    "open_safetensors",
    "output_format",
    "save_state_dict",
    "sniff",
    "torch_tensors",
]

Format = Literal["safetensors", "pt"]
TORCH_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

_ST_DTYPES: dict[str, torch.dtype] = {
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
_ST_CODES = {dtype: code for code, dtype in _ST_DTYPES.items()}
_MAX_HEADER = 100 << 20  # bytes; the limit the safetensors library enforces too


class CheckpointError(ValueError):
    """A checkpoint file is missing, unreadable, corrupt, refused, or does not fit; the message is one line."""


def one_line(error: BaseException) -> str:
    """The first line of an exception's message, for reports that must stay on one line."""
    text = str(error).strip().splitlines()
    return text[0].strip() if text else type(error).__name__


# ---------------------------------------------------------------------------------------------- state dicts


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor that has not been read yet."""

    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for size in self.shape:
            n *= size
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize

    def __str__(self) -> str:
        return f"shape {self.shape} {str(self.dtype).removeprefix('torch.')}"


class LazyStateDict(Mapping[str, Tensor]):
    """A read-only state dict whose tensors are produced on access, one at a time.

    Shapes and dtypes (``specs``) are known up front, so a writer can stream it to disk and a
    ``dict(lazy)`` or ``model.load_state_dict(lazy)`` materialises it. Each access computes the tensor anew.
    """

    def __init__(self, specs: Mapping[str, TensorSpec], load: Callable[[str], Tensor]) -> None:
        self.specs = dict(specs)
        self._load = load

    def __getitem__(self, name: str) -> Tensor:
        if name not in self.specs:
            raise KeyError(name)
        return self._load(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self)} tensors, {sum(s.nbytes for s in self.specs.values())} bytes)"


# ---------------------------------------------------------------------------------------------- reading


class TensorFile(LazyStateDict):
    """The tensors of one file (or of one state dict inside a training checkpoint), read on demand.

    ``key`` is where the state dict sits in the file (``None``: the whole file); ``note`` says how it was
    chosen when there was a choice. ``file[name]`` reads a whole tensor; :meth:`read` reads a flat piece.
    """

    def __init__(self, path: Path, specs: Mapping[str, TensorSpec], key: str | None = None) -> None:
        super().__init__(specs, lambda name: self.read(name).view(self.specs[name].shape))
        self.path = path
        self.key = key
        self.note: str | None = None

    def read(self, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        """Elements ``[start, stop)`` of tensor ``name``, flattened, as a CPU tensor that owns its memory.

        ``stop`` is clipped to the tensor's size. With ``out`` (a 1-D tensor of the same dtype, large enough) the
        elements are read into its start and that view is returned, so a loop can reuse one buffer.
        """
        raise NotImplementedError


def open_safetensors(path: str | os.PathLike[str]) -> TensorFile:
    """A safetensors file, its header checked against the file; tensors are read with plain file reads."""
    return _SafetensorsFile(Path(path))


def torch_tensors(
    path: str | os.PathLike[str], tensors: Mapping[str, Tensor], *, mapped: bool, key: str | None = None
) -> TensorFile:
    """The tensors of a state dict from :func:`load_torch`; with ``mapped``, pages are released once read."""
    return _TorchTensors(Path(path), dict(tensors), key, mapped)


class _SafetensorsFile(TensorFile):
    def __init__(self, path: Path) -> None:
        with _opened(path) as f:
            self._identity = _identity(f)
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            length = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 0 < length <= min(size - 8, _MAX_HEADER):
                found = f"a header of {length} bytes in a file of {size}" if length >= 0 else f"{size} bytes"
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file ({found}); re-create or re-download it"
                )
            try:
                header = json.loads(f.read(length))
                header.pop("__metadata__", None)
                entries = {name: self._entry(name, value) for name, value in header.items()}
            except (ValueError, TypeError, KeyError, AttributeError) as error:
                raise CheckpointError(
                    f"{path}: corrupt safetensors header ({one_line(error)}); re-create or re-download it"
                ) from None
        self._start = 8 + length
        data = size - self._start
        end = 0
        for name, (_, (begin, stop)) in sorted(entries.items(), key=lambda item: item[1][1]):
            if begin < end or stop > data:
                reason = f"ends at byte {stop} of {data}" if stop > data else "overlaps another tensor"
                raise CheckpointError(
                    f"{path}: truncated or corrupt safetensors file: tensor {name!r} {reason}; "
                    "re-create or re-download it"
                )
            end = stop
        self._offsets = {name: begin for name, (_, (begin, _)) in entries.items()}
        super().__init__(path, {name: spec for name, (spec, _) in entries.items()})

    @staticmethod
    def _entry(name: str, value: dict[str, Any]) -> tuple[TensorSpec, tuple[int, int]]:
        dtype = _ST_DTYPES.get(value["dtype"])
        shape = tuple(value["shape"])
        begin, stop = value["data_offsets"]
        if dtype is None:
            raise ValueError(f"tensor {name!r} has unsupported dtype {value['dtype']!r}")
        if not all(isinstance(n, int) and n >= 0 for n in (*shape, begin, stop)):
            raise ValueError(f"tensor {name!r} has a bad shape or offsets")
        spec = TensorSpec(shape, dtype)
        if stop - begin != spec.nbytes:
            raise ValueError(f"tensor {name!r} spans {stop - begin} bytes, its {spec} needs {spec.nbytes}")
        return spec, (begin, stop)

    def read(self, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        spec = self.specs[name]
        count = max((spec.numel if stop is None else min(stop, spec.numel)) - start, 0)
        out = torch.empty(count, dtype=spec.dtype) if out is None else out[:count]
        if count:
            buffer = out.view(torch.uint8).numpy()
            with _opened(self.path) as f:
                f.seek(self._start + self._offsets[name] + start * spec.dtype.itemsize)
                if _identity(f) != self._identity or f.readinto(buffer) != buffer.nbytes:  # type: ignore[attr-defined]
                    raise CheckpointError(f"{self.path}: the file changed while it was being read; open it again")
        return out


def _identity(f: IO[bytes]) -> tuple[int, ...]:
    """Which file ``f`` is, and which version of it: a replaced or rewritten file reads differently."""
    stat = os.fstat(f.fileno())
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns


class _TorchTensors(TensorFile):
    def __init__(self, path: Path, tensors: dict[str, Tensor], key: str | None, mapped: bool) -> None:
        super().__init__(path, {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in tensors.items()}, key)
        self._tensors = tensors
        self._mapped = mapped

    def read(self, name: str, start: int = 0, stop: int | None = None, out: Tensor | None = None) -> Tensor:
        tensor = self._tensors[name]
        piece = tensor.reshape(-1)[start:stop]
        out = piece.clone() if out is None else out[: piece.numel()].copy_(piece)
        if self._mapped and tensor.is_contiguous():  # the piece is a view of the file's mapping
            _release(piece)
        return out


_libc = ctypes.CDLL(None, use_errno=True) if hasattr(mmap, "MADV_DONTNEED") else None


def _release(mapped: Tensor) -> None:
    """Hand the pages under ``mapped`` (a view of a private read-only file mapping) back to the OS.

    The data stays valid: touching it again re-reads the file. Never call this on anonymous memory.
    """
    nbytes = mapped.numel() * mapped.element_size()
    if _libc is None or nbytes == 0:
        return
    address = mapped.data_ptr()
    first = address - address % mmap.PAGESIZE
    _libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(address + nbytes - first), mmap.MADV_DONTNEED)


@contextmanager
def _opened(path: Path) -> Iterator[IO[bytes]]:
    try:
        f = open(path, "rb")  # noqa: SIM115 - errors of open() alone are translated
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file") from None
    except OSError as error:
        raise CheckpointError(f"{path}: cannot read ({error.strerror})") from None
    with f:
        yield f


def sniff(path: Path) -> Literal["safetensors", "zip", "pickle"]:
    """What a file holds, from its first bytes: ``"safetensors"``, ``"zip"`` (PyTorch) or ``"pickle"`` (old PyTorch)."""
    with _opened(path) as f:
        head = f.read(9)
    if head[:4] == b"PK\x03\x04":
        return "zip"
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    if head[:1] == b"\x80":
        return "pickle"
    what = "is empty" if not head else f"starts with {head[:8]!r}"
    raise CheckpointError(f"{path}: not a safetensors or PyTorch checkpoint (it {what})")


def load_torch(path: str | os.PathLike[str]) -> tuple[Any, bool]:
    """``torch.load`` a PyTorch file safely: ``weights_only=True``, memory-mapped, on the CPU.

    Returns the loaded object and whether its tensors are memory-mapped (files written before PyTorch 1.6
    cannot be; they are read whole). Raises :class:`CheckpointError` with a one-line reason.
    """
    path = Path(path)
    mapped = sniff(path) == "zip"
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mapped), mapped
    except pickle.UnpicklingError as error:
        found = re.search(r"(Unsupported global: GLOBAL \S+|Unsupported operand \S+)", str(error))
        detail = found.group(1) if found else one_line(error)
        raise CheckpointError(
            f"{path}: holds pickled Python objects, which polyak never unpickles ({detail}); save the tensors "
            "alone (torch.save(model.state_dict(), ...)) or as safetensors, or pick a state dict with --key"
        ) from None
    except Exception as error:  # torch raises RuntimeError, EOFError, zipfile and OS errors on bad files
        raise CheckpointError(
            f"{path}: not a readable PyTorch checkpoint, truncated or corrupt ({one_line(error)})"
        ) from None


# ---------------------------------------------------------------------------------------------- writing


@contextmanager
def atomic_write(path: str | os.PathLike[str]) -> Iterator[IO[bytes]]:
    """Open a binary file that replaces ``path`` only when the block completes.

    The bytes go to a temporary file in the same folder, which is flushed, fsync-ed and renamed over
    ``path``, and the folder is fsync-ed. On any error (or a kill) ``path`` keeps its previous content; the
    temporary file is removed unless the process was killed. OS errors become :class:`CheckpointError`.
    """
    path = Path(path)
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as error:
        raise CheckpointError(f"{path}: cannot create a file in {path.parent} ({error.strerror})") from None
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(temporary, 0o666 & ~umask)
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException as error:
        with suppress(OSError):
            os.unlink(temporary)
        if isinstance(error, OSError):
            full = error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            reason = "disk full" if full else "write failed"
            raise CheckpointError(
                f"{path}: {reason} ({error.strerror}); nothing was changed — free space or write elsewhere"
            ) from None
        raise
    with suppress(OSError):  # make the rename itself durable; not possible on every platform
        directory = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


def output_format(path: str | os.PathLike[str]) -> Format:
    """``"pt"`` for ``.pt/.pth/.bin/.ckpt`` names, else ``"safetensors"``."""
    return "pt" if Path(path).suffix.lower() in TORCH_SUFFIXES else "safetensors"


def save_state_dict(
    state: Mapping[str, Tensor],
    path: str | os.PathLike[str],
    *,
    format: Format | None = None,
    metadata: Mapping[str, str] | None = None,
    progress: bool = False,
) -> None:
    """Write a state dict to ``path`` atomically (see :func:`atomic_write`).

    ``format``: ``"safetensors"`` or ``"pt"`` (a plain dict of tensors, for ``torch.load``); by default from
    the file name (:func:`output_format`). Safetensors is written streaming: a :class:`LazyStateDict` is
    computed and written one tensor at a time. ``metadata`` (strings) goes into the safetensors header next
    to ``"format": "pt"``; a ``.pt`` file has none. ``progress`` shows a bar (needs ``tqdm``).
    """
    path = Path(path)
    fmt = format or output_format(path)
    specs = state.specs if isinstance(state, LazyStateDict) else {n: _spec(n, t) for n, t in state.items()}
    bar = _bar(sum(s.nbytes for s in specs.values()), f"writing {path.name}", progress)
    try:
        if fmt == "pt":
            tensors = {}
            for name, spec in specs.items():
                tensors[name] = _checked(name, state[name], spec)
                bar.update(spec.nbytes)
            with atomic_write(path) as f:
                torch.save(tensors, f)
            return
        order = sorted(specs, key=lambda n: -specs[n].dtype.itemsize)  # keeps every tensor aligned
        with atomic_write(path) as f:
            f.write(_safetensors_header(specs, order, metadata or {}))
            for name in order:
                tensor = _checked(name, state[name], specs[name]).detach().to("cpu").contiguous()
                if tensor.numel():
                    f.write(tensor.reshape(-1).view(torch.uint8).numpy().data)
                bar.update(specs[name].nbytes)
    finally:
        bar.close()


def _spec(name: str, tensor: Any) -> TensorSpec:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"state dict entry {name!r} is a {type(tensor).__name__}, not a tensor")
    return TensorSpec(tuple(tensor.shape), tensor.dtype)


def _checked(name: str, tensor: Tensor, spec: TensorSpec) -> Tensor:
    if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
        raise RuntimeError(f"tensor {name!r} came out as {_spec(name, tensor)}, announced as {spec}")
    return tensor


def _safetensors_header(specs: Mapping[str, TensorSpec], order: list[str], metadata: Mapping[str, str]) -> bytes:
    header: dict[str, Any] = {"__metadata__": {"format": "pt", **metadata}}
    if "__metadata__" in specs or not all(isinstance(v, str) for v in header["__metadata__"].values()):
        raise CheckpointError("safetensors metadata must map strings to strings; no tensor may be named __metadata__")
    offset = 0
    for name in order:
        spec = specs[name]
        if spec.dtype not in _ST_CODES:
            raise CheckpointError(f"tensor {name!r} has dtype {spec.dtype}, which safetensors cannot store; write .pt")
        end = offset + spec.nbytes
        header[name] = {"dtype": _ST_CODES[spec.dtype], "shape": list(spec.shape), "data_offsets": [offset, end]}
        offset = end
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
    return len(blob).to_bytes(8, "little") + blob


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
