"""The ``polyak`` subcommands (average, export, posthoc, demo, bench), one module or package each.

See :mod:`polyak.cli` for the registry; shared helpers for their output live here.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch

from ..io import one_line

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}
OUTPUT_HELP = (
    "output file: .safetensors or .pt/.pth/.bin/.ckpt (other suffixes are refused unless --format is given); "
    "an existing file is replaced atomically and keeps its permissions; a symbolic link is written through"
)


def say(message: str) -> None:
    """A progress or report line, on stderr (stdout stays free for data)."""
    print(message, file=sys.stderr, flush=True)


def guarded(command: str, body: Callable[[], None]) -> int:
    """Run ``body``; a bad file, argument or OS error becomes ``polyak COMMAND: error: <one line>``, exit code 2.

    Interrupted (Ctrl-C): exit code 130, and every output is left as it was (writes are atomic).
    """
    try:
        body()
    except KeyboardInterrupt:
        say(f"polyak {command}: interrupted; no output was changed")
        return 130
    except (ValueError, TypeError, RuntimeError, OSError, OverflowError, RecursionError, MemoryError) as error:
        say(f"polyak {command}: error: {one_line(error)}")
        return 2
    return 0


def plural(count: int, noun: str) -> str:
    """``"1 checkpoint"``, ``"3 checkpoints"``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def size(nbytes: int) -> str:
    """``nbytes`` for people: ``"1.2 GB"``."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.3g} {unit}"
    return f"{nbytes} B"
