"""Duration parsing: unit names in any case (also where their first letter is a multiplier: "1 Batch"), and
every multiplier (k/K 10**3, M 10**6, B and G 10**9, T 10**12).

Expected values are the SI / Composer meanings written out by hand, not polyak's output.
"""

from __future__ import annotations

import pytest
from torch import nn

import polyak
from polyak.durations import Duration, to_steps


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [
        ("2000BA", 2000.0, "steps"),
        ("3 Steps", 3.0, "steps"),
        ("1EP", 1.0, "epochs"),
        ("10M Samples", 10_000_000.0, "samples"),
        ("5B TOKENS", 5_000_000_000.0, "tokens"),
        ("2Tok", 2.0, "tokens"),  # T starts the unit's name here: not a multiplier
        ("1 Batch", 1.0, "steps"),  # nor B here
        ("2 Tokens", 2.0, "tokens"),
        ("3 BATCHES", 3.0, "steps"),
        ("1B Tokens", 1_000_000_000.0, "tokens"),  # a multiplier where the rest is a unit name
    ],
)
def test_unit_names_in_any_case(text, value, unit):
    assert Duration.parse(text) == Duration(value, unit)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3k steps", 3_000.0),
        ("3K steps", 3_000.0),
        ("7M ba", 7_000_000.0),
        ("2B tok", 2_000_000_000.0),
        ("2G tok", 2_000_000_000.0),  # G(iga) is B(illion)
        ("1.5T tokens", 1_500_000_000_000.0),
        ("4T tok", 4_000_000_000_000.0),
    ],
)
def test_every_multiplier(text, value):
    assert Duration.parse(text).value == value


def test_multiplied_durations_convert_to_steps():
    assert to_steps("1G tokens", tokens_per_step=2**20) == 1e9 / 2**20
    assert to_steps("2T tok", tokens_per_step=4e6) == 2e12 / 4e6
    assert to_steps("64K Samples", batch_size=256) == 250.0
    ema = polyak.EMA(nn.Linear(2, 2), half_life="1G tokens", tokens_per_step=1e6)
    assert ema.rule.decay == pytest.approx(0.5 ** (1 / 1000), rel=1e-15)


@pytest.mark.parametrize("text", ["3X steps", "3 kk steps", "3m steps", "1g tok", "1t tok"])
def test_unknown_multipliers_are_refused(text):
    """Lower-case m, g and t are not multipliers (m would be milli): refused, not read as another unit."""
    with pytest.raises(ValueError, match="duration"):
        Duration.parse(text)
