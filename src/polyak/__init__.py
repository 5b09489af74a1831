"""polyak: averaged copies of a model's weights (EMA, SWA, ...) for PyTorch.

The public API is re-exported here; see the README for a tour.
"""

from . import rules
from .ema import EMA, SWA, Averager
from .flat import flatten_parameters
from .shadow import Shadow

__all__ = ["EMA", "SWA", "Averager", "Shadow", "__version__", "flatten_parameters", "rules"]

__version__ = "0.1.0"
