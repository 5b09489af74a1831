"""polyak: averaged copies of a model's weights (EMA, SWA, ...) for PyTorch.

The public API is re-exported here; see the README for a tour.
"""

from . import distributed, durations, migrate, rules, swa_utils
from .bema import BEMA
from .bn import update_bn
from .checkpoints import average_checkpoints, export_weights
from .ema import EMA, SWA, Averager, load_state
from .flat import flatten_parameters
from .io import CheckpointError, save_state_dict
from .multi import MultiEMA
from .posthoc import PostHocEMA
from .pretrained import export_pretrained, save_pretrained
from .shadow import Shadow, is_swapped_state_dict

__all__ = [
    "BEMA",
    "EMA",
    "SWA",
    "Averager",
    "CheckpointError",
    "MultiEMA",
    "PostHocEMA",
    "Shadow",
    "__version__",
    "average_checkpoints",
    "distributed",
    "durations",
    "export_pretrained",
    "export_weights",
    "flatten_parameters",
    "is_swapped_state_dict",
    "load_state",
    "migrate",
    "rules",
    "save_pretrained",
    "save_state_dict",
    "swa_utils",
    "update_bn",
]

__version__ = "0.1.0"
