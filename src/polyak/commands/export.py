"""``polyak export``: the averaged weights of a checkpoint as a model-ready state dict, written atomically."""

from __future__ import annotations

import argparse

from . import DTYPES, OUTPUT_HELP, guarded, output_format, plural, say, size

EXAMPLES = """\
examples:
  polyak export last.pt -o model_ema.safetensors          # finds the EMA weights in a training checkpoint
  polyak export swa.pt -o model.pt                         # an AveragedModel state: module. and n_averaged dropped
  polyak export lightning.ckpt --key state_dict --strip-prefix model. -o model.safetensors
  polyak export ema_state.pt --dtype bfloat16 -o model_bf16.safetensors
  polyak export last.pt --like base-model/ -o model-ema/   # a from_pretrained folder (or a PEFT adapter folder)
  polyak export last.pt --like unet/ -o unet-ema/         # a diffusers model folder the same way

Reads a polyak EMA/SWA state (its averaged tensors), a torch.optim.swa_utils.AveragedModel state, or a
plain state dict, alone or inside a training checkpoint; removes wrapper prefixes (module., _orig_mod.);
writes a state dict that model.load_state_dict() accepts. With --like, -o is a folder laid out like the
reference folder (the one save_pretrained wrote for this model or adapter): the averaged weights under its
tensor names, beside copies of its config files, loadable with from_pretrained. The files are added to -o:
its other files stay, and a file of the same name is refused unless --overwrite. Inputs are read-only: an
output that is, is inside or holds the checkpoint or the --like folder is refused, and so is the current
directory as the -o folder.
"""


def configure(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXAMPLES
    parser.add_argument("checkpoint", metavar="CKPT", help="a checkpoint file (.pt/.pth/.bin/.ckpt/.safetensors)")
    parser.add_argument("-o", "--output", required=True, help=OUTPUT_HELP)
    parser.add_argument("--key", help="state dict inside a training checkpoint (default: the averaged weights)")
    parser.add_argument("--strip-prefix", metavar="PREFIX", help="remove this prefix from names, e.g. model.")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast floating-point tensors (default: keep)")
    parser.add_argument("--format", choices=("safetensors", "pt"), help="output format (default: from -o's suffix)")
    parser.add_argument(
        "--like", metavar="DIR", help="write -o as a Hugging Face model (or PEFT adapter) folder laid out like DIR"
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="with --like: replace files of the same names that the -o folder already holds (its other files stay)",
    )
    parser.add_argument("-q", "--quiet", action="store_true", help="no report")


def run(args: argparse.Namespace) -> int:
    return guarded("export", lambda: _export(args))


def _export(args: argparse.Namespace) -> None:
    from ..checkpoints import export_weights
    from ..io import CheckpointError, check_output, save_state_dict

    if args.like is not None:
        _export_folder(args)
        return
    if args.overwrite:
        raise CheckpointError("--overwrite applies with --like only: a file output (-o FILE) is replaced atomically")
    # an unknown suffix or a folder is refused before any reading
    fmt = output_format(args.output, args.format, "model.safetensors", ", or --like DIR for a from_pretrained folder")
    check_output(args.output, [("the checkpoint being exported", args.checkpoint)])  # inputs are read-only
    exported = export_weights(
        args.checkpoint,
        key=args.key,
        strip_prefix=args.strip_prefix,
        dtype=DTYPES[args.dtype] if args.dtype else None,
    )
    source = exported.source
    if not args.quiet:
        say(f"{args.checkpoint}: {source.note or 'using ' + repr(source.key or 'the whole file')}")
    save_state_dict(exported, args.output, format=fmt, progress=not args.quiet)
    if not args.quiet:
        total = size(sum(s.nbytes for s in exported.specs.values()))
        say(f"wrote {args.output} ({fmt}, {plural(len(exported), 'tensor')}, {total})")


def _export_folder(args: argparse.Namespace) -> None:
    from ..io import CheckpointError
    from ..pretrained import export_pretrained

    if args.format is not None:
        raise CheckpointError("--format does not apply with --like: the folder is written as its reference's")
    folder, left_out = export_pretrained(
        args.checkpoint,
        args.like,
        args.output,
        key=args.key,
        strip_prefix=args.strip_prefix,
        dtype=DTYPES[args.dtype] if args.dtype else None,
        overwrite=args.overwrite,
    )
    if not args.quiet:
        say(f"wrote {folder}/ laid out like {args.like}")
        _report_left_out(left_out, args.like)


def _report_left_out(left_out: list[str], like: str) -> None:
    """Say which averaged tensors the folder does not hold, as a note: a tied output head is expected there."""
    # save_pretrained writes a tied weight once: an lm_head.weight that the reference lacks is tied to the embedding
    tied = [name for name in left_out if name == "lm_head.weight" or name.endswith(".lm_head.weight")]
    for name in tied:
        say(f"not written, as in {like}: {name!r}, tied to the input embedding; from_pretrained re-ties it on load")
    others = [name for name in left_out if name not in tied]
    if others:
        more = f" (and {len(others) - 1} more)" if len(others) > 1 else ""
        say(
            f"left out {plural(len(others), 'averaged tensor')} that {like} does not hold, so from_pretrained would "
            f"not load {'it' if len(others) == 1 else 'them'}: {others[0]!r}{more}"
        )
