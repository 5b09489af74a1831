"""polyak: averaged copies of a model's weights (EMA, SWA, ...) for PyTorch.

The public API is re-exported here; see the README for a tour.
"""

from . import rules, swa_utils
from .bn import update_bn
from .ema import EMA, SWA, Averager
from .shadow import Shadow

__all__ = ["EMA", "SWA", "Averager", "Shadow", "__version__", "rules", "swa_utils", "update_bn"]

__version__ = "0.1.0"
