"""Come from another EMA library: continue its average, its step and its schedule in a polyak averager.

:func:`load` reads what ema-pytorch, torch_ema, diffusers' ``EMAModel``, timm's ``ModelEmaV2``/``ModelEmaV3``,
torch's ``AveragedModel`` and Lightning's ``WeightAveraging`` callbacks save (or the live objects), and sets the
averager's average and step; :func:`options` gives the :class:`polyak.EMA` settings that continue the peer's
schedule, so that the numbers go on as they would have under the peer. The guides in ``docs/migrating/`` show
each peer's loop beside polyak's.
"""

from .loading import load, options
from .peers import SOURCES

__all__ = ["SOURCES", "load", "options"]
