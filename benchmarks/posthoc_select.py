"""Choosing the EMA width: ``polyak.posthoc.select`` against the hand-written loop, on the GPT-2-like bench model.

Builds :class:`~polyak.commands.bench.models.GPT2Shape` (smaller than GPT-2 small by default, so that the run takes
about a minute on a 2-core CPU), lets a :class:`~polyak.PostHocEMA` follow a random walk of its weights with
snapshots, then times, ``--rounds`` times in turn, for the same ``--widths`` candidate widths:

* the hand-written loop: for each width, ``reconstruct`` it to a file, load the file into a copy of the model,
  evaluate, delete the file (what users write today);
* ``select(directory, model, evaluate, sigma_rels=widths)``;
* the evaluations alone (``--widths`` calls of ``evaluate``), the part both must pay.

``evaluate`` is a GPT-2 forward pass (causal attention, GELU MLP, tied head) over ``--batch`` sequences of
``--context`` tokens, returning the loss. Prints each round, the medians, the ratio select / loop with the goal
(<= 0.6x), and the evaluation time beside it; ``polyak bench --select`` runs the same measurement with the
defaults (``polyak.commands.bench.selection``).

    PYTHONPATH=src python benchmarks/posthoc_select.py [--layers 4 --width 256 --vocab 8192 --snapshots 8]
"""

from __future__ import annotations

import argparse

import torch

from polyak.commands.bench.selection import measure, report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--snapshots", type=int, default=8)
    parser.add_argument("--widths", type=int, default=12)
    parser.add_argument("--batch", type=int, default=2, help="sequences per evaluation")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    figures = measure(
        layers=args.layers, width=args.width, vocab=args.vocab, context=args.context, snapshots=args.snapshots,
        widths=args.widths, batch=args.batch, rounds=args.rounds, threads=args.threads,
    )  # fmt: skip
    torch.set_num_threads(args.threads)
    print(report(figures))


if __name__ == "__main__":
    main()
