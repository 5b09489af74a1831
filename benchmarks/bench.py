"""Run the update benchmark: ``python benchmarks/bench.py [--quick] [--json]`` (same as ``polyak bench``).

The harness is the package ``polyak.commands.bench``, so that the installed ``polyak bench`` runs the same code.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from polyak.cli import main

if __name__ == "__main__":
    raise SystemExit(main(["bench", *sys.argv[1:]]))
