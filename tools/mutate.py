"""Plant plausible bugs in polyak's core modules, one at a time, and list the ones no test catches.

Each mutation replaces one snippet of one module in a copy of ``src/`` (the worktree is never touched), then
runs the fast tests that cover that module against the copy; a failing run kills the mutant, a passing one is a
survivor: a missing test. Run from the repository root:

    python tools/mutate.py                 # all 155 (19 minutes on 2 cores shared with a CI run)
    python tools/mutate.py --only bema     # those whose name contains "bema"
    python tools/mutate.py --list          # the mutations, without running anything

The mutations live in tools/mutations/, one file per area, each with MUTATIONS, a list of (name, module,
snippet, replacement), and TESTS, the fast tests that cover each module. Add a mutation whenever a bug is fixed or
a new idea lands; one that cannot be killed because it changes nothing observable says why in a comment.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MUTATIONS_DIR = ROOT / "tools" / "mutations"


def gather() -> tuple[dict[str, list[str]], list[tuple[str, str, str, str]]]:
    """Every file in tools/mutations/: its TESTS (module -> fast tests, merged) and its MUTATIONS, in file order."""
    tests: dict[str, list[str]] = {}
    mutations: list[tuple[str, str, str, str]] = []
    for path in sorted(MUTATIONS_DIR.glob("*.py")):
        spec = importlib.util.spec_from_file_location(f"mutations_{path.stem}", path)
        assert spec is not None and spec.loader is not None
        file = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(file)
        for module, names in file.TESTS.items():
            tests.setdefault(module, [])
            tests[module] += [n for n in names if n not in tests[module]]
        mutations += file.MUTATIONS
    return tests, mutations


TESTS, MUTATIONS = gather()


def run_one(name: str, module: str, snippet: str, replacement: str, timeout: float) -> tuple[str, float, str]:
    """'killed', 'SURVIVED', 'timeout' or 'not found', the seconds the tests ran and the end of their output."""
    with tempfile.TemporaryDirectory(prefix="polyak-mutant-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src)
        path = src / "polyak" / module
        text = path.read_text()
        if snippet and text.count(snippet) != 1:
            return "not found", 0.0, ""
        path.write_text(text.replace(snippet, replacement))
        env = {**os.environ, "PYTHONPATH": str(src), "PYTHONDONTWRITEBYTECODE": "1"}
        command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-p", "no:warnings"]
        start = time.monotonic()
        try:
            done = subprocess.run(
                [*command, *TESTS[module]], cwd=ROOT, env=env, capture_output=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            return "timeout", time.monotonic() - start, ""
        tail = "\n".join(done.stdout.decode(errors="replace").splitlines()[-15:])
        return ("killed" if done.returncode else "SURVIVED"), time.monotonic() - start, tail


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="run the mutations whose name contains this text")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per mutant")
    args = parser.parse_args()
    chosen = [m for m in MUTATIONS if args.only in m[0]]
    if args.list:
        for name, module, *_ in chosen:
            print(f"{module:14s} {name}")
        return 0
    for module in sorted({m[1] for m in chosen}):  # a mutant only counts as killed if the tests pass without it
        outcome, _, tail = run_one("baseline", module, "", "", args.timeout)
        if outcome != "SURVIVED":
            print(f"the tests of {module} fail without any mutation ({outcome}); fix them first:\n{tail}")
            return 2
    survivors = []
    for name, module, snippet, replacement in chosen:
        outcome, seconds, _ = run_one(name, module, snippet, replacement, args.timeout)
        print(f"{outcome:10s} {seconds:6.1f} s  {name}", flush=True)
        if outcome != "killed":
            survivors.append((name, outcome))
    killed = len(chosen) - len(survivors)
    print(f"\n{killed} of {len(chosen)} mutants killed ({100 * killed / max(1, len(chosen)):.0f}%)")
    for name, outcome in survivors:
        print(f"  {outcome}: {name}")
    return 1 if survivors else 0


if __name__ == "__main__":
    sys.exit(main())
