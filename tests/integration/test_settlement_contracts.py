"""Split contracts through settlement's gRPC API on the real PostgreSQL: versioned,
effective-dated, immutable, one per revenue kind and scope, idempotent on id and version."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from pathlib import Path

import grpc
import pytest

from citytap.common.v1 import money_pb2, split_pb2
from citytap.settlement.v1 import settlement_pb2 as pb
from libs.grpc_client import error_info, error_reason
from libs.protos import timestamp_pb
from services.settlement.contracts import Contracts, load_initial
from tests.integration.settlement_support import (  # noqa: F401 - fixture
    Running,
    new_id,
    settlement,
    start_settlement,
    stop_settlement,
)

FARE = pb.REVENUE_KIND_TRANSIT_FARE
SHOP = pb.REVENUE_KIND_MERCHANT_PAYMENT


def fare_terms(city_bp: int = 500) -> list[pb.SplitTerm]:
    return [pb.SplitTerm(party=split_pb2.PARTY_TRANSIT_OPERATOR, party_id="metro", remainder=True),
            pb.SplitTerm(party=split_pb2.PARTY_CITY, party_id="city", basis_points=city_bp),
            pb.SplitTerm(party=split_pb2.PARTY_PLATFORM, party_id="platform", basis_points=150)]


def create(running: Running, contract_id: str, version: int, effective_from: datetime, *, kind: int = FARE,
           scope: str = "metro", terms: list[pb.SplitTerm] | None = None, note: str = "") -> pb.ContractVersion:
    return running.stub.CreateContractVersion(pb.CreateContractVersionRequest(
        contract_id=contract_id, version=version, revenue_kind=kind, effective_from=timestamp_pb(effective_from),
        terms=terms if terms is not None else fare_terms(), note=note, scope=scope)).contract


def refused(call, reason: str, code: grpc.StatusCode) -> grpc.RpcError:  # noqa: ANN001
    with pytest.raises(grpc.RpcError) as info:
        call()
    assert info.value.code() == code, info.value.details()
    assert error_reason(info.value) == reason, info.value.details()
    return info.value


def test_versions_follow_one_by_one_and_list_newest_first(settlement: Running) -> None:
    now = settlement.clock()
    contract_id = new_id("fare")
    v1 = create(settlement, contract_id, 1, now + timedelta(hours=2), note="launch terms")
    assert v1.version == 1 and v1.scope == "metro" and v1.terms[0].remainder
    settlement.clock.advance(60)
    v2 = create(settlement, contract_id, 2, now + timedelta(days=1), terms=fare_terms(600), note="city share up")
    listed = settlement.stub.ListContracts(pb.ListContractsRequest(contract_id=contract_id)).contracts
    assert [c.version for c in listed] == [2, 1]
    assert listed[0].terms[1].basis_points == 600 and listed[1].terms[1].basis_points == 500
    # Same id, version and payload: the original comes back, unchanged.
    again = create(settlement, contract_id, 2, now + timedelta(days=1), terms=fare_terms(600), note="city share up")
    assert again == v2
    # Paging and filters.
    page = settlement.stub.ListContracts(pb.ListContractsRequest(contract_id=contract_id, page_size=1))
    assert len(page.contracts) == 1 and page.next_page_token
    rest = settlement.stub.ListContracts(pb.ListContractsRequest(contract_id=contract_id, page_size=1,
                                                                 page_token=page.next_page_token))
    assert [c.version for c in rest.contracts] == [1] and not rest.next_page_token
    assert not settlement.stub.ListContracts(pb.ListContractsRequest(revenue_kind=SHOP)).contracts
    assert len(settlement.stub.ListContracts(pb.ListContractsRequest(scope="metro", has_scope=True)).contracts) == 2
    assert not settlement.stub.ListContracts(pb.ListContractsRequest(scope="", has_scope=True)).contracts


def test_a_version_may_only_take_effect_after_the_lead_time(settlement: Running) -> None:
    now = settlement.clock()
    lead_s = settlement.settings.contract_lead_time_s
    error = refused(lambda: create(settlement, new_id("fare"), 1, now + timedelta(seconds=lead_s - 1)),
                    "EFFECTIVE_TOO_SOON", grpc.StatusCode.INVALID_ARGUMENT)
    assert error_info(error).metadata["field"] == "effective_from"
    refused(lambda: create(settlement, new_id("fare"), 1, now - timedelta(days=1)),
            "EFFECTIVE_TOO_SOON", grpc.StatusCode.INVALID_ARGUMENT)
    exactly = create(settlement, new_id("fare"), 1, now + timedelta(seconds=lead_s))
    assert exactly.version == 1


def test_one_contract_per_kind_and_scope(settlement: Running) -> None:
    later = settlement.clock() + timedelta(days=2)
    create(settlement, new_id("fare"), 1, later, scope="bus-co")
    refused(lambda: create(settlement, new_id("fare"), 1, later, scope="bus-co"),
            "CONTRACT_SCOPE_TAKEN", grpc.StatusCode.ALREADY_EXISTS)
    # The same scope under the other kind, and the default scope of merchant payments, are free.
    shop_terms = [pb.SplitTerm(party=split_pb2.PARTY_MERCHANT, remainder=True),
                  pb.SplitTerm(party=split_pb2.PARTY_CITY, party_id="city", basis_points=100),
                  pb.SplitTerm(party=split_pb2.PARTY_PLATFORM, party_id="platform", basis_points=150,
                               fixed_fee=money_pb2.Money(amount_minor=300, currency="TWD"))]
    create(settlement, new_id("shop"), 1, later, kind=SHOP, scope="bus-co", terms=shop_terms)
    default = create(settlement, new_id("shop"), 1, later, kind=SHOP, scope="", terms=shop_terms)
    assert default.terms[2].fixed_fee.amount_minor == 300


def test_bad_versions_are_refused_and_change_nothing(settlement: Running) -> None:
    now = settlement.clock()
    contract_id = new_id("fare")
    create(settlement, contract_id, 1, now + timedelta(days=1))
    cases = [
        (lambda: create(settlement, contract_id, 3, now + timedelta(days=3)), "INVALID_ARGUMENT",
         grpc.StatusCode.INVALID_ARGUMENT),  # skips version 2
        (lambda: create(settlement, contract_id, 2, now + timedelta(hours=20)), "EFFECTIVE_TOO_SOON",
         grpc.StatusCode.INVALID_ARGUMENT),  # before version 1 takes effect
        (lambda: create(settlement, contract_id, 2, now + timedelta(days=2), scope="other"), "INVALID_ARGUMENT",
         grpc.StatusCode.INVALID_ARGUMENT),  # another scope
        (lambda: create(settlement, contract_id, 1, now + timedelta(days=1), terms=fare_terms(700)),
         "IDEMPOTENCY_CONFLICT", grpc.StatusCode.ALREADY_EXISTS),  # version 1 again with other terms
        (lambda: create(settlement, new_id("fare"), 1, now + timedelta(days=1), terms=fare_terms(10_000)),
         "INVALID_SPLIT", grpc.StatusCode.INVALID_ARGUMENT),  # named parties above 10000 bp
        (lambda: create(settlement, new_id("fare"), 1, now + timedelta(days=1), terms=[
            pb.SplitTerm(party=split_pb2.PARTY_CITY, party_id="city", basis_points=10_000,
                         fixed_fee=money_pb2.Money(amount_minor=1, currency="USD"))]),
         "INVALID_CURRENCY", grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: create(settlement, "bad id!", 1, now + timedelta(days=1)), "INVALID_ARGUMENT",
         grpc.StatusCode.INVALID_ARGUMENT),
        (lambda: create(settlement, new_id("shop"), 1, now + timedelta(days=1), kind=SHOP, scope="5814"),
         "INVALID_SPLIT", grpc.StatusCode.INVALID_ARGUMENT),  # merchant payments that never pay the merchant
        (lambda: settlement.stub.ListContracts(pb.ListContractsRequest(page_token="nonsense")), "INVALID_ARGUMENT",
         grpc.StatusCode.INVALID_ARGUMENT),
    ]
    for call, reason, code in cases:
        refused(call, reason, code)
    listed = settlement.stub.ListContracts(pb.ListContractsRequest(contract_id=contract_id)).contracts
    assert [c.version for c in listed] == [1]


def test_versions_switch_exactly_at_their_effective_time(settlement: Running) -> None:
    """What a service caching ListContracts computes: the version in force at each instant."""
    from datetime import timezone

    from libs.splits import ContractTerms, DatedVersion, Term, split, version_at

    now = settlement.clock()
    contract_id = new_id("fare")
    first, second = now + timedelta(hours=2), now + timedelta(days=3)
    create(settlement, contract_id, 1, first, terms=fare_terms(500))
    create(settlement, contract_id, 2, second, terms=fare_terms(800))
    dated = []
    for version in settlement.stub.ListContracts(pb.ListContractsRequest(contract_id=contract_id)).contracts:
        terms = tuple(Term(split_pb2.Party.Name(t.party).removeprefix("PARTY_"), t.party_id, t.basis_points,
                           t.fixed_fee.amount_minor, t.remainder) for t in version.terms)
        dated.append(DatedVersion(ContractTerms(version.contract_id, version.version, terms),
                                  version.effective_from.ToDatetime(tzinfo=timezone.utc)))
    tick = timedelta(microseconds=1)
    assert version_at(dated, first - tick) is None
    assert version_at(dated, first).terms.version == 1
    assert version_at(dated, second - tick).terms.version == 1
    in_force = version_at(dated, second)
    assert in_force.terms.version == 2
    # The city's share follows the version: 5% before, 8% from the second version on.
    assert split(version_at(dated, second - tick).terms, 10_000, "TWD")[1].amount_minor == 500
    assert split(in_force.terms, 10_000, "TWD")[1].amount_minor == 800


# --- initial contracts (go-live terms) -----------------------------------------------------------

DEMO_CITY_CONTRACTS = Path(__file__).resolve().parents[2] / "infra" / "demo_city" / "contracts.json"


def test_initial_contracts_go_into_an_empty_book_only_and_may_take_effect_in_the_past(
        scratch_schema: str, tmp_path: Path) -> None:
    running = start_settlement(scratch_schema, tmp_path, CITYTAP_SETTLEMENT_INITIAL_CONTRACTS=str(DEMO_CITY_CONTRACTS))
    try:
        listed = running.stub.ListContracts(pb.ListContractsRequest()).contracts
        assert sorted((c.contract_id, c.version, c.scope) for c in listed) == [
            ("demo-city-merchant-payments", 1, ""), ("demo-city-transit-fares", 1, "demo-city-transit")]
        assert all(c.effective_from.ToDatetime() < running.clock().replace(tzinfo=None) for c in listed)
        # A later version still keeps the lead time.
        refused(lambda: create(running, "demo-city-transit-fares", 2, running.clock() + timedelta(seconds=1)),
                "EFFECTIVE_TOO_SOON", grpc.StatusCode.INVALID_ARGUMENT)
    finally:
        stop_settlement(running)
    # Started again on the same (now non-empty) book: nothing is recorded twice or changed.
    again = start_settlement(scratch_schema, tmp_path, CITYTAP_SETTLEMENT_INITIAL_CONTRACTS=str(DEMO_CITY_CONTRACTS))
    try:
        assert len(again.stub.ListContracts(pb.ListContractsRequest()).contracts) == 2
    finally:
        stop_settlement(again)


def test_a_book_that_has_contracts_takes_no_initial_ones(settlement: Running) -> None:
    contract_id = new_id("fares")
    create(settlement, contract_id, 1, settlement.clock() + timedelta(days=2))
    contracts: Contracts = settlement.app.contracts
    assert contracts.seed_initial(load_initial(DEMO_CITY_CONTRACTS, currency="TWD")) == 0
    assert [c.contract_id for c in settlement.stub.ListContracts(pb.ListContractsRequest()).contracts] == [contract_id]


def test_a_malformed_initial_contracts_file_names_every_problem(tmp_path: Path) -> None:
    bad = tmp_path / "contracts.json"
    bad.write_text(json.dumps([{"contract_id": "a", "version": 1, "revenue_kind": "TRANSIT_FARE",
                                "effective_from": "2026-01-01T00:00:00", "terms": []},
                               {"version": 1, "effective_from": "2026-01-01T00:00:00+08:00", "terms": []}]))
    with pytest.raises(ValueError) as caught:
        load_initial(bad, currency="TWD")
    assert "version 0" in str(caught.value) and "UTC offset" in str(caught.value)
    assert "version 1" in str(caught.value) and "contract_id" in str(caught.value)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not a readable JSON file"):
        load_initial(bad, currency="TWD")
