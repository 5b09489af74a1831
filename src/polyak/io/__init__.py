"""Checkpoint files, safely: lazy reading that never runs pickled code and never trusts a damaged file, atomic writing.

Reading: ``.safetensors`` files are parsed here (header checked against the file, tensors read with ``pread``
into reused buffers, polyak's own checksums verified); PyTorch files (``.pt``, ``.pth``, ``.bin``, ``.ckpt``)
have their zip CRCs and declared sizes checked, then are loaded with ``torch.load(weights_only=True,
mmap=True)``. Either way a tensor is read on demand, in pieces if asked. The format is recognised from the
file's first bytes, not its name; only regular files are opened (a FIFO or device is refused, not waited on).

Writing: :func:`save_state_dict` and :func:`open_writer` write safetensors (streamed) or a PyTorch file
through :func:`atomic_write`: a temporary file in the same folder, fsync-ed, then renamed over the target. A
crash or a full disk leaves the previous file intact; a replaced file keeps its permissions; a symbolic link
is written through. A folder is written with :func:`folder_writer`: beside the target, then moved into it file by
file, adding to what it holds. :func:`check_output` refuses an output that is, is inside or holds an input.

Every problem with a file raises :class:`CheckpointError` (a ``ValueError``) with a one-line message naming it.
"""

import os
from pathlib import Path

from .base import (
    SUFFIXES,
    TORCH_SUFFIXES,
    CheckpointError,
    Format,
    LazyStateDict,
    TensorFile,
    TensorSpec,
    TensorWriter,
    atomic_write,
    one_line,
    open_regular,
    output_format,
    sniff,
)
from .folders import check_names, folder_writer
from .outputs import Input, check_output
from .safetensors import SafetensorsFile, SafetensorsWriter
from .torch_files import TorchWriter, check_zip, load_torch, torch_tensors
from .writing import open_writer, save_state_dict

__all__ = [
    "SUFFIXES",
    "TORCH_SUFFIXES",
    "CheckpointError",
    "Format",
    "Input",
    "LazyStateDict",
    "SafetensorsFile",
    "SafetensorsWriter",
    "TensorFile",
    "TensorSpec",
    "TensorWriter",
    "TorchWriter",
    "atomic_write",
    "check_names",
    "check_output",
    "check_zip",
    "folder_writer",
    "load_torch",
    "one_line",
    "open_regular",
    "open_safetensors",
    "open_writer",
    "output_format",
    "save_state_dict",
    "sniff",
    "torch_tensors",
]


def open_safetensors(path: str | os.PathLike[str]) -> SafetensorsFile:
    """A safetensors file, its header checked against the file; tensors are read on demand with ``pread``."""
    return SafetensorsFile(Path(path))
