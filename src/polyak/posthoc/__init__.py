"""Power-function EMA with snapshots, and post-hoc reconstruction of other EMA lengths (EDM2).

Karras et al. 2024, "Analyzing and Improving the Training Dynamics of Diffusion Models", arXiv:2312.02696.
The average taken at step t with exponent gamma weighs the iterate at step tau by the profile
``p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`` on ``[0, t]``. :class:`PostHocEMA` keeps a few such
averages (different widths ``sigma_rel``) and saves them now and then; :func:`reconstruct` later combines the
saved averages linearly so that their combined profile approximates any other ``(sigma_rel, step)``, by least
squares in L2 (the paper's Algorithm 3), and writes the combined weights. Steps are optimizer steps since
averaging began (``step - start_step``), the time the profiles are defined in.

Modules: ``tracker`` (:class:`PostHocEMA`), ``snapshots`` (the files on disk), ``fit`` (the least-squares fit),
``synthesis`` (:func:`reconstruct`: combining snapshots into a new width) and ``selection`` (:func:`select`: the
width chosen on validation data; ``plot`` draws the choice).
"""

from .fit import MAX_FIT_ERROR, solve_coefficients
from .selection import Selection, select, select_average
from .snapshots import Snapshot, find_snapshots
from .synthesis import Reconstruction, reconstruct
from .tracker import PostHocEMA

__all__ = [
    "MAX_FIT_ERROR",
    "PostHocEMA",
    "Reconstruction",
    "Selection",
    "Snapshot",
    "find_snapshots",
    "reconstruct",
    "select",
    "select_average",
    "solve_coefficients",
]
