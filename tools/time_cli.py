"""Wall time of ``polyak`` calls that should answer at once (help, usage errors), each in a fresh process.

    PYTHONPATH=src python tools/time_cli.py [--runs 10]

Prints the median, min and max over ``--runs`` runs of ``python -m polyak ARGS`` per line of ``CALLS``.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

CALLS = (
    ["--help"],
    ["demo", "--help"],
    ["bench", "--help"],
    ["average", "--help"],
    ["export", "--help"],
    ["posthoc", "--help"],
    ["average"],  # usage error: -o is required
    ["demo", "--steps", "10"],  # usage error: too few steps
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10, help="runs per call (default 10)")
    runs = parser.parse_args().runs
    for args in CALLS:
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            subprocess.run([sys.executable, "-m", "polyak", *args], capture_output=True, check=False)
            times.append(time.perf_counter() - start)
        print(
            f"polyak {' '.join(args):22} median {1e3 * statistics.median(times):6.0f} ms"
            f" (min {1e3 * min(times):.0f}, max {1e3 * max(times):.0f})"
        )


if __name__ == "__main__":
    main()
