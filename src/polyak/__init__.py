"""polyak: averaged copies of a model's weights (EMA, SWA, ...) for PyTorch.

The public API is re-exported here; see the README for a tour.
"""

from . import distributed, rules
from .ema import EMA, SWA, Averager
from .shadow import Shadow

__all__ = ["EMA", "SWA", "Averager", "Shadow", "__version__", "distributed", "rules"]

__version__ = "0.1.0"
