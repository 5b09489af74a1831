"""``polyak average``: the (weighted, or EMA) average of checkpoint files, written atomically."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from . import DTYPES, OUTPUT_HELP, guarded, output_format, plural, say, size

EXAMPLES = """\
examples:
  polyak average run/ckpt_8000.pt run/ckpt_9000.pt run/ckpt_10000.pt -o averaged.safetensors
  polyak average --last 5 run/ -o last5.safetensors              # newest 5 by step number in the name
  polyak average --last 3 'out/checkpoint-*/model.safetensors' -o avg.safetensors
  polyak average --last 3 'out/checkpoint-*/model.safetensors.index.json' -o avg.safetensors   # sharded
  polyak average a.pt b.pt --weights 1 3 -o soup.pt              # 0.25 a + 0.75 b, written for torch.load
  polyak average --last 10 run/ --ema 0.9 --key model -o ema.safetensors

Floating-point tensors are averaged in float32 (float64 for float64 inputs) and stored in the inputs'
dtype unless --dtype is given; integer and bool tensors are copied from the last (newest) file. Weights
are normalised to sum to 1. --ema D weighs file i of N (oldest first) by (1-D)*D^(N-1-i), the first by
D^(N-1): an EMA started from the first file. Memory: about one output tensor (one output model for .pt).
A single input is allowed (it converts: --dtype, --format) and says so. Every input is checked before
anything is averaged: zip CRCs and declared sizes of PyTorch files, polyak's checksums in safetensors files it
wrote; a damaged, truncated or non-regular file (a pipe, a device) is refused with one line and exit code 2.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument(
        "checkpoints", nargs="*", metavar="CKPT", help="checkpoint files (or a sharded one's .index.json), oldest first"
    )
    parser.add_argument("-o", "--output", required=True, help=OUTPUT_HELP)
    parser.add_argument(
        "--last", nargs=2, metavar=("N", "DIR"), help="the newest N checkpoints in folder DIR (or a quoted glob)"
    )
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--weights", nargs="+", type=float, metavar="W", help="one weight per file (normalised)")
    how.add_argument("--ema", type=float, metavar="DECAY", help="EMA over the files in order, decay per file")
    parser.add_argument("--key", help="state dict inside a training checkpoint, e.g. model, state_dict, ema")
    parser.add_argument(
        "--strict",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="require the same tensors in every file (default); --no-strict averages the common ones",
    )
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="dtype of the averaged tensors (default: as input)")
    parser.add_argument("--format", choices=("safetensors", "pt"), help="output format (default: from -o's suffix)")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar or report")


def run(args: argparse.Namespace) -> int:
    return guarded("average", lambda: _average(args))


def _average(args: argparse.Namespace) -> None:
    import torch

    from ..checkpoints import average_checkpoints, newest_checkpoints
    from ..io import CheckpointError, check_output, save_state_dict

    report = (lambda _: None) if args.quiet else say
    paths = list(args.checkpoints)
    folders = [path for path in paths if Path(path).is_dir()]
    if folders:
        raise CheckpointError(
            f"CKPT {folders[0]}: is a folder, not a checkpoint file; to average the newest N checkpoints in it, "
            f"give --last N {folders[0]} (e.g. --last 5 {folders[0]})"
        )
    if args.last:
        if paths:
            raise CheckpointError("give checkpoint files or --last N DIR, not both")
        try:
            count = int(args.last[0])
        except ValueError:
            raise CheckpointError(f"--last needs a number of checkpoints, got {args.last[0]!r}") from None
        paths, how = newest_checkpoints(args.last[1], count)
    if not paths:
        raise CheckpointError("no checkpoints given; pass files or --last N DIR")
    fmt = output_format(args.output, args.format, "averaged.safetensors")  # a folder: refused in those words
    check_output(args.output, [("a checkpoint being averaged", path) for path in paths])  # inputs are read-only
    _check_weights(args, len(paths))
    if args.last:
        report(f"newest {plural(count, 'checkpoint')} by {how}: " + ", ".join(str(p) for p in paths))
    started = time.perf_counter()
    torch.set_num_threads(1)  # pieces of 1 MiB are memory-bound; more threads only wait on each other
    average = average_checkpoints(
        paths,
        weights=args.weights,
        ema_decay=args.ema,
        key=args.key,
        strict=False,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    if args.strict and average.left_out:
        reason = next(iter(average.left_out.values()))
        more = f" (and {len(average.left_out) - 1} more)" if len(average.left_out) > 1 else ""
        raise CheckpointError(f"{reason}{more}; add --no-strict to average only the tensors every file has")
    if len(paths) == 1:
        report(f"only one checkpoint given: the output is {paths[0]} itself, converted (nothing to average)")
    notes: dict[str, list[str]] = {}
    for opened in average.inputs:
        if opened.note:
            notes.setdefault(opened.note, []).append(str(opened.path))
    for note, where in notes.items():
        report(f"{where[0] if len(where) == 1 else f'{len(where)} checkpoints'}: {note}")
    if average.left_out:
        shown = "; ".join(list(average.left_out.values())[:3])
        report(f"left out {plural(len(average.left_out), 'tensor')} not shared by every file: {shown}")
    if not average.specs:
        raise CheckpointError("no tensor is common to all the checkpoints; nothing to write")
    weights = ", ".join(f"{w:.4g}" for w in average.weights)
    report(f"averaging {plural(len(paths), 'checkpoint')} with weights {weights}")
    metadata = {"polyak": json.dumps({"average": [Path(p).name for p in paths], "weights": average.weights})}
    save_state_dict(average, args.output, format=fmt, metadata=metadata, progress=not args.quiet)
    read = sum(s.nbytes for f in average.inputs for n, s in f.specs.items() if n in average.specs)
    seconds = time.perf_counter() - started
    report(
        f"wrote {args.output} ({fmt}, {plural(len(average), 'tensor')}, "
        f"{size(sum(s.nbytes for s in average.specs.values()))}) from {size(read)} of inputs in {seconds:.1f} s"
    )


def _check_weights(args: argparse.Namespace, count: int) -> None:
    """Refuse bad --weights / --ema values, in the flags' own words, before any file is opened."""
    from ..checkpoints import average_weights
    from ..io import CheckpointError

    if args.ema is not None and not 0.0 <= args.ema < 1.0:
        raise CheckpointError(f"--ema must be a decay in [0, 1) per file, got {args.ema:g}; e.g. --ema 0.9")
    if args.weights is not None and len(args.weights) != count:
        raise CheckpointError(
            f"--weights got {len(args.weights)} values for {plural(count, 'checkpoint')}; give one weight per file"
        )
    try:
        average_weights(count, args.weights, args.ema)
    except CheckpointError as error:
        raise CheckpointError(f"--weights: {error}") from None
