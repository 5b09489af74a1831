"""Where stochastic rounding's bits come from (kernels.RandomBits): each value's bits uniform over [0, 2**16)
across updates, and the values of one chunk rounding independently of each other, in host memory (a window into a
balanced table) and in the hashed form a GPU uses (run here on the CPU)."""

from __future__ import annotations

import pytest
import torch

from polyak.kernels import RandomBits

HALF = 1 << 15  # a value exactly halfway between two bfloat16 neighbours rounds up when its bits are >= HALF


def test_every_value_sees_every_16_bit_pattern_equally_often_over_the_offsets():
    bits = RandomBits(1000, (1, 1), torch.device("cpu"))
    assert bits.period == 1 << 16
    for value in (0, 1, 499, 999):  # offset uniform in [0, period): the value's bits over every offset
        window = bits.table[value : value + bits.period]
        assert torch.equal(torch.bincount(window, minlength=1 << 16), torch.full((1 << 16,), bits.period >> 16))


def test_a_chunk_reads_distinct_entries_and_the_period_covers_the_chunk():
    capacity = 300_000
    bits = RandomBits(capacity, (1, 1), torch.device("cpu"))
    assert bits.period >= capacity and bits.period % (1 << 16) == 0
    assert bits.table.numel() == capacity + bits.period and int(bits.table.max()) < 1 << 16


@pytest.mark.parametrize("hashed", [False, True])
def test_values_round_independently(hashed):
    """Over 3000 updates, whether two values round up is uncorrelated, within a chunk and across two chunks and two
    averages (a shared draw XOR-ed into fixed keys, as polyak once did, makes every pair's correlation +-1), and
    each value rounds up half the time."""
    n, updates = 1024, 3000
    bits = RandomBits(n, (2, 2), torch.device("cpu"), hashed=hashed)
    generator = torch.Generator().manual_seed(0)
    up = torch.empty(updates, 4 * n)
    for update in range(updates):
        bits.draw(generator)
        for part, (average, chunk) in enumerate(((0, 0), (0, 1), (1, 0), (1, 1))):
            up[update, part * n : (part + 1) * n] = (bits(n, average, chunk) >= HALF).float()
    rate = up.mean(0)
    assert float((rate - 0.5).abs().max()) < 5 * 0.5 / updates**0.5  # each value: 1/2, within 5 sigma
    picked = torch.randint(0, n, (100, 2), generator=torch.Generator().manual_seed(1)).tolist()
    within = [(i, j) for i, j in picked]
    across_chunks = [(i, i + n) for i, _ in picked]  # the same place in the next chunk
    across_averages = [(i, i + 2 * n) for i, _ in picked]  # the same place in the other average
    centred = up - rate
    for i, j in within + across_chunks + across_averages:
        if i != j:
            correlation = (centred[:, i] * centred[:, j]).mean() / (centred[:, i].std() * centred[:, j].std())
            assert abs(float(correlation)) < 5 / updates**0.5, (i, j)


def test_hashed_bits_are_uniform_in_the_mean():
    bits = RandomBits(256, (1, 1), torch.device("cpu"), hashed=True)
    generator = torch.Generator().manual_seed(2)
    total = torch.zeros(256, dtype=torch.float64)
    draws = 4000
    for _ in range(draws):
        bits.draw(generator)
        values = bits(256, 0, 0)
        assert int(values.min()) >= 0 and int(values.max()) < 1 << 16
        total += values.double()
    mean = total / draws  # uniform over [0, 2**16): mean 32767.5, standard deviation 18918
    assert float((mean - 32767.5).abs().max()) < 5 * 18918 / draws**0.5
