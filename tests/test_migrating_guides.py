"""Every migration guide's code runs against the real peer package and asserts polyak's numbers equal the peer's.

The guides (docs/migrating/*.md) include these scripts; each trains with the peer and with polyak side by side,
then converts the peer's checkpoint with polyak.migrate.load and continues both. A peer that is not installed
skips its guide with the package's name (`pip install "polyak[migrate]"`).
"""

from __future__ import annotations

import importlib.util
import runpy
import sys
import types
from pathlib import Path

import pytest

GUIDES = Path(__file__).resolve().parents[1] / "docs" / "migrating"
PEERS = {  # guide script -> the module it needs
    "torch_swa_utils_guide.py": "torch",
    "timm_guide.py": "timm",
    "ema_pytorch_guide.py": "ema_pytorch",
    "torch_ema_guide.py": "torch_ema",
    "diffusers_guide.py": "diffusers",
    "lightning_guide.py": "lightning",
    "stable_baselines3_guide.py": "stable_baselines3",
}


def test_every_guide_script_is_run_and_included() -> None:
    assert sorted(p.name for p in GUIDES.glob("*_guide.py")) == sorted(PEERS)
    pages = {p.stem.replace("-", "_") for p in GUIDES.glob("*.md")} - {"index"}
    assert pages == {name.removesuffix("_guide.py") for name in PEERS}
    for page in GUIDES.glob("*.md"):
        if page.stem != "index":
            script = page.stem.replace("-", "_") + "_guide.py"
            assert f'"docs/migrating/{script}:side_by_side"' in page.read_text(), page.name


def _timm_ema_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make ``timm.utils.model_ema`` importable from the installed timm without importing timm's package.

    timm's ``__init__`` imports torchvision, which has no build for the CPU torch the suite runs on; its EMA
    module needs only torch, so it is loaded from its file, the package entries standing in for the rest.
    """
    if importlib.util.find_spec("torchvision") is not None:
        return
    spec = importlib.util.find_spec("timm")
    assert spec is not None and spec.submodule_search_locations
    path = Path(next(iter(spec.submodule_search_locations))) / "utils" / "model_ema.py"
    for name in ("timm", "timm.utils"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    loader = importlib.util.spec_from_file_location("timm.utils.model_ema", path)
    assert loader is not None and loader.loader is not None
    module = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "timm.utils.model_ema", module)


@pytest.mark.parametrize("script", sorted(PEERS))
def test_guide_gives_the_peers_numbers(script: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    needed = PEERS[script]
    if importlib.util.find_spec(needed) is None:
        pytest.skip(f"{needed} is not installed (pip install 'polyak[migrate]'; timm: pip install --no-deps timm)")
    if needed == "timm":
        _timm_ema_only(monkeypatch)
    if needed == "lightning":
        pytest.importorskip("lightning.pytorch.callbacks", reason="lightning without EMAWeightAveraging (< 2.6)")
        from lightning.pytorch import callbacks

        if not hasattr(callbacks, "EMAWeightAveraging"):
            pytest.skip("lightning without EMAWeightAveraging (< 2.6)")
    monkeypatch.chdir(tmp_path)
    runpy.run_path(str(GUIDES / script), run_name="__main__")
