"""The deny list fare-gate reads: one Redis set, the only module of the wallet that imports redis.

The set `citytap:wallet:deny-list` holds one member per denied thing:

    account:<account id>       a blocked account
    card:<64 hex digits>       the keyed hash of a card live-linked to a blocked account

It is a cache of PostgreSQL (the `accounts.status` and `cards` tables), never the only copy:
`Ledger.rebuild_deny_list` recomputes it and swaps it in atomically, at start and
periodically. Redis errors surface as `libs.errors.Unavailable`, so a block that cannot reach
Redis is rolled back and the client retries it.
"""

from __future__ import annotations

from collections.abc import Iterable

import redis

from libs import errors

DENY_LIST_KEY = "citytap:wallet:deny-list"
DEFAULT_SCHEMA = "wallet"


def deny_list_key(schema: str) -> str:
    """The deny list's Redis key for a wallet on `schema`: the well-known key fare-gate reads
    for the production schema, and a key of its own for an isolated instance (a test wallet
    on a scratch schema must never replace the real deny list when it rebuilds its own)."""
    return DENY_LIST_KEY if schema == DEFAULT_SCHEMA else f"{DENY_LIST_KEY}:{schema}"
# Members written per Redis command, so a large rebuild never sends one huge command.
CHUNK_MEMBERS_MAX = 1000


def _chunks(members: list[str]) -> Iterable[list[str]]:
    for start in range(0, len(members), CHUNK_MEMBERS_MAX):
        yield members[start:start + CHUNK_MEMBERS_MAX]


class RedisDenyList:
    """The deny list in a Redis set (`key` is overridable so tests can use their own)."""

    def __init__(self, client: redis.Redis, *, key: str = DENY_LIST_KEY) -> None:
        self._client = client
        self.key = key

    def add(self, members: Iterable[str]) -> None:
        members = list(members)
        try:
            for chunk in _chunks(members):
                self._client.sadd(self.key, *chunk)
        except redis.RedisError as exc:
            raise errors.Unavailable("UNAVAILABLE", f"the deny list could not be updated: {exc}") from exc

    def remove(self, members: Iterable[str]) -> None:
        members = list(members)
        try:
            for chunk in _chunks(members):
                self._client.srem(self.key, *chunk)
        except redis.RedisError as exc:
            raise errors.Unavailable("UNAVAILABLE", f"the deny list could not be updated: {exc}") from exc

    def replace(self, members: Iterable[str]) -> None:
        """Swap in exactly `members` in one MULTI/EXEC transaction, so readers see the old
        set or the new one and never a half-built one."""
        members = list(members)
        try:
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self.key)
            for chunk in _chunks(members):
                pipe.sadd(self.key, *chunk)
            pipe.execute()
        except redis.RedisError as exc:
            raise errors.Unavailable("UNAVAILABLE", f"the deny list could not be rebuilt: {exc}") from exc

    def contains(self, member: str) -> bool:
        try:
            return bool(self._client.sismember(self.key, member))
        except redis.RedisError as exc:
            raise errors.Unavailable("UNAVAILABLE", f"the deny list could not be read: {exc}") from exc

    def members(self) -> set[str]:
        try:
            return {m.decode() if isinstance(m, bytes) else m for m in self._client.smembers(self.key)}
        except redis.RedisError as exc:
            raise errors.Unavailable("UNAVAILABLE", f"the deny list could not be read: {exc}") from exc


class MemoryDenyList:
    """An in-process deny list for tests that do not need Redis."""

    def __init__(self) -> None:
        self.key = "memory"
        self._members: set[str] = set()

    def add(self, members: Iterable[str]) -> None:
        self._members.update(members)

    def remove(self, members: Iterable[str]) -> None:
        self._members.difference_update(members)

    def replace(self, members: Iterable[str]) -> None:
        self._members = set(members)

    def contains(self, member: str) -> bool:
        return member in self._members

    def members(self) -> set[str]:
        return set(self._members)
