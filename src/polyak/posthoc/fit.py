"""The least-squares fit of power-function EMA profiles (EDM2, arXiv:2312.02696, Algorithm 3).

Pure arithmetic on float64 numpy arrays: which linear combination of saved averages (each a profile
``p(tau) = (gamma + 1) tau**gamma / t**(gamma + 1)`` on ``[0, t]``) best approximates another profile, in L2.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..rules import sigma_rel_to_gamma

__all__ = ["MAX_FIT_ERROR", "solve_coefficients"]

MAX_FIT_ERROR = 0.1
"""The largest relative L2 error of a fitted profile that :func:`~polyak.posthoc.reconstruct` accepts without
``force``."""


def _inner(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """``<p_a, p_b>`` in L2 for all pairs (a down, b across): the integral over ``[0, min(t_a, t_b)]``.

    ``(g_a+1)(g_b+1) / (g_a+g_b+1) * (lo/hi)**g / hi`` where ``hi``, ``lo`` are the larger and smaller time and
    ``g`` the exponent of the profile ending at ``hi`` (arXiv:2312.02696, Algorithm 3).
    """
    ta, ga, tb, gb = t_a[:, None], g_a[:, None], t_b[None, :], g_b[None, :]
    hi, lo = np.maximum(ta, tb), np.minimum(ta, tb)
    g = np.where(ta <= tb, gb, ga)
    return (ga + 1) * (gb + 1) / (ga + gb + 1) * (lo / hi) ** g / hi


def solve_coefficients(
    steps: Sequence[float],
    sigma_rels: Sequence[float],
    target_step: float,
    target_sigma_rels: Sequence[float],
) -> tuple[np.ndarray, np.ndarray]:
    """Coefficients that combine saved power-function averages into averages of other widths.

    Args:
        steps: the step (since averaging began) of each saved average, > 0.
        sigma_rels: the relative width of each saved average (same length as ``steps``).
        target_step: the step of the wanted averages; only saved averages at or before it are used.
        target_sigma_rels: the wanted relative widths.

    Returns:
        ``(coefficients, errors)``: a float64 array with one row per saved average and one column per target
        (rows of unused averages are 0; each column sums to 1), and for each target the relative L2 error
        ``||p_target - sum_i x_i p_i|| / ||p_target||`` of the fitted profile.
    """
    t = np.asarray(steps, dtype=np.float64).reshape(-1)
    s = np.asarray(sigma_rels, dtype=np.float64).reshape(-1)
    targets = np.asarray(target_sigma_rels, dtype=np.float64).reshape(-1)
    if t.shape != s.shape:
        raise ValueError(f"steps and sigma_rels must have the same length, got {t.size} and {s.size}")
    if not (np.all(np.isfinite(t)) and np.all(t > 0)):
        raise ValueError(f"steps must be positive finite numbers of steps, got {t.tolist()}")
    if not (np.isfinite(target_step) and target_step > 0):
        raise ValueError(f"target_step must be a positive number of steps, got {target_step}")
    if targets.size == 0:
        raise ValueError("target_sigma_rels is empty; give at least one relative width, e.g. [0.1]")
    gammas = np.array([sigma_rel_to_gamma(x) for x in s])
    target_gammas = np.array([sigma_rel_to_gamma(x) for x in targets])
    used = t <= target_step
    if not used.any():
        raise ValueError(
            f"no saved average at or before target_step={target_step}; the earliest is at step {t.min():g}"
        )
    pairs = list(zip(t[used].tolist(), s[used].tolist(), strict=True))
    if len(set(pairs)) != len(pairs):
        duplicate = next(p for p in pairs if pairs.count(p) > 1)
        raise ValueError(f"the saved average (step, sigma_rel) = {duplicate} appears twice; pass each once")
    tu = t[used] / float(target_step)  # the fit depends only on step ratios; this keeps the numbers near 1
    gu = gammas[used]
    a = _inner(tu, gu, tu, gu)
    b = _inner(tu, gu, np.ones_like(target_gammas), target_gammas)
    x = np.linalg.solve(a, b)
    x /= x.sum(axis=0, keepdims=True)
    norm2 = (target_gammas + 1) ** 2 / (2 * target_gammas + 1)  # <p_r, p_r> at t = 1
    residual2 = norm2 - 2 * np.sum(x * b, axis=0) + np.sum(x * (a @ x), axis=0)
    errors = np.sqrt(np.maximum(residual2, 0.0) / norm2)
    coefficients = np.zeros((t.size, targets.size))
    coefficients[used] = x
    return coefficients, errors
