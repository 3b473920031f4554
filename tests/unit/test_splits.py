"""libs.splits: shares sum to the amount, fees first, refunds never take back more than was shared."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from libs.money import MoneyError
from libs.splits import ContractTerms, DatedVersion, Term, check_terms, split, split_refund, version_at


@st.composite
def contracts(draw: st.DrawFn) -> ContractTerms:
    """Random valid contracts: 1-5 parties, basis points summing to 10000 or a remainder party."""
    parties = draw(st.integers(min_value=1, max_value=5))
    use_remainder = draw(st.booleans())
    cuts = sorted(draw(st.lists(st.integers(min_value=0, max_value=10_000), min_size=parties - 1,
                                max_size=parties - 1)))
    bps = [b - a for a, b in zip([0] + cuts, cuts + [10_000])]
    terms = []
    for index, bp in enumerate(bps):
        fee = draw(st.integers(min_value=0, max_value=500))
        remainder = use_remainder and index == 0
        terms.append(Term("CITY" if index else "MERCHANT", f"p{index}" if index else "",
                          0 if remainder else bp, fee, remainder))
    return ContractTerms("c-1", draw(st.integers(min_value=1, max_value=9)), tuple(terms))


amounts = st.integers(min_value=0, max_value=10**12)


@settings(max_examples=200, deadline=None)
@given(contract=contracts(), amount=amounts)
def test_lines_sum_exactly_to_the_amount_and_are_never_negative(contract: ContractTerms, amount: int) -> None:
    lines = split(contract, amount, "TWD", merchant_id="m-1")
    assert sum(line.amount_minor for line in lines) == amount
    assert all(line.amount_minor >= 0 for line in lines)
    assert [line.contract_version for line in lines] == [contract.version] * len(lines)
    assert lines[0].party_id == "m-1"  # the merchant term is filled with the paying merchant


@settings(max_examples=200, deadline=None)
@given(contract=contracts(), amount=amounts)
def test_each_share_is_its_fee_plus_within_one_unit_of_its_basis_points(contract: ContractTerms, amount: int) -> None:
    fees_total = sum(t.fixed_fee_minor for t in contract.terms)
    if amount < fees_total:
        return  # fees short of the amount are covered by the next test
    lines = split(contract, amount, "TWD", merchant_id="m-1")
    left = amount - fees_total
    for line, term, bp in zip(lines, contract.terms, contract.effective_basis_points()):
        exact = Fraction(left * bp, 10_000)
        assert abs(line.amount_minor - term.fixed_fee_minor - exact) < 1


def test_fees_are_paid_in_order_until_a_small_amount_runs_out() -> None:
    contract = ContractTerms("c", 1, (Term("PLATFORM", "pf", 0, 300), Term("CITY", "city", 5000, 300),
                                      Term("MERCHANT", "", 5000)))
    assert [l.amount_minor for l in split(contract, 400, "TWD", merchant_id="m")] == [300, 100, 0]
    assert [l.amount_minor for l in split(contract, 1601, "TWD", merchant_id="m")] == [300, 801, 500]


def test_known_split_with_remainder_party() -> None:
    # NT$35 fare: city 5%, platform 1.5%, operator the rest (93.5%).
    contract = ContractTerms("fare", 2, (Term("TRANSIT_OPERATOR", "op", 0, 0, True), Term("CITY", "city", 500),
                                         Term("PLATFORM", "pf", 150)))
    lines = split(contract, 3500, "TWD")
    assert [(l.party, l.amount_minor) for l in lines] == [("TRANSIT_OPERATOR", 3273), ("CITY", 175),
                                                          ("PLATFORM", 52)]
    assert {l.contract_id for l in lines} == {"fare"}


@settings(max_examples=150, deadline=None)
@given(contract=contracts(), amount=st.integers(min_value=1, max_value=10**9), data=st.data())
def test_partial_refunds_never_take_back_more_than_each_share(contract: ContractTerms, amount: int,
                                                              data: st.DataObject) -> None:
    original = split(contract, amount, "TWD", merchant_id="m-1")
    refunds: list[list] = []
    left = amount
    while left > 0:
        part = data.draw(st.integers(min_value=1, max_value=left))
        lines = split_refund(original, part, refunds)
        assert sum(l.amount_minor for l in lines) == part
        assert all(l.amount_minor >= 0 for l in lines)
        refunds.append(lines)
        left -= part
    # Fully refunded: every party gave back exactly its share.
    for index, line in enumerate(original):
        assert sum(r[index].amount_minor for r in refunds) == line.amount_minor
    with pytest.raises(MoneyError) as info:
        split_refund(original, 1, refunds)
    assert info.value.reason == "INVALID_AMOUNT"


@given(contract=contracts(), amount=st.integers(min_value=1, max_value=10**9))
def test_a_full_refund_is_the_mirror_of_the_payment(contract: ContractTerms, amount: int) -> None:
    original = split(contract, amount, "TWD", merchant_id="m-1")
    assert [l.amount_minor for l in split_refund(original, amount)] == [l.amount_minor for l in original]


@pytest.mark.parametrize("terms, message", [
    ((), "at least one party"),
    ((Term("CITY", "c", 6000), Term("PLATFORM", "p", 3000)), "sum to 10000"),
    ((Term("CITY", "c", 6000), Term("CITY", "c", 4000)), "appears twice"),
    ((Term("CITY", "", 10000),), "only the merchant"),
    ((Term("BANK", "b", 10000),), "party must be one of"),
    ((Term("CITY", "c", -1), Term("PLATFORM", "p", 10001)), "zero or more"),
    ((Term("CITY", "c", 0, 0, True), Term("PLATFORM", "p", 0, 0, True)), "at most one"),
    ((Term("CITY", "c", 5, 0, True),), "remainder party's basis_points must be 0"),
    ((Term("CITY", "c", 0, 0, True), Term("PLATFORM", "p", 10001)), "at most 10000"),
    ((Term("CITY", "c", 10000, 1.5),), "whole number"),  # type: ignore[arg-type]
])
def test_malformed_terms_are_refused(terms: tuple, message: str) -> None:
    with pytest.raises(MoneyError) as info:
        check_terms(terms)
    assert info.value.reason == "INVALID_SPLIT"
    assert message in info.value.message


def test_a_merchant_term_needs_the_paying_merchant() -> None:
    contract = ContractTerms("c", 1, (Term("MERCHANT", "", 10_000),))
    with pytest.raises(MoneyError, match="merchant_id is required"):
        split(contract, 100, "TWD")


def test_refund_above_what_is_left_is_refused() -> None:
    contract = ContractTerms("c", 1, (Term("CITY", "c", 5000), Term("PLATFORM", "p", 5000)))
    original = split(contract, 101, "TWD")
    with pytest.raises(MoneyError, match="more than the 101"):
        split_refund(original, 102)
    with pytest.raises(MoneyError):
        split_refund(original, 0)


def test_version_switches_exactly_at_its_effective_time() -> None:
    t0 = datetime(2026, 12, 1, 4, 30, tzinfo=timezone.utc)
    v1 = DatedVersion(ContractTerms("c", 1, (Term("CITY", "c", 10_000),)), t0)
    v2 = DatedVersion(ContractTerms("c", 2, (Term("CITY", "c", 10_000),)), t0 + timedelta(days=1))
    assert version_at([v1, v2], t0 - timedelta(microseconds=1)) is None
    assert version_at([v1, v2], t0) is v1
    assert version_at([v2, v1], t0 + timedelta(days=1) - timedelta(microseconds=1)) is v1
    assert version_at([v1, v2], t0 + timedelta(days=1)) is v2
    with pytest.raises(ValueError):
        version_at([v1], datetime(2026, 12, 1))
