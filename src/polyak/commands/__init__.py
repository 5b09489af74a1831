"""Command-line subcommands that work on checkpoint files; see :mod:`polyak.cli` for the registry."""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ..io import CheckpointError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def say(message: str) -> None:
    """A progress or report line, on stderr (stdout stays free for data)."""
    print(message, file=sys.stderr, flush=True)


def guarded(command: str, body: Callable[[], None]) -> int:
    """Run ``body``; a bad file or argument becomes ``polyak COMMAND: error: <one line>`` and exit code 2."""
    try:
        body()
    except CheckpointError as error:
        say(f"polyak {command}: error: {error}")
        return 2
    return 0


def size(nbytes: int) -> str:
    """``nbytes`` for people: ``"1.2 GB"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"
