"""``polyak bench``: the cost of one averaging update, against the memory-bandwidth floor and other libraries.

An EMA update reads the model once and reads and writes the average once. The floor is one ``lerp_`` over a
single contiguous float32 buffer with as many elements as the model averages: no update can move less memory.
Every implementation is timed between two runs of the floor, in an order that rotates from round to round,
and reported as the median over rounds of its time over the floors' geometric mean, with the quartiles, so
load that changes over seconds cancels out. Operations, host syncs and allocations are counted at the ATen
dispatcher; memory is what the implementation keeps alive, found by scanning the live tensors.

Modules: ``command`` (the options and the run), ``shapes`` (the model shapes by name) and ``models`` (their
tensor layouts), ``harness`` (timing), ``census`` (operations, syncs, memory), ``goals`` (the goal lines),
``report`` (Markdown or JSON), and ``sections/``: what is timed, one module per idea (the floors, polyak's EMA,
16-bit models, ``update_every``, other libraries).

Adding a section (new rows and the goals that judge them) is one module: write ``sections/<name>.py`` with
``CONTENDERS``, a list of ``Contender(name, build)`` where ``build(model)`` returns the call made after each
optimizer step, and ``GOALS``, a list of ``Goal(subject, reference, limit)``: the subject's time is at most
``limit`` times the reference's, both measured in the same run (the reference may be any row, e.g.
``goals.FLOOR``); then name the module in ``sections.SECTIONS``, where its place sets where its rows print.
"""

from __future__ import annotations

from typing import Any

from .command import configure, run

__all__ = ["Census", "configure", "run"]


def __getattr__(name: str) -> Any:
    """``Census`` (the operation counter the tests use), imported with torch on first use."""
    if name == "Census":
        from .census import Census

        return Census
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
