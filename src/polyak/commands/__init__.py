"""The ``polyak`` subcommands (average, export, posthoc, demo, bench), one module or package each.

See :mod:`polyak.cli` for the registry; shared helpers for their output live here. A command's module imports
torch and the library only when the command runs, so that ``--help`` and usage errors answer at once.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from ..io import Format


class _Dtypes(Mapping[str, "torch.dtype"]):
    """The ``--dtype`` choices: name -> torch dtype, torch imported when one is looked up."""

    _NAMES = ("bfloat16", "float16", "float32", "float64")

    def __getitem__(self, name: str) -> torch.dtype:
        if name not in self._NAMES:
            raise KeyError(name)
        import torch

        return getattr(torch, name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._NAMES)

    def __len__(self) -> int:
        return len(self._NAMES)


DTYPES = _Dtypes()
OUTPUT_HELP = (
    "output file: .safetensors or .pt/.pth/.bin/.ckpt (other suffixes are refused unless --format is given); "
    "an existing file is replaced atomically and keeps its permissions; a symbolic link is written through"
)


def output_format(output: str, given: Format | None, example: str, otherwise: str = "") -> Format:
    """The format to write ``-o output`` in: ``given`` (``--format``), else from its suffix.

    An existing folder is refused in words that say so, with ``example`` (a file name) inside it as what to give
    and ``otherwise`` (e.g. another option) after it.
    """
    from ..io import CheckpointError
    from ..io import output_format as from_suffix

    if Path(output).is_dir():
        raise CheckpointError(
            f"-o {output}: is a folder; give the output file's name, e.g. -o {Path(output) / example}{otherwise}"
        )
    return given or from_suffix(output)


def say(message: str) -> None:
    """A progress or report line, on stderr (stdout stays free for data)."""
    print(message, file=sys.stderr, flush=True)


def guarded(command: str, body: Callable[[], None]) -> int:
    """Run ``body``; a bad file, argument or OS error becomes ``polyak COMMAND: error: <one line>``, exit code 2.

    Interrupted (Ctrl-C): exit code 130, and every output is left as it was (writes are atomic).
    """
    from ..io import one_line

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
