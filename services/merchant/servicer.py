"""The gRPC edge of the merchant service: proto in, use case, proto out. No decisions here.

Till calls (Charge, Refund, GetCharge) authenticate with a merchant API key sent in the
`authorization` metadata as `Bearer ctk_...`. Back-office calls (Onboard, CreateApiKey,
RevokeApiKey, GetMerchant) are reached from the operator's network like every other CityTap
RPC today; when one carries a key anyway, the key must belong to the merchant it names.
Errors are `libs.errors` exceptions, mapped to status codes by the shared interceptor.
"""

from __future__ import annotations

import hashlib

import grpc

from citytap.merchant.v1 import merchant_pb2, merchant_pb2_grpc
from libs import errors
from libs.grpc_server import Registration
from libs.protos import timestamp_pb
from services.merchant import convert
from services.merchant.domain import SCOPE_CHARGES_READ, Caller, ChargeInput, CredentialKind, OnboardInput, RefundInput
from services.merchant.merchants import Merchants

SERVICE_NAME = merchant_pb2.DESCRIPTOR.services_by_name["MerchantService"].full_name
AUTHORIZATION = "authorization"
BEARER = "Bearer "

_CREDENTIAL_KINDS = {
    "card_uid": CredentialKind.CARD,
    "phone_qr": CredentialKind.PHONE_QR,
    "nfc_token": CredentialKind.NFC,
    "face_embedding": CredentialKind.FACE,
    "face_frames": CredentialKind.FACE,
}


def presented_key(context: grpc.ServicerContext) -> str | None:
    """The API key in the call's metadata, or None when there is none."""
    for key, value in context.invocation_metadata() or ():
        if key == AUTHORIZATION and isinstance(value, str):
            return value[len(BEARER):].strip() if value.startswith(BEARER) else value.strip()
    return None


class MerchantServicer(merchant_pb2_grpc.MerchantServiceServicer):
    """The seven RPCs over `Merchants`; attached once the composition root has built it."""

    def __init__(self, merchants: Merchants | None = None) -> None:
        self._merchants = merchants

    def attach(self, merchants: Merchants) -> None:
        self._merchants = merchants

    @property
    def merchants(self) -> Merchants:
        if self._merchants is None:
            raise errors.Unavailable("UNAVAILABLE", "the merchant service is still starting")
        return self._merchants

    def _caller(self, context: grpc.ServicerContext) -> Caller:
        return self.merchants.authenticate(presented_key(context))

    def _back_office(self, context: grpc.ServicerContext, merchant_id: str) -> None:
        """A back-office call that carries a key must name the key's own merchant."""
        if presented_key(context) is not None:
            caller = self._caller(context)
            if caller.merchant_id != merchant_id:
                raise errors.PermissionDenied("API_KEY_WRONG_MERCHANT", "the API key belongs to another merchant",
                                              field="merchant_id")

    def Onboard(self, request: merchant_pb2.OnboardRequest, context: grpc.ServicerContext) -> merchant_pb2.OnboardResponse:
        self._back_office(context, request.merchant_id)
        merchant, link = self.merchants.onboard(OnboardInput(
            request.merchant_id, request.name, request.category, request.country, request.email, request.return_url,
            request.refresh_url))
        return merchant_pb2.OnboardResponse(merchant=convert.merchant_pb(merchant, self.merchants.limits),
                                            onboarding_url=link.url,
                                            onboarding_url_expires_at=timestamp_pb(link.expires_at))

    def GetMerchant(self, request: merchant_pb2.GetMerchantRequest,
                    context: grpc.ServicerContext) -> merchant_pb2.GetMerchantResponse:
        if presented_key(context) is not None:
            self._caller(context).require(SCOPE_CHARGES_READ, request.merchant_id)
        merchant = self.merchants.get_merchant(request.merchant_id)
        return merchant_pb2.GetMerchantResponse(merchant=convert.merchant_pb(merchant, self.merchants.limits))

    def CreateApiKey(self, request: merchant_pb2.CreateApiKeyRequest,
                     context: grpc.ServicerContext) -> merchant_pb2.CreateApiKeyResponse:
        self._back_office(context, request.merchant_id)
        key, secret = self.merchants.create_api_key(request.merchant_id, request.label, list(request.scopes))
        return merchant_pb2.CreateApiKeyResponse(api_key=convert.api_key_pb(key), secret=secret)

    def RevokeApiKey(self, request: merchant_pb2.RevokeApiKeyRequest,
                     context: grpc.ServicerContext) -> merchant_pb2.RevokeApiKeyResponse:
        self._back_office(context, request.merchant_id)
        key = self.merchants.revoke_api_key(request.merchant_id, request.key_id)
        return merchant_pb2.RevokeApiKeyResponse(api_key=convert.api_key_pb(key))

    def Charge(self, request: merchant_pb2.ChargeRequest, context: grpc.ServicerContext) -> merchant_pb2.ChargeResponse:
        caller = self._caller(context)
        kind = request.credential.WhichOneof("kind") if request.HasField("credential") else None
        charge = self.merchants.charge(caller, ChargeInput(
            merchant_id=request.merchant_id, order_id=request.order_id,
            credential_kind=_CREDENTIAL_KINDS.get(kind) if kind else None,
            credential_digest=hashlib.sha256(request.credential.SerializeToString(deterministic=True)).digest(),
            amount_minor=request.amount.amount_minor if request.HasField("amount") else None,
            currency=request.amount.currency, description=request.description), request.credential)
        return merchant_pb2.ChargeResponse(charge=convert.charge_pb(charge))

    def Refund(self, request: merchant_pb2.RefundRequest, context: grpc.ServicerContext) -> merchant_pb2.RefundResponse:
        caller = self._caller(context)
        refund, charge = self.merchants.refund(caller, RefundInput(
            refund_id=request.refund_id, merchant_id=request.merchant_id, charge_id=request.charge_id,
            amount_minor=request.amount.amount_minor if request.HasField("amount") else None,
            currency=request.amount.currency, note=request.note))
        return merchant_pb2.RefundResponse(refund=convert.refund_pb(refund), charge=convert.charge_pb(charge))

    def GetCharge(self, request: merchant_pb2.GetChargeRequest,
                  context: grpc.ServicerContext) -> merchant_pb2.GetChargeResponse:
        caller = self._caller(context)
        charge, refunds = self.merchants.get_charge(caller, request.merchant_id, request.charge_id)
        return merchant_pb2.GetChargeResponse(charge=convert.charge_pb(charge),
                                              refunds=[convert.refund_pb(r) for r in refunds])


def registration(servicer: MerchantServicer) -> Registration:
    return Registration(merchant_pb2_grpc.add_MerchantServiceServicer_to_server, servicer, SERVICE_NAME)
