"""The demo city's split contracts: transit fares and merchant payments, made once per stack.

`ensure(settlement, ...)` returns the contract version in force for a revenue kind and scope,
or makes version 1 and waits until it is in force. A version takes effect no sooner than the
settlement service's lead time after it is made (`CITYTAP_SETTLEMENT_CONTRACT_LEAD_TIME_S`;
infra/env.sh sets 20 s for dev and test stacks), so a fresh stack waits that long once; later
demo runs find the contracts in force. After the wait it also waits `settle_s`, the time the
services' contract caches may take to see the new version.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta, timezone

import grpc

from citytap.common.v1 import split_pb2
from citytap.settlement.v1 import settlement_pb2, settlement_pb2_grpc
from libs.grpc_client import error_info
from libs.protos import money_pb, timestamp_pb

CURRENCY = "TWD"
CITY_PARTY_ID = "taipei-city"
PLATFORM_PARTY_ID = "citytap-platform"
TRANSIT_OPERATOR_ID = "demo-city-transit"  # the fare gate's CITYTAP_FARE_GATE_OPERATOR_ID default
CONTRACT_WAIT_S_MAX = 90


def _say(text: str) -> None:
    print(text, flush=True)


def ensure(settlement: settlement_pb2_grpc.SettlementServiceStub, *, revenue_kind: int, scope: str, name: str,
           terms: Sequence[settlement_pb2.SplitTerm], describe: str, settle_s: float = 0.0) -> settlement_pb2.ContractVersion:
    """The version in force for (`revenue_kind`, `scope`), made and waited for if there is none."""
    listed = settlement.ListContracts(settlement_pb2.ListContractsRequest(revenue_kind=revenue_kind, scope=scope,  # type: ignore[arg-type]
                                                                          has_scope=True, page_size=100))
    now = datetime.now(timezone.utc)
    in_force = [c for c in listed.contracts if c.effective_from.ToDatetime(tzinfo=timezone.utc) <= now]
    if in_force:
        version = in_force[0]
        _say(f"  {name:<27} {version.contract_id} v{version.version} in force: {describe}")
        return version
    request = settlement_pb2.CreateContractVersionRequest(
        contract_id=f"{name.replace(' ', '-')}-{uuid.uuid4().hex[:8]}", version=1, revenue_kind=revenue_kind,  # type: ignore[arg-type]
        scope=scope, effective_from=timestamp_pb(now + timedelta(seconds=2)), note=f"demo city: {name}", terms=terms)
    try:
        made = settlement.CreateContractVersion(request).contract
    except grpc.RpcError as exc:
        info = error_info(exc)
        if info is None or info.reason != "EFFECTIVE_TOO_SOON":
            raise
        earliest = datetime.fromisoformat(info.metadata["earliest"]) + timedelta(seconds=1)
        if earliest - now > timedelta(seconds=CONTRACT_WAIT_S_MAX):
            raise RuntimeError(
                f"no {name} contract is in force and settlement's lead time is {(earliest - now).total_seconds():.0f} s; "
                f"set CITYTAP_SETTLEMENT_CONTRACT_LEAD_TIME_S to at most {CONTRACT_WAIT_S_MAX} for the demo stack, "
                "or make the contract ahead of time") from exc
        request.effective_from.CopyFrom(timestamp_pb(earliest))
        made = settlement.CreateContractVersion(request).contract
    wait_s = max(0.0, (made.effective_from.ToDatetime(tzinfo=timezone.utc) - datetime.now(timezone.utc)).total_seconds())
    _say(f"  {name:<27} {made.contract_id} v1 made: {describe}; in force in {wait_s:.0f} s (settlement's lead time)")
    time.sleep(wait_s + settle_s + 0.5)
    return made


def transit_fares(settlement: settlement_pb2_grpc.SettlementServiceStub, *, settle_s: float) -> settlement_pb2.ContractVersion:
    """The demo operator's fares: the city 10 %, the platform 1.5 %, the operator the rest."""
    return ensure(settlement, revenue_kind=settlement_pb2.REVENUE_KIND_TRANSIT_FARE, scope=TRANSIT_OPERATOR_ID,
                  name="transit fares", describe="city 10 %, platform 1.5 %, operator the rest", settle_s=settle_s,
                  terms=[settlement_pb2.SplitTerm(party=split_pb2.PARTY_TRANSIT_OPERATOR, party_id=TRANSIT_OPERATOR_ID,
                                                  remainder=True),
                         settlement_pb2.SplitTerm(party=split_pb2.PARTY_CITY, party_id=CITY_PARTY_ID, basis_points=1_000),
                         settlement_pb2.SplitTerm(party=split_pb2.PARTY_PLATFORM, party_id=PLATFORM_PARTY_ID,
                                                  basis_points=150)])


def merchant_payments(settlement: settlement_pb2_grpc.SettlementServiceStub, *,
                      settle_s: float = 0.0) -> settlement_pb2.ContractVersion:
    """The default merchant-payment contract: the city 2.5 %, the platform 1.5 % plus NT$1."""
    return ensure(settlement, revenue_kind=settlement_pb2.REVENUE_KIND_MERCHANT_PAYMENT, scope="",
                  name="merchant payments", describe="city 2.5 %, platform 1.5 % + NT$1, merchant the rest",
                  settle_s=settle_s, terms=[
                      settlement_pb2.SplitTerm(party=split_pb2.PARTY_CITY, party_id=CITY_PARTY_ID, basis_points=250),
                      settlement_pb2.SplitTerm(party=split_pb2.PARTY_PLATFORM, party_id=PLATFORM_PARTY_ID,
                                               basis_points=150, fixed_fee=money_pb(100, CURRENCY)),
                      settlement_pb2.SplitTerm(party=split_pb2.PARTY_MERCHANT, remainder=True)])
