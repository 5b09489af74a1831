"""The API reference stays true: every cross-reference in a docstring names something that exists.

(`mkdocs build --strict`, run by CI, catches the other half: a documented argument the signature lost.)
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
import re
from types import ModuleType
from typing import Any

import pytest

import polyak

ROLE = re.compile(r":(?:class|func|meth|attr|mod|data|exc|obj):`~?([\w.]+)`")
OPTIONAL = {"lightning", "lightning.pytorch", "transformers", "matplotlib", "mnist1d", "tqdm"}


def _modules() -> list[ModuleType]:
    found = [polyak]
    for info in pkgutil.walk_packages(polyak.__path__, "polyak."):
        if info.name.endswith("__main__"):  # runs the command line when imported
            continue
        try:
            found.append(importlib.import_module(info.name))
        except ImportError as error:  # an integration whose framework is not installed
            assert error.name in OPTIONAL or "pip install" in str(error), error
    return found


def _documented(module: ModuleType) -> list[tuple[str, Any, Any]]:
    """(where, object, its class or None) for the module and everything defined in it."""
    out: list[tuple[str, Any, Any]] = [(module.__name__, module, None)]
    for name, obj in vars(module).items():
        if getattr(obj, "__module__", None) != module.__name__ or name.startswith("__"):
            continue
        out.append((f"{module.__name__}.{name}", obj, obj if inspect.isclass(obj) else None))
        if inspect.isclass(obj):
            for attr, member in vars(obj).items():
                target = getattr(member, "fget", None) or getattr(member, "__func__", None) or member
                if callable(target) and not attr.startswith("__"):
                    out.append((f"{module.__name__}.{name}.{attr}", target, obj))
    return out


def _resolves(target: str, module: ModuleType, owner: Any) -> bool:
    """Found as Sphinx would look: in the class, the module, the package, or as an absolute dotted path."""
    head, *rest = target.split(".")
    for scope in (owner, module, polyak):
        if scope is not None and hasattr(scope, head):
            return _has_path(getattr(scope, head), rest)
    parts = target.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            found = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        return _has_path(found, parts[cut:])
    return False


def _has_path(obj: Any, parts: list[str]) -> bool:
    for part in parts:
        if not hasattr(obj, part):
            return False
        obj = getattr(obj, part)
    return True


@pytest.mark.parametrize("module", _modules(), ids=lambda m: m.__name__)
def test_docstring_references_resolve(module: ModuleType) -> None:
    broken = [
        f"{where}: {match}"
        for where, obj, owner in _documented(module)
        for match in ROLE.findall(inspect.getdoc(obj) or "")
        if not _resolves(match, module, owner)
    ]
    assert not broken, "docstrings refer to names that do not exist: " + "; ".join(broken)
