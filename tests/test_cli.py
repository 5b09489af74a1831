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


def _run_folder(path: Path) -> Path:
    """Two small checkpoints, ckpt_100.pt and ckpt_200.pt, in a new folder ``path``."""
    path.mkdir()
    for step in (100, 200):
        torch.save({"w": torch.full((3,), float(step))}, path / f"ckpt_{step}.pt")
    return path


def test_a_folder_given_as_a_checkpoint_points_to_last(tmp_path, capsys):
    from polyak.cli import main

    run = _run_folder(tmp_path / "run")
    assert main(["average", str(run), "-o", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"give --last N {run}" in err, err
    assert "converted" not in err and not (tmp_path / "x.pt").exists()


def test_one_checkpoint_is_said_to_be_converted_only_once_it_has_been_read(tmp_path, capsys):
    from polyak.cli import main

    run = _run_folder(tmp_path / "run")
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((run / "ckpt_100.pt").read_bytes()[:-40])
    assert main(["average", str(damaged), "-o", str(tmp_path / "x.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "converted" not in err, err
    assert main(["average", str(run / "ckpt_100.pt"), "-o", str(tmp_path / "x.pt")]) == 0
    assert "converted (nothing to average)" in capsys.readouterr().err


def test_an_existing_folder_as_output_is_called_a_folder(tmp_path, capsys):
    from polyak.cli import main

    run = _run_folder(tmp_path / "run")
    first, second = str(run / "ckpt_100.pt"), str(run / "ckpt_200.pt")
    for argv, example in (
        (["average", first, second, "-o", str(run)], "averaged.safetensors"),
        (["average", first, second, "-o", str(run), "--format", "pt"], "averaged.safetensors"),
        (["export", first, "-o", str(run)], "model.safetensors"),
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"-o {run}: is a folder" in err and str(run / example) in err, err
        assert "suffix" not in err
    assert sorted(p.name for p in run.iterdir()) == ["ckpt_100.pt", "ckpt_200.pt"]
