"""Phone QR codes pay once across the whole network: one claim per code's nonce, in Redis.

Every place that accepts a phone QR code online (fare-gate's gates, the merchant service's
tills) claims the code's nonce here before the code may pay, under one key per nonce
(`citytap:qr-nonce:<hex>`, SET NX with an expiry just over the code's validity). The value
names who used it (`fare_gate:tap:<tap id>`, `merchant:charge:<charge id>`), so the same
tap or charge retried is let through and anyone else is refused: a code photographed at a
gate cannot then pay at a till within its 30 s, nor the other way round.

Claims fail closed: when Redis cannot say whether a nonce was used, the caller is refused
UNAVAILABLE (`errors.Unavailable`, dependency `redis`). A gate that cannot reach Redis
decides offline, with its own memory of the nonces it accepted.
"""

from __future__ import annotations

from typing import Any

import redis

from libs import errors

KEY_PREFIX = "citytap:qr-nonce:"


def key(nonce: bytes) -> str:
    return KEY_PREFIX + nonce.hex()


def claim(client: Any, nonce: bytes, owner: str, *, ttl_s: int) -> bool:
    """True when `owner` may use the nonce: nobody had claimed it, or `owner` itself did (a
    retry). False when someone else has. `client` is a redis-py client (or a fake of one)."""
    name = key(nonce)
    try:
        if client.set(name, owner, nx=True, ex=ttl_s):
            return True
        holder = client.get(name)
    except redis.RedisError as exc:
        raise errors.Unavailable("UNAVAILABLE", f"the QR nonce store is unreachable: {exc}",
                                 dependency="redis") from exc
    return holder is not None and (holder.decode() if isinstance(holder, bytes) else holder) == owner


def release(client: Any, nonce: bytes, owner: str) -> bool:
    """Give a claim back when what it was for did not happen (the code did not pay); True if
    it was `owner`'s and is gone. Best effort: a claim left behind only means the rider's
    phone shows its next code, which it does every few seconds anyway."""
    name = key(nonce)
    try:
        holder = client.get(name)
        if holder is None or (holder.decode() if isinstance(holder, bytes) else holder) != owner:
            return False
        return bool(client.delete(name))
    except redis.RedisError:
        return False
