"""``polyak demo``: on real data, when do averaged weights beat the last iterate, and when do they not?

MNIST-1D with plain SGD at a high learning rate, in a few settings (an MLP with a constant or decaying learning
rate, clean or noisy labels; a CNN with BatchNorm), over several seeds. One training run per setting and seed;
every average (EMA, SWA, power-function EMA, BEMA, post-hoc EMA snapshots) is tracked alongside by polyak's front
ends, attached to the same optimizer.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from collections.abc import Callable
from pathlib import Path

from .recipe import BATCH_SIZE

DEFAULTS = {"seeds": 5, "steps": 4000}
QUICK = {"seeds": 2, "steps": 600}
MIN_STEPS = 100
EXTRA = "pip install 'polyak[demo]'"
FILES = (
    ("plot", "accuracy.png"),
    ("σrel", "sigma_rel.png"),
    ("pick", "selection.png"),
    ("table", "table.md"),
    ("data", "results.json"),
)


def _count(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: a whole number >= ``minimum`` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    return parse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.description = (
        "Train on MNIST-1D (generated locally, nothing downloaded) with plain SGD at a high learning rate and "
        "compare the test accuracy of averaged weights with the last iterate's. Tracked in every run: EMA 0.99 "
        "and 0.999 (with warm-up), SWA over the last 25% of steps, power-function EMA (σrel 0.05 and 0.10) and "
        "BEMA. Settings: a small MLP with a constant learning rate, with a decaying one (where averaging should "
        "not help) and with 30% noisy labels; a small CNN with BatchNorm, where EMA and SWA are also evaluated "
        "after recomputing their BatchNorm statistics with update_bn. In the constant-rate MLP runs PostHocEMA "
        "keeps snapshots, and after training EMAs of 8 widths (σrel 0.02 to 0.25) are reconstructed from them, "
        "compared with the directly tracked ones, and one is chosen on a held-out split of the training data by "
        "polyak.posthoc.select. Prints a table (mean ± std over seeds) and its reading; writes them, a plot of "
        "test accuracy over training, a plot of accuracy against σrel, the selection plot and a JSON record of "
        "every evaluation to --out. About "
        "one minute of CPU time on one thread (--quick: ~10 s), longer on a busy machine. Deterministic for given "
        "options."
    )
    parser.add_argument(
        "--seeds",
        type=_count(1),
        help=f"runs per setting, seeds 0..N-1 (default {DEFAULTS['seeds']}; quick {QUICK['seeds']})",
    )
    parser.add_argument(
        "--steps",
        type=_count(MIN_STEPS),
        help=f"optimizer steps per run, batch {BATCH_SIZE} (default {DEFAULTS['steps']}; quick {QUICK['steps']})",
    )
    parser.add_argument("--out", type=Path, default=Path("polyak-demo"), help="output folder (default ./polyak-demo)")
    parser.add_argument("--quick", action="store_true", help="a short smoke run: fewer seeds and steps")


def run(args: argparse.Namespace) -> int:
    missing = [name for name in ("mnist1d", "matplotlib", "tqdm") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"polyak demo needs {', '.join(missing)}: {EXTRA}", file=sys.stderr)
        return 1
    if args.out.exists() and not args.out.is_dir():
        print(f"polyak demo: --out {args.out} is a file, not a folder", file=sys.stderr)
        return 2
    chosen = QUICK if args.quick else DEFAULTS
    seeds = args.seeds if args.seeds is not None else chosen["seeds"]
    steps = args.steps if args.steps is not None else chosen["steps"]

    from .session import session

    began = time.perf_counter()
    text = session(seeds, steps, args.out)
    print(f"\n{text}\n")
    for what, name in FILES:
        print(f"{what + ':':6} {args.out / name}")
    print(f"wall time: {time.perf_counter() - began:.0f} s")
    return 0
