"""The network's phone QR claims (libs.qr_nonces) against the real Redis."""

from __future__ import annotations

import os

import pytest

from libs import errors, qr_nonces
from libs.redis_client import create_redis

pytestmark = pytest.mark.integration


def test_a_nonce_is_claimed_once_kept_for_its_ttl_and_released_only_by_its_owner(redis_url: str) -> None:
    client = create_redis(redis_url)
    nonce = os.urandom(16)
    try:
        assert qr_nonces.claim(client, nonce, "fare_gate:tap:t1", ttl_s=40)
        assert qr_nonces.claim(client, nonce, "fare_gate:tap:t1", ttl_s=40)  # the same tap, retried
        assert not qr_nonces.claim(client, nonce, "merchant:charge:c1", ttl_s=40)  # anyone else
        assert 38 <= client.ttl(qr_nonces.key(nonce)) <= 40
        assert not qr_nonces.release(client, nonce, "merchant:charge:c1")  # not its claim to give back
        assert client.get(qr_nonces.key(nonce)) == b"fare_gate:tap:t1"
        assert qr_nonces.release(client, nonce, "fare_gate:tap:t1")
        assert qr_nonces.claim(client, nonce, "merchant:charge:c1", ttl_s=40)  # free again
    finally:
        client.delete(qr_nonces.key(nonce))
        client.close()


def test_an_unreachable_store_refuses_unavailable_and_release_does_not_raise() -> None:
    client = create_redis("redis://127.0.0.1:1/0", timeout_s=0.2)  # nothing listens on port 1
    nonce = os.urandom(16)
    with pytest.raises(errors.Unavailable) as info:
        qr_nonces.claim(client, nonce, "fare_gate:tap:t1", ttl_s=40)
    assert info.value.reason == "UNAVAILABLE"
    assert qr_nonces.release(client, nonce, "fare_gate:tap:t1") is False
    client.close()
