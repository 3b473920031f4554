"""The fare split plan: split lines under the transit-fare contract in force, and the share moves
that carry each non-operator party's part out of (or, for a refund, back into) the operator's
revenue. Every expected figure is worked out by hand in the test."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from libs import errors, splits
from libs.contract_cache import ScopedVersion
from services.fare_gate.fare_split import FareSplitter, ShareMove

REVENUE = "system:operator-revenue:TWD"
CITY = "system:city-revenue:TWD"
PLATFORM = "system:platform-fees:TWD"
T0 = datetime(2026, 11, 30, 4, 30, tzinfo=timezone.utc)


def version(contract_id: str, number: int, effective_from: datetime, *terms: splits.Term,
            scope: str = "metro") -> ScopedVersion:
    return ScopedVersion(scope, splits.DatedVersion(splits.ContractTerms(contract_id, number, terms), effective_from))


V1 = version("fares-metro", 1, T0,
             splits.Term("TRANSIT_OPERATOR", "metro", remainder=True),
             splits.Term("CITY", "taipei", basis_points=1_000),
             splits.Term("PLATFORM", "citytap", basis_points=250, fixed_fee_minor=1))
V2 = version("fares-metro", 2, T0 + timedelta(hours=1),
             splits.Term("TRANSIT_OPERATOR", "metro", remainder=True),
             splits.Term("CITY", "taipei", basis_points=2_000))
DEFAULT = version("fares-default", 1, T0 - timedelta(days=1),
                  splits.Term("TRANSIT_OPERATOR", "metro", remainder=True),
                  splits.Term("CITY", "taipei", basis_points=5_000), scope="")


def splitter(*versions: ScopedVersion, operator_id: str = "metro") -> FareSplitter:
    return FareSplitter(lambda: list(versions), operator_id=operator_id, currency="TWD", revenue_account_id=REVENUE,
                        party_accounts={"CITY": CITY, "PLATFORM": PLATFORM})


def test_a_fare_is_split_and_each_other_party_gets_a_share_move() -> None:
    plan = splitter(V1, V2).plan("fare:t1", 3_500, T0 + timedelta(minutes=5))
    assert plan is not None
    # NT$35.00: the platform's fixed fee of 1 first, then 3,499 by basis points: operator
    # (the remainder, 87.5%) 3061.625, city 10% 349.9, platform 2.5% 87.475. The floors sum
    # to 3,497; the 2 units left go to the largest fractions, .9 (city) and .625 (operator).
    assert [(l.party, l.party_id, l.amount_minor) for l in plan.lines] == [
        ("TRANSIT_OPERATOR", "metro", 3_062), ("CITY", "taipei", 350), ("PLATFORM", "citytap", 88)]
    assert sum(l.amount_minor for l in plan.lines) == 3_500
    assert {(l.contract_id, l.contract_version) for l in plan.lines} == {("fares-metro", 1)}
    assert plan.moves == (ShareMove("fare:t1:share:1", REVENUE, CITY, 350),
                          ShareMove("fare:t1:share:2", REVENUE, PLATFORM, 88))


def test_versions_switch_exactly_at_their_effective_time() -> None:
    s = splitter(V1, V2)
    before = s.plan("a", 1_000, V2.dated.effective_from - timedelta(microseconds=1))
    at = s.plan("b", 1_000, V2.dated.effective_from)
    assert before is not None and at is not None
    assert {l.contract_version for l in before.lines} == {1}
    assert [(l.party, l.amount_minor, l.contract_version) for l in at.lines] == [
        ("TRANSIT_OPERATOR", 800, 2), ("CITY", 200, 2)]


def test_the_operators_own_contract_wins_over_the_default() -> None:
    plan = splitter(DEFAULT, V1).plan("x", 100, T0)
    assert plan is not None and {l.contract_id for l in plan.lines} == {"fares-metro"}
    earlier = splitter(DEFAULT, V1).plan("y", 100, T0 - timedelta(hours=1))  # before V1: the default
    assert earlier is not None and [(l.party, l.amount_minor) for l in earlier.lines] == [
        ("TRANSIT_OPERATOR", 50), ("CITY", 50)]


def test_a_refund_moves_the_shares_back_to_the_operator() -> None:
    plan = splitter(V2).plan("fare:r", 150, T0 + timedelta(hours=2), refund=True)
    assert plan is not None
    assert [(l.party, l.amount_minor) for l in plan.lines] == [("TRANSIT_OPERATOR", 120), ("CITY", 30)]
    assert plan.moves == (ShareMove("fare:r:share:1", CITY, REVENUE, 30),)


def test_no_contract_or_no_settlement_means_unsplit() -> None:
    assert splitter().plan("n", 100, T0) is None
    assert splitter(V1).plan("early", 100, T0 - timedelta(seconds=1)) is None  # nothing in force yet

    def down() -> list[ScopedVersion]:
        raise errors.Unavailable("UNAVAILABLE", "settlement is down")

    unreachable = FareSplitter(down, operator_id="metro", currency="TWD", revenue_account_id=REVENUE,
                               party_accounts={"CITY": CITY})
    assert unreachable.plan("u", 100, T0) is None
    never_fetched = FareSplitter(lambda: None, operator_id="metro", currency="TWD", revenue_account_id=REVENUE,
                                 party_accounts={"CITY": CITY})
    assert never_fetched.plan("v", 100, T0) is None and never_fetched.plan("w", 100, T0) is None
    assert never_fetched.unsplit == 2


def test_a_contract_naming_a_party_without_an_account_is_not_applied() -> None:
    odd = version("fares-odd", 1, T0, splits.Term("TRANSIT_OPERATOR", "metro", remainder=True),
                  splits.Term("MERCHANT", "shop-1", basis_points=100))
    assert splitter(odd).plan("m", 1_000, T0) is None
    other_operator = splitter(V1, operator_id="bus")  # V1 covers "metro", and there is no default
    assert other_operator.plan("b", 1_000, T0) is None


@given(amount=st.integers(min_value=1, max_value=10_000_000), refund=st.booleans())
def test_lines_always_sum_to_the_fare_and_moves_match_the_lines(amount: int, refund: bool) -> None:
    plan = splitter(V1).plan("p", amount, T0, refund=refund)
    assert plan is not None
    assert sum(l.amount_minor for l in plan.lines) == amount
    others = {l.party: l.amount_minor for l in plan.lines if l.party != "TRANSIT_OPERATOR" and l.amount_minor}
    assert {(m.credit_account_id if not refund else m.debit_account_id): m.amount_minor for m in plan.moves} == {
        {"CITY": CITY, "PLATFORM": PLATFORM}[p]: a for p, a in others.items()}
    assert all(l.amount_minor >= 0 for l in plan.lines)


@pytest.mark.parametrize("amount", [1, 2])
def test_tiny_fares_pay_the_fixed_fee_first(amount: int) -> None:
    plan = splitter(V1).plan("tiny", amount, T0)
    assert plan is not None
    platform = next(l for l in plan.lines if l.party == "PLATFORM")
    assert platform.amount_minor >= 1 and sum(l.amount_minor for l in plan.lines) == amount
