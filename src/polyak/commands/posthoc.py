"""``polyak posthoc SNAPSHOT_DIR --sigma-rel 0.1 [--step T] -o out.safetensors [--plot profile.png]``."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from ..rules import sigma_rel_to_gamma
from . import DTYPES, guarded, plural

if TYPE_CHECKING:
    from ..posthoc import Reconstruction

# polyak.posthoc.MAX_FIT_ERROR, written out so that --help needs no torch (tests/test_cli.py holds them equal)
MAX_FIT_ERROR = 0.1


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("directory", metavar="SNAPSHOT_DIR", help="directory of PostHocEMA snapshots")
    parser.add_argument(
        "--sigma-rel", type=float, nargs="+", required=True, help="relative width(s) of the wanted EMA, e.g. 0.1"
    )
    parser.add_argument(
        "--step", type=int, default=None, help="step (since averaging began) of the wanted EMA; default: the latest"
    )
    parser.add_argument(
        "-o",
        "--output",
        nargs="+",
        required=True,
        help="output file(s), one per --sigma-rel: .safetensors or .pt/.pth/.bin/.ckpt (other suffixes are refused; "
        "not in SNAPSHOT_DIR, which is read-only); an existing file is replaced atomically and keeps its "
        "permissions; a symbolic link is written through",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"write even a target the snapshots cannot express: a --step that is not a snapshot's step, or a fit "
        f"whose relative profile error is above {MAX_FIT_ERROR:g}",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="dtype of averaged tensors")
    parser.add_argument("--plot", metavar="PNG", help="also plot each target profile against its reconstruction")


def run(args: argparse.Namespace) -> int:
    return guarded("posthoc", lambda: _posthoc(args))


def _posthoc(args: argparse.Namespace) -> None:
    from ..posthoc import reconstruct

    result = reconstruct(
        args.directory, args.sigma_rel, args.output, step=args.step, dtype=DTYPES[args.dtype], force=args.force
    )
    used = sum(1 for snap in result.snapshots if snap.step <= result.step)
    for sigma_rel, fit_error, output in zip(result.sigma_rels, result.errors, args.output, strict=True):
        print(
            f"sigma_rel {sigma_rel:g} (gamma {sigma_rel_to_gamma(sigma_rel):.3f}) at step {result.step} "
            f"from {plural(used, 'snapshot')}: relative profile error {float(fit_error):.2e} -> {output}"
        )
    if args.plot:
        plot(result, args.plot)
        print(f"profile plot -> {args.plot}")


def plot(result: Reconstruction, path: str | Path) -> None:
    """Plot each target profile and the profile of the combination that approximates it."""
    import numpy as np

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        raise RuntimeError("--plot needs matplotlib: pip install 'polyak[plot]'") from error
    tau = np.linspace(0.0, result.step, 2001)[1:]
    steps = np.array([result.snapshots[i].step for i, _ in result.rows], dtype=np.float64)
    gammas = np.array([sigma_rel_to_gamma(result.snapshots[i].sigma_rels[k]) for i, k in result.rows])
    profiles = (gammas[:, None] + 1) * (tau[None, :] / steps[:, None]) ** gammas[:, None] / steps[:, None]
    profiles[tau[None, :] > steps[:, None]] = 0.0
    figure, axes = plt.subplots(figsize=(7, 4))
    for r, sigma_rel in enumerate(result.sigma_rels):
        g = sigma_rel_to_gamma(sigma_rel)
        target = (g + 1) * (tau / result.step) ** g / result.step
        (line,) = axes.plot(tau, target, label=f"target sigma_rel {sigma_rel:g}")
        fitted = result.coefficients[:, r] @ profiles
        axes.plot(tau, fitted, "--", color=line.get_color(), label=f"reconstructed (error {result.errors[r]:.1e})")
    axes.set_xlabel("optimizer step (since averaging began)")
    axes.set_ylabel("weight per step")
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
