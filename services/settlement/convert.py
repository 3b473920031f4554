"""Conversions between settlement's protobuf messages and its domain records."""

from __future__ import annotations

from datetime import timezone

from citytap.common.v1 import split_pb2
from citytap.settlement.v1 import settlement_pb2
from libs import errors
from libs.protos import money_pb, timestamp_pb
from libs.splits import Term
from services.settlement.domain import ContractVersion, NewContractVersion


def enum_name(enum_type: object, prefix: str, value: int) -> str:
    """`REVENUE_KIND_TRANSIT_FARE` -> `TRANSIT_FARE`; '' for the zero value or an unknown number."""
    try:
        name = enum_type.Name(value)  # type: ignore[attr-defined]
    except ValueError:
        return ""
    short = name.removeprefix(prefix)
    return "" if short == "UNSPECIFIED" else short


def enum_value(enum_type: object, prefix: str, name: str) -> int:
    return enum_type.Value(prefix + name) if name else 0  # type: ignore[attr-defined]


def revenue_kind(value: int) -> str:
    return enum_name(settlement_pb2.RevenueKind, "REVENUE_KIND_", value)


def party_name(value: int) -> str:
    return enum_name(split_pb2.Party, "PARTY_", value)


def party_value(name: str) -> int:
    return enum_value(split_pb2.Party, "PARTY_", name)


def new_contract_version(request: settlement_pb2.CreateContractVersionRequest, currency: str) -> NewContractVersion:
    if not request.HasField("effective_from"):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "effective_from is required", field="effective_from")
    if request.revenue_kind and not revenue_kind(request.revenue_kind):
        raise errors.InvalidArgument("INVALID_ARGUMENT", "unknown revenue_kind", field="revenue_kind")
    terms = []
    for index, term in enumerate(request.terms):
        party = party_name(term.party)
        if not party:
            raise errors.InvalidArgument("INVALID_SPLIT", f"term {index} names no party", field=f"terms[{index}].party")
        fee = 0
        if term.HasField("fixed_fee"):
            if term.fixed_fee.currency != currency:
                raise errors.InvalidArgument("INVALID_CURRENCY", f"fixed fees are in {currency}",
                                             field=f"terms[{index}].fixed_fee")
            fee = term.fixed_fee.amount_minor
        terms.append(Term(party, term.party_id, term.basis_points, fee, term.remainder))
    return NewContractVersion(
        contract_id=request.contract_id, version=request.version, revenue_kind=revenue_kind(request.revenue_kind),
        scope=request.scope, effective_from=request.effective_from.ToDatetime(tzinfo=timezone.utc),
        terms=tuple(terms), currency=currency, note=request.note)


def contract_to_proto(contract: ContractVersion) -> settlement_pb2.ContractVersion:
    return settlement_pb2.ContractVersion(
        contract_id=contract.contract_id, version=contract.version,
        revenue_kind=enum_value(settlement_pb2.RevenueKind, "REVENUE_KIND_", contract.revenue_kind),
        effective_from=timestamp_pb(contract.effective_from),
        terms=[settlement_pb2.SplitTerm(
            party=party_value(t.party), party_id=t.party_id, basis_points=t.basis_points,
            fixed_fee=money_pb(t.fixed_fee_minor, contract.currency) if t.fixed_fee_minor else None,
            remainder=t.remainder) for t in contract.terms],
        note=contract.note, created_at=timestamp_pb(contract.created_at), scope=contract.scope)


def split_line_pb(party: str, party_id: str, amount_minor: int, currency: str, contract_id: str,
                  contract_version: int) -> split_pb2.SplitLine:
    return split_pb2.SplitLine(party=party_value(party), party_id=party_id, amount=money_pb(amount_minor, currency),
                               contract_id=contract_id, contract_version=contract_version)
