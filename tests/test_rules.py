"""Every rule against a float64 simulation of its defining formula, including update_every > 1."""

from __future__ import annotations

import math

import numpy as np
import pytest

from polyak import rules


def run_rule(rule: rules.Rule, signal: np.ndarray, every: int) -> tuple[list[int], list[float]]:
    """Average ``signal[t-1]`` (t = 1..T) with ``rule``, updating every ``every`` steps: update times, values."""
    value, last, times, values = 0.0, 0, [], []
    for t in range(every, len(signal) + 1, every):
        w = rule.weight(t, t - last)
        value += w * (signal[t - 1] - value)
        last = t
        times.append(t)
        values.append(value)
    return times, values


def held_per_step_ema(per_step_decay, signal: np.ndarray, every: int) -> list[float]:
    """Reference: a per-step EMA (decay beta_j, beta_1 = 0) of the signal sampled at each update and held
    over the steps it stands for; this is what 'an update every k steps keeps the horizon' means."""
    value, out = 0.0, []
    for t in range(every, len(signal) + 1, every):
        for j in range(t - every + 1, t + 1):
            beta = 0.0 if j == 1 else per_step_decay(j)
            value = beta * value + (1.0 - beta) * signal[t - 1]
        out.append(value)
    return out


SIGNAL = np.cumsum(np.random.default_rng(0).normal(size=600)) + np.linspace(0, 5, 600)


@pytest.mark.parametrize("every", [1, 3, 10])
@pytest.mark.parametrize(
    ("rule", "per_step"),
    [
        (rules.ConstantDecay(0.97), lambda j: 0.97),
        (rules.HalfLife(20), lambda j: 0.5 ** (1 / 20)),
        (rules.RationalWarmup(0.99), lambda j: min(0.99, j / (9.0 + j))),
        (rules.PowerWarmup(0.995, inv_gamma=1.0, power=0.75), lambda j: min(max(1 - j**-0.75, 0.0), 0.995)),
        (
            rules.PowerWarmup(0.99, inv_gamma=2.0, power=0.5, min_decay=0.3),
            lambda j: min(max(1 - (1 + (j - 1) / 2) ** -0.5, 0.3), 0.99),
        ),
    ],
)
def test_decay_rules_match_per_step_ema(rule, per_step, every):
    _, values = run_rule(rule, SIGNAL, every)
    np.testing.assert_allclose(values, held_per_step_ema(per_step, SIGNAL, every), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("every", [1, 4, 25])
def test_debiased_equals_zero_init_divided(every):
    d = 0.98
    _, values = run_rule(rules.DebiasedDecay(d), SIGNAL, every)
    v, expected = 0.0, []
    for t in range(every, len(SIGNAL) + 1, every):
        for _ in range(every):  # zero-initialised per-step EMA of the held sample
            v = d * v + (1 - d) * SIGNAL[t - 1]
        expected.append(v / (1 - d**t))
    np.testing.assert_allclose(values, expected, rtol=1e-12)


@pytest.mark.parametrize("every", [1, 7])
def test_equal_weights_is_the_running_mean(every):
    times, values = run_rule(rules.EqualWeights(), SIGNAL, every)
    expected = [np.mean(SIGNAL[every - 1 : t : every]) for t in times]
    np.testing.assert_allclose(values, expected, rtol=1e-12)


@pytest.mark.parametrize("sigma_rel", [0.05, 0.10, 0.2])
@pytest.mark.parametrize("every", [1, 10, 100])
def test_power_function_matches_the_integrated_profile(sigma_rel, every):
    """Weight on the sample at t_k is (t_k^(g+1) - t_{k-1}^(g+1)) / t^(g+1) (arXiv:2312.02696, sec. 3.2)."""
    rule = rules.PowerFunction(sigma_rel=sigma_rel)
    g = rule.gamma
    signal = np.sin(np.arange(1, 3001) / 300.0) + np.arange(1, 3001) / 1000.0
    times, values = run_rule(rule, signal, every)
    t_arr = np.array(times, dtype=np.float64)
    edges = np.concatenate([[0.0], t_arr])
    weights = (edges[1:] ** (g + 1) - edges[:-1] ** (g + 1)) / t_arr[-1] ** (g + 1)
    assert math.isclose(values[-1], float(weights @ signal[t_arr.astype(int) - 1]), rel_tol=1e-9)


def test_power_function_updating_every_100_keeps_the_profile():
    """ema-pytorch's KarrasEMA with update_every=100 puts its weight at ~0.07 T; the exact beta keeps ~0.888 T."""
    rule = rules.PowerFunction(sigma_rel=0.10)
    ramp = np.arange(1, 20001, dtype=np.float64)
    _, values = run_rule(rule, ramp, 100)
    mean_position = values[-1] / 20000
    ideal = (rule.gamma + 1) / (rule.gamma + 2)
    assert abs(mean_position - ideal) < 0.01, (mean_position, ideal)


def test_update_every_keeps_the_lag_on_a_ramp():
    """decay 0.999 lags a ramp by d/(1-d) = 999 steps; updating every 10 must not stretch it to ~9,974."""
    ramp = np.arange(1, 40001, dtype=np.float64)
    for every in (1, 10):
        times, values = run_rule(rules.ConstantDecay(0.999), ramp, every)
        lag = times[-1] - values[-1]
        d_k = 0.999**every  # lag of an EMA of a ramp sampled every k steps: k d^k / (1 - d^k) ~= 999 - (k-1)/2
        assert abs(lag - every * d_k / (1 - d_k)) < 1e-6, (every, lag)
        assert 990 < lag < 1000


def test_first_update_copies_and_weights_are_in_range():
    for rule in (
        rules.ConstantDecay(0.9),
        rules.DebiasedDecay(0.9),
        rules.EqualWeights(),
        rules.PowerFunction(gamma=7.0),
    ):
        assert rule.weight(5, 5) == 1.0
        for t in range(2, 50):
            for delta in (1, 2, t - 1):
                assert 0.0 <= rule.weight(t, delta) <= 1.0


def test_half_life_halves_the_weight():
    rule = rules.HalfLife(100)
    assert math.isclose(rule.decay**100, 0.5, rel_tol=1e-12)
    assert math.isclose(1 - rule.weight(500, 100), 0.5, rel_tol=1e-12)


@pytest.mark.parametrize(
    ("sigma_rel", "gamma"),
    [(0.01, 96.995), (0.05, 16.972), (0.07, 11.245), (0.10, 6.937), (0.15, 3.558), (0.25, 0.720)],
)
def test_sigma_rel_gamma_conversion(sigma_rel, gamma):
    """Values from the cubic of arXiv:2312.02696 eq. 126, as tabulated in research/algorithms.md."""
    assert abs(rules.sigma_rel_to_gamma(sigma_rel) - gamma) < 5e-4
    assert math.isclose(rules.gamma_to_sigma_rel(rules.sigma_rel_to_gamma(sigma_rel)), sigma_rel, rel_tol=1e-12)
    g = rules.sigma_rel_to_gamma(sigma_rel)
    s = sigma_rel**-2
    assert abs(g**3 + 7 * g**2 + (16 - s) * g + (12 - s)) < 1e-6 * s


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: rules.ConstantDecay(1.0), r"decay: expected a finite number in \[0, 1\)"),
        (lambda: rules.ConstantDecay(-0.1), r"decay: expected .*got -0.1"),
        (lambda: rules.HalfLife(0), "half_life"),
        (lambda: rules.PowerFunction(), "exactly one"),
        (lambda: rules.PowerFunction(sigma_rel=0.3), "sigma_rel: expected"),
        (lambda: rules.PowerWarmup(0.9, min_decay=0.95), "min_decay"),
        (lambda: rules.ConstantDecay(0.9).weight(3, 4), "delta <= step"),
    ],
)
def test_bad_arguments_are_named(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_config_round_trip():
    for rule in (
        rules.ConstantDecay(0.9),
        rules.HalfLife(123.0),
        rules.DebiasedDecay(0.99),
        rules.RationalWarmup(0.999),
        rules.PowerWarmup(0.9999, inv_gamma=2.0, power=0.75, min_decay=0.1),
        rules.EqualWeights(),
        rules.PowerFunction(sigma_rel=0.05),
    ):
        assert rules.rule_from_config(rule.config()) == rule


# Each rule's public per-step decay against its published formula, evaluated in float64 (numpy) independently.
DECAY_AT = [
    (rules.ConstantDecay(0.97), lambda j: 0.97),
    (rules.HalfLife(20), lambda j: 2.0 ** (-1 / 20)),
    (rules.DebiasedDecay(0.9), lambda j: 0.9 * (1 - 0.9 ** (j - 1)) / (1 - 0.9**j)),
    (rules.RationalWarmup(0.99), lambda j: min(0.99, j / (9.0 + j))),
    (
        rules.PowerWarmup(0.995, inv_gamma=2.0, power=0.75, min_decay=0.2),
        lambda j: min(max(1 - (1 + (j - 1) / 2) ** -0.75, 0.2), 0.995),
    ),
    (rules.EqualWeights(), lambda j: 1 - 1 / j),
    (rules.PowerFunction(gamma=6.94), lambda j: (1 - 1 / j) ** 7.94),
]


@pytest.mark.parametrize(
    ("rule", "formula"), DECAY_AT, ids=lambda x: type(x).__name__ if isinstance(x, rules.Rule) else ""
)
def test_decay_at_matches_the_formula_in_float64(rule, formula):
    for j in [*range(2, 60), 97, 1000, 12345]:
        expected = float(formula(np.float64(j)))
        assert math.isclose(rule.decay_at(j), expected, rel_tol=1e-13, abs_tol=1e-15), (j, rule.decay_at(j), expected)
        assert 0.0 <= rule.decay_at(j) < 1.0


@pytest.mark.parametrize(
    ("rule", "formula"), DECAY_AT, ids=lambda x: type(x).__name__ if isinstance(x, rules.Rule) else ""
)
def test_decay_over_is_the_product_of_decay_at(rule, formula):
    """The closed forms of ``decay_over`` agree with the product of the per-step formula."""
    for step, delta in [(2, 1), (5, 4), (10, 3), (50, 49), (400, 7)]:
        product = float(np.prod([formula(np.float64(j)) for j in range(step - delta + 1, step + 1)]))
        assert math.isclose(rule.decay_over(step, delta), product, rel_tol=1e-12, abs_tol=1e-15), (step, delta)
        assert math.isclose(rule.weight(step, delta), 1 - product, rel_tol=1e-12, abs_tol=1e-15)
