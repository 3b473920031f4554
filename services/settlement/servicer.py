"""Settlement's gRPC entrypoint: proto in, one service-layer call, proto out.

Errors are raised as `libs.errors` exceptions and mapped to status codes by the interceptor
of `libs.grpc_server`.
"""

from __future__ import annotations

from typing import Any

import grpc

from citytap.settlement.v1 import settlement_pb2, settlement_pb2_grpc
from libs import errors
from libs.grpc_server import Registration
from services.settlement import convert

SERVICE_NAME = "citytap.settlement.v1.SettlementService"
REPORT_CSV_BYTES_MAX = 4 * 1024 * 1024


class SettlementServicer(settlement_pb2_grpc.SettlementServiceServicer):
    """Thin adapter over the use cases; `attach` hands them over once the pool is open."""

    def __init__(self) -> None:
        self._parts: dict[str, Any] = {}

    def attach(self, **parts: Any) -> None:
        self._parts.update(parts)

    def _part(self, name: str) -> Any:
        part = self._parts.get(name)
        if part is None:
            raise errors.Unavailable("UNAVAILABLE", "settlement is still starting")
        return part

    # --- contracts --------------------------------------------------------------------------

    def CreateContractVersion(self, request: settlement_pb2.CreateContractVersionRequest,
                              context: grpc.ServicerContext) -> settlement_pb2.CreateContractVersionResponse:
        contracts = self._part("contracts")
        created = contracts.create_version(convert.new_contract_version(request, contracts.currency))
        return settlement_pb2.CreateContractVersionResponse(contract=convert.contract_to_proto(created))

    def ListContracts(self, request: settlement_pb2.ListContractsRequest,
                      context: grpc.ServicerContext) -> settlement_pb2.ListContractsResponse:
        if request.revenue_kind and not convert.revenue_kind(request.revenue_kind):
            raise errors.InvalidArgument("INVALID_ARGUMENT", "unknown revenue_kind", field="revenue_kind")
        versions, token = self._part("contracts").list_versions(
            contract_id=request.contract_id, revenue_kind=convert.revenue_kind(request.revenue_kind),
            scope=request.scope if request.has_scope else None, page_size=request.page_size,
            page_token=request.page_token)
        return settlement_pb2.ListContractsResponse(contracts=[convert.contract_to_proto(v) for v in versions],
                                                    next_page_token=token)

    # --- days, reports, reconciliation, export ------------------------------------------------

    def CloseDay(self, request: settlement_pb2.CloseDayRequest,
                 context: grpc.ServicerContext) -> settlement_pb2.CloseDayResponse:
        return self._part("closing").close_day_pb(request.service_day)

    def GetServiceDay(self, request: settlement_pb2.GetServiceDayRequest,
                      context: grpc.ServicerContext) -> settlement_pb2.GetServiceDayResponse:
        return self._part("closing").get_service_day_pb(request.service_day)

    def GetReport(self, request: settlement_pb2.GetReportRequest,
                  context: grpc.ServicerContext) -> settlement_pb2.GetReportResponse:
        party = convert.party_name(request.party)
        if not party:
            raise errors.InvalidArgument("INVALID_ARGUMENT", "party is required", field="party")
        return self._part("reports").get_report_pb(party, request.party_id, request.service_day,
                                                   page_size=request.page_size, page_token=request.page_token)

    def Reconcile(self, request: settlement_pb2.ReconcileRequest,
                  context: grpc.ServicerContext) -> settlement_pb2.ReconcileResponse:
        if len(request.provider_report_csv) > REPORT_CSV_BYTES_MAX:
            raise errors.InvalidArgument("MALFORMED_REPORT", "the provider report is larger than 4 MiB",
                                         field="provider_report_csv")
        return self._part("reconciler").reconcile_pb(request.service_day, request.provider_report_csv)

    def Export(self, request: settlement_pb2.ExportRequest,
               context: grpc.ServicerContext) -> settlement_pb2.ExportResponse:
        return self._part("exporter").export_pb(request)


def registration(servicer: SettlementServicer) -> Registration:
    return Registration(settlement_pb2_grpc.add_SettlementServiceServicer_to_server, servicer, SERVICE_NAME)
