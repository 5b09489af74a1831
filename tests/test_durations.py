"""Durations in steps, epochs, samples and tokens; a half-life in samples survives a batch-size change on resume.

Unit names parse in any case (also where their first letter is a multiplier: "1 Batch"), with every multiplier
(k/K 10**3, M 10**6, B and G 10**9, T 10**12). Expected values are the SI / Composer meanings written out by hand.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import polyak
from polyak.durations import Duration, to_steps


@pytest.mark.parametrize(
    ("text", "value", "unit"),
    [
        ("2000ba", 2000.0, "steps"),
        ("1ep", 1.0, "epochs"),
        ("0.5 ep", 0.5, "epochs"),
        ("10M samples", 1e7, "samples"),
        ("10Msp", 1e7, "samples"),
        ("5B tokens", 5e9, "tokens"),
        ("5Btok", 5e9, "tokens"),
        ("3k steps", 3000.0, "steps"),
        ("1e3ba", 1000.0, "steps"),
    ],
)
def test_parse(text, value, unit):
    assert Duration.parse(text) == Duration(value, unit)


@pytest.mark.parametrize("text", ["", "ba", "10", "10 parsecs", "-1ep", "0ba", "1e999ba", "nan ba", "10MM samples"])
def test_parse_errors(text):
    with pytest.raises(ValueError, match="duration"):
        Duration.parse(text, name="half_life")


def test_conversions():
    assert to_steps("2000ba") == 2000.0
    assert to_steps("2ep", steps_per_epoch=391) == 782.0
    assert to_steps("10M samples", batch_size=256) == 1e7 / 256
    assert to_steps("5B tokens", tokens_per_step=2**20) == 5e9 / 2**20
    assert to_steps(123) == 123.0
    with pytest.raises(TypeError):
        to_steps(True)
    with pytest.raises(ValueError, match=r"^duration: expected a finite number > 0, got inf; give a number of"):
        to_steps(float("inf"))


@pytest.mark.parametrize(
    ("text", "needed"),
    [("1ep", "steps_per_epoch"), ("10M samples", "batch_size"), ("5B tokens", "tokens_per_step")],
)
def test_missing_rate_names_the_unit(text, needed):
    unit = Duration.parse(text).unit
    with pytest.raises(ValueError, match=rf"half_life is given in {unit}.*pass {needed}="):
        to_steps(text, name="half_life")
    with pytest.raises(ValueError, match=rf"^{needed}: expected a finite number > 0, got 0; give the .* to convert"):
        to_steps(text, name="half_life", **{needed: 0})


def test_ema_half_life_in_samples():
    model = nn.Linear(2, 2)
    ema = polyak.EMA(model, half_life="12.8k samples", batch_size=128)
    assert ema.rule.decay == pytest.approx(0.5 ** (1 / 100), rel=1e-15)
    assert polyak.EMA(model, half_life="1ep", steps_per_epoch=50).rule.decay == pytest.approx(0.5 ** (1 / 50))
    with pytest.raises(ValueError, match="batch_size converts a half_life"):
        polyak.EMA(model, decay=0.9, batch_size=32)
    with pytest.raises(ValueError, match="pass batch_size="):
        polyak.EMA(model, half_life="1M samples")


def test_horizon_in_samples_survives_a_batch_size_change_on_resume():
    """Trained at 64 samples per step (e.g. 2 ranks x 32), resumed at 256 (e.g. 4 ranks x 64): the weight that a
    sample seen 10k samples ago keeps is the same before and after, and the state loads."""
    torch.manual_seed(0)
    model = nn.Linear(4, 4).double()
    before = polyak.EMA(model, half_life="10k samples", batch_size=64)
    for _ in range(5):
        with torch.no_grad():
            model.weight.add_(1.0)
        before.update()
    after = polyak.EMA(model, half_life="10k samples", batch_size=256)
    after.load_state_dict(before.state_dict())  # accepted: the horizon is the same duration
    assert after.step == 5
    for ema, per_step in ((before, 64), (after, 256)):
        steps = 10_000 / per_step
        assert ema.rule.decay**steps == pytest.approx(0.5, rel=1e-12)
    other = polyak.EMA(model, half_life="20k samples", batch_size=256)
    with pytest.raises(ValueError, match="rule"):
        other.load_state_dict(before.state_dict())
    in_steps = polyak.EMA(model, half_life=10_000 / 64)
    with pytest.raises(ValueError, match="rule"):  # a horizon in steps is another setting than one in samples
        in_steps.load_state_dict(before.state_dict())


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
