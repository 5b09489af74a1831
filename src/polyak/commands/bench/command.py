"""``polyak bench``'s options and run: every shape, every contender, then the table (or JSON) and the goals.

Reading the options imports no torch; the harness is imported when the benchmark runs.
"""

from __future__ import annotations

import argparse

from .shapes import SHAPES

__all__ = ["configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    """Options of ``polyak bench``."""
    parser.add_argument("--quick", action="store_true", help="small model shapes and few repeats (seconds)")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES), help="model shapes")
    parser.add_argument("--repeats", type=int, default=0, help="timed rounds per shape (default: fit the budget)")
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed rounds per shape (default 30)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--device", default="cpu", help="where the models live, e.g. cuda (default cpu)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a Markdown table")
    parser.add_argument(
        "--select",
        action="store_true",
        help="also time choosing the EMA width (posthoc.select) against the hand-written loop (about a minute)",
    )


def run(args: argparse.Namespace) -> int:
    """Benchmark every shape; print the table (or JSON)."""
    if args.threads < 1:
        raise SystemExit(f"--threads must be >= 1, got {args.threads}")
    import gc
    import json
    import platform

    import torch

    from . import sections
    from .goals import goal_lines
    from .harness import DECAY, averaged_elements, measure
    from .report import ShapeReport, as_json, markdown

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    chosen, skipped = sections.contenders()
    reports = []
    for name in args.shapes:
        shape = SHAPES[name]
        torch.manual_seed(0)
        model = shape.build(args.quick).to(device)
        repeats = args.repeats or (5 if args.quick else 0)
        tensors = len({id(t) for t in model.state_dict(keep_vars=True).values()})
        report = ShapeReport(name, device.type, tensors, averaged_elements(model), shape.scaled(args.quick))
        here = [c for c in chosen if not c.shapes or name in c.shapes]
        report.results = measure(model, here, repeats, args.budget)
        reports.append(report)
        del model
        gc.collect()
    machine = f"{platform.processor() or platform.machine()}, {args.threads} thread(s)"
    if device.type == "cuda":
        machine = torch.cuda.get_device_name(device)
    header = f"polyak bench on {device.type} ({machine}), torch {torch.__version__}, decay {DECAY}"
    if args.quick:
        header += " (--quick: small stand-ins for the large shapes, where per-call overhead dominates, and few rounds)"
    lines = goal_lines(reports, sections.goals())
    print((as_json if args.json else markdown)(reports, header, skipped, lines))
    if args.select:
        from .selection import measure as measure_selection
        from .selection import report as selection_report

        figures = measure_selection(threads=args.threads, rounds=1 if args.quick else 3)
        print(json.dumps(figures) if args.json else "\n" + selection_report(figures))
    return 0
