"""The ``polyak`` command answers help and usage errors without importing torch, and the lazy package root
gives every public name from the module that defines it."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import torch

import polyak
from polyak.cli import COMMANDS

ROOT = Path(polyak.__file__).parent


def test_help_and_usage_errors_import_no_torch():
    """Structural, not timed: torch's import (seconds) is what made every call slow."""
    calls = [["--help"], ["--version"], *([name, "--help"] for name in COMMANDS), ["average"], ["nosuch"], []]
    code = (
        "import sys\n"
        "from polyak.cli import main\n"
        f"for argv in {calls!r}:\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print('imported:', sorted(m for m in ('torch', 'numpy', 'matplotlib') if m in sys.modules))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == "imported: []", done.stdout[-2000:]
    assert "usage: polyak average" in done.stderr and "invalid choice: 'nosuch'" in done.stderr


def test_import_polyak_alone_imports_no_torch_and_submodules_load_on_use():
    code = (
        "import sys, polyak\n"
        "print('torch' in sys.modules, polyak.__version__)\n"
        "print(polyak.shadow.Shadow.__module__, polyak.io.CheckpointError.__name__)\n"  # as when the root was eager
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["False", polyak.__version__, "polyak.shadow", "CheckpointError"]


def _type_checking_imports() -> dict[str, str]:
    """name -> module, from the ``if TYPE_CHECKING:`` block of polyak/__init__.py."""
    tree = ast.parse((ROOT / "__init__.py").read_text())
    block = next(node for node in tree.body if isinstance(node, ast.If) and ast.unparse(node.test) == "TYPE_CHECKING")
    found = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names:
            found[alias.asname or alias.name] = node.module or alias.name
    return found


def test_the_lazy_root_the_typed_imports_and_all_agree():
    sources = polyak._SOURCES
    assert set(polyak.__all__) == {*sources, "__version__"}
    assert _type_checking_imports() == sources
    for name, source in sources.items():
        module = importlib.import_module(f"polyak.{source}")
        expected = module if source == name else getattr(module, name)
        assert getattr(polyak, name) is expected, name
    assert set(polyak.__all__) <= set(dir(polyak))


def test_an_unknown_name_is_an_attribute_error():
    try:
        polyak.no_such_name  # noqa: B018
    except AttributeError as error:
        assert "no_such_name" in str(error)
    else:
        raise AssertionError("no AttributeError")


def test_what_help_writes_out_matches_the_library():
    from polyak.commands import DTYPES
    from polyak.commands import posthoc as command
    from polyak.posthoc import MAX_FIT_ERROR

    assert command.MAX_FIT_ERROR == MAX_FIT_ERROR
    assert {name: DTYPES[name] for name in DTYPES} == {
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
        "float32": torch.float32,
        "float64": torch.float64,
    }
