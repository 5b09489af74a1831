"""polyak: averaged copies of a model's weights (EMA, SWA, ...) for PyTorch.

The public API is re-exported here; see the README for a tour. Each name is imported, with torch, when it is
first used, so that the ``polyak`` command answers ``--help`` and usage errors without importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # what __getattr__ gives, for type checkers and the API reference
    from . import distributed, durations, migrate, rules, swa_utils, watch
    from .bema import BEMA
    from .bn import update_bn
    from .checkpoints import average_checkpoints, export_weights
    from .ema import EMA, SWA, Averager, load_state
    from .flat import flatten_parameters
    from .io import CheckpointError, save_state_dict
    from .multi import MultiEMA
    from .options import Options
    from .posthoc import PostHocEMA
    from .pretrained import export_pretrained, save_pretrained
    from .shadow import Shadow
    from .swap import exporting_average, is_swapped_state_dict

# Public name -> the module that defines it (a module under its own name is the module itself). A new public
# name goes here, in the imports above and in __all__; tests/test_cli.py checks that the three agree.
_SOURCES = {
    "BEMA": "bema",
    "EMA": "ema",
    "SWA": "ema",
    "Averager": "ema",
    "CheckpointError": "io",
    "MultiEMA": "multi",
    "Options": "options",
    "PostHocEMA": "posthoc",
    "Shadow": "shadow",
    "average_checkpoints": "checkpoints",
    "distributed": "distributed",
    "durations": "durations",
    "export_pretrained": "pretrained",
    "export_weights": "checkpoints",
    "exporting_average": "swap",
    "flatten_parameters": "flat",
    "is_swapped_state_dict": "swap",
    "load_state": "ema",
    "migrate": "migrate",
    "rules": "rules",
    "save_pretrained": "pretrained",
    "save_state_dict": "io",
    "swa_utils": "swa_utils",
    "update_bn": "bn",
    "watch": "watch",
}

__all__ = [
    "BEMA",
    "EMA",
    "SWA",
    "Averager",
    "CheckpointError",
    "MultiEMA",
    "Options",
    "PostHocEMA",
    "Shadow",
    "__version__",
    "average_checkpoints",
    "distributed",
    "durations",
    "export_pretrained",
    "export_weights",
    "exporting_average",
    "flatten_parameters",
    "is_swapped_state_dict",
    "load_state",
    "migrate",
    "rules",
    "save_pretrained",
    "save_state_dict",
    "swa_utils",
    "update_bn",
    "watch",
]

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """A public name or a submodule (``polyak.shadow``), imported on first use (torch with it)."""
    source = _SOURCES.get(name, name)
    try:
        module = importlib.import_module(f".{source}", __name__)
    except ModuleNotFoundError as error:
        if error.name != f"{__name__}.{source}":  # a submodule that needs a missing package: say which
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    value = module if source == name else getattr(module, name)
    globals()[name] = value  # later uses find it without this call
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
