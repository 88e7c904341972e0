"""The benchmark's way of combining timing rounds (tools/bench.py)."""

import pytest

from tools.bench import RoundTiming, auto_against_uniform, round_order, summarise_rounds


def test_a_ratio_is_taken_within_its_round_then_the_median_over_rounds():
    # three rounds of (original, conversion); the middle one ran in a slow phase that
    # slowed the conversion more than the original
    rounds = [
        RoundTiming(median_ms=[10.0, 25.0], best_block_ms=[9.5, 24.0]),
        RoundTiming(median_ms=[14.0, 42.0], best_block_ms=[13.0, 40.0]),
        RoundTiming(median_ms=[10.4, 26.0], best_block_ms=[10.0, 24.5]),
    ]
    summary = summarise_rounds(rounds)
    assert summary.ratios[0] == 1.0
    # in-round ratios 2.5, 3.0 and 2.5: the slow round counts once
    assert summary.ratios[1] == pytest.approx(2.5)
    assert summary.median_ms == [10.4, 26.0]
    # the fastest block of each model, whichever round it came from
    assert summary.best_block_ms == [9.5, 24.0]
    assert summary.best_block_ratios == pytest.approx([1.0, 24.0 / 9.5])


def test_no_rounds_is_an_error():
    with pytest.raises(ValueError, match="no rounds"):
        summarise_rounds([])


def test_auto_is_compared_with_the_faster_uniform_mode_of_each_round():
    # models: original, global, local, auto; local is the faster uniform mode in the
    # first round, global in the second
    rounds = [
        RoundTiming(median_ms=[10.0, 30.0, 20.0, 19.0], best_block_ms=[0.0] * 4),
        RoundTiming(median_ms=[10.0, 18.0, 20.0, 18.9], best_block_ms=[0.0] * 4),
    ]
    paired = auto_against_uniform(rounds, auto=3, uniform=[1, 2])
    assert paired == pytest.approx([19.0 / 20.0, 18.9 / 18.0])


def test_every_other_round_times_the_models_in_reverse_order():
    assert round_order(4, 0) == [0, 1, 2, 3]
    assert round_order(4, 1) == [3, 2, 1, 0]
    assert round_order(4, 2) == [0, 1, 2, 3]
