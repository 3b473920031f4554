"""Money and largest-remainder allocation: parts sum to the total, each within one unit."""

from __future__ import annotations

from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.money import AMOUNT_MINOR_MAX, Money, MoneyError, allocate

amounts = st.integers(min_value=-(10**15), max_value=10**15)
weight_lists = st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=8).filter(lambda w: sum(w) > 0)


@settings(max_examples=2000)
@given(total=amounts, weights=weight_lists)
def test_parts_sum_to_total_and_stay_within_one_unit_of_exact_share(total: int, weights: list[int]) -> None:
    parts = allocate(total, weights)
    assert sum(parts) == total
    assert len(parts) == len(weights)
    weight_sum = sum(weights)
    for part, weight in zip(parts, weights):
        exact = Fraction(total * weight, weight_sum)
        assert abs(part - exact) < 1
        if weight == 0:
            assert part == 0


@given(weights=weight_lists)
def test_zero_total_allocates_zero_everywhere(weights: list[int]) -> None:
    assert allocate(0, weights) == [0] * len(weights)


@given(total=amounts)
def test_single_party_takes_everything(total: int) -> None:
    assert allocate(total, [7]) == [total]


@given(total=st.integers(min_value=0, max_value=10**12), weights=weight_lists)
def test_refund_splits_as_the_mirror_of_the_charge(total: int, weights: list[int]) -> None:
    assert allocate(-total, weights) == [-p for p in allocate(total, weights)]


def test_known_split_gives_leftover_units_to_largest_remainders() -> None:
    # 100 split 1:1:1 -> exact 33.33 each; one leftover unit goes to the first (ties by order).
    assert allocate(100, [1, 1, 1]) == [34, 33, 33]
    # 7000 bps / 2000 bps / 1000 bps of NT$35 (3500 minor): exact, no leftovers.
    assert allocate(3500, [7000, 2000, 1000]) == [2450, 700, 350]
    # 1 unit over 3 parties of weights 1, 2, 3: the largest remainder (3/6) wins.
    assert allocate(1, [1, 2, 3]) == [0, 0, 1]


@pytest.mark.parametrize("bad", [1.5, 2.0, True, "100", None])
def test_floats_and_non_integers_are_refused(bad: object) -> None:
    with pytest.raises(MoneyError) as info:
        allocate(bad, [1, 1])  # type: ignore[arg-type]
    assert info.value.reason == "INVALID_AMOUNT"
    with pytest.raises(MoneyError):
        Money(bad, "TWD")  # type: ignore[arg-type]


@pytest.mark.parametrize("weights", [[], [0, 0], [1, -1], [1.0, 2]])
def test_bad_weights_are_refused(weights: list) -> None:
    with pytest.raises(MoneyError) as info:
        allocate(100, weights)
    assert info.value.reason == "INVALID_SPLIT"


@pytest.mark.parametrize("currency", ["twd", "TW", "TWDX", "", 840])
def test_bad_currency_is_refused(currency: object) -> None:
    with pytest.raises(MoneyError) as info:
        Money(100, currency)  # type: ignore[arg-type]
    assert info.value.reason == "INVALID_CURRENCY"


def test_amount_outside_int64_is_refused() -> None:
    with pytest.raises(MoneyError):
        Money(AMOUNT_MINOR_MAX + 1, "TWD")


def test_arithmetic_keeps_currency_and_refuses_mixing() -> None:
    assert Money(150, "TWD") + Money(50, "TWD") == Money(200, "TWD")
    assert Money(150, "TWD") - Money(200, "TWD") == Money(-50, "TWD")
    with pytest.raises(MoneyError):
        Money(1, "TWD") + Money(1, "USD")
    assert Money(1000, "TWD").allocate([1, 3]) == [Money(250, "TWD"), Money(750, "TWD")]
