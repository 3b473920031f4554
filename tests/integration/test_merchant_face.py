"""Paying a merchant by face: the real face service (real model, real PostgreSQL) behind its
real servicer, the merchant service asking it to Match for MERCHANT_PAYMENTS, and the
face-only limit."""

from __future__ import annotations

import grpc
import pytest

from citytap.common.v1 import credential_pb2
from citytap.merchant.v1 import merchant_pb2
from libs.protos import money_pb
from services.face.domain import Purpose
from tests.integration.face_support import (  # noqa: F401 - fixtures used by name
    GrpcFace,
    Photos,
    consent,
    face_db,
    face_model,
    grpc_face,
    photos,
)
from tests.integration.merchant_support import START, MerchantStack, bearer, expect_error

pytestmark = pytest.mark.integration


def test_a_consenting_rider_pays_by_face_within_the_face_limit(postgres_dsn: str, kafka_bootstrap: str,
                                                               stripe_api_base: str, redis_url: str, grpc_face: GrpcFace,
                                                               photos: Photos) -> None:
    stack = MerchantStack(postgres_dsn, kafka_bootstrap, stripe_api_base, redis_url,
                          face_address=f"127.0.0.1:{grpc_face.server.port}")
    try:
        merchant = stack.verified_merchant()
        secret = stack.key(merchant.merchant_id)
        stack.clock.set(START)
        obama, _ = stack.rider()
        biden, _ = stack.rider()
        records = grpc_face.db.records
        records.record_consent(consent(obama, purpose=Purpose.MERCHANT_PAYMENTS))
        records.enroll(obama, photos.raw("obama"))
        records.record_consent(consent(biden, purpose=Purpose.TRANSIT_FARES))  # fares only, not shops
        records.enroll(biden, photos.raw("biden"))

        def face(name: str) -> credential_pb2.Credential:
            return credential_pb2.Credential(face_embedding=credential_pb2.FaceEmbedding(values=photos.encoding(name)))

        paid = stack.charge_with(secret, merchant.merchant_id, face("obama2"), 50_000)  # exactly the face limit
        assert paid.credential_kind == credential_pb2.CREDENTIAL_KIND_FACE
        assert stack.balance(obama) == 500_000 - 50_000
        before = stack.snapshot()
        refusals = [
            ("above the face limit", face("obama2"), 50_001, grpc.StatusCode.RESOURCE_EXHAUSTED, "LIMIT_EXCEEDED"),
            ("consented to fares only", face("biden"), 100, grpc.StatusCode.NOT_FOUND, "UNKNOWN_CREDENTIAL"),
        ]
        for name, credential, amount, status, reason in refusals:
            assert expect_error(stack.stub.Charge, merchant_pb2.ChargeRequest(
                merchant_id=merchant.merchant_id, order_id="face-2", credential=credential,
                amount=money_pb(amount, "TWD")), metadata=bearer(secret))[:2] == (status, reason), name
        assert stack.snapshot() == before
        assert stack.balance(biden) == 500_000
    finally:
        stack.close()
