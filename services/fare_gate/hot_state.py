"""Hot state in Redis: the card-to-account cache and the wallet's deny list. The only module
of fare-gate that imports redis.

Nothing here is the only copy of anything. The cache maps a card's pseudonym (never its
UID) to the account and rider category the wallet resolved it to, and expires after a
short TTL; losing it costs one ResolveCredential call. The deny list belongs to the wallet,
which rebuilds it from PostgreSQL. When Redis fails, lookups answer "not cached" and "not
listed" and the tap path relies on the wallet, which refuses to hold or charge a blocked
account by itself (ACCOUNT_BLOCKED) and reports a blocked status on every resolution.
"""

from __future__ import annotations

import logging

import redis

log = logging.getLogger("citytap.fare_gate.hot_state")

# The wallet's deny list (see services/wallet/deny_list.py): one set with members
# `account:<account id>` and `card:<hex of the wallet's card hash>`.
DENY_LIST_KEY = "citytap:wallet:deny-list"
CACHE_PREFIX = "citytap:fare_gate:card:"
_SEPARATOR = "\x1f"


class HotState:
    """The card cache and the deny list, degrading to "unknown" when Redis fails."""

    def __init__(self, client: redis.Redis, *, cache_ttl_s: int, deny_list_key: str = DENY_LIST_KEY) -> None:
        self._client = client
        self._ttl_s = cache_ttl_s
        self._deny_key = deny_list_key

    def cached_account(self, card_hash: bytes) -> tuple[str, str] | None:
        """(account id, rider category) cached for this card, or None."""
        if self._ttl_s == 0:
            return None
        try:
            value = self._client.get(CACHE_PREFIX + card_hash.hex())
        except redis.RedisError as exc:
            log.warning("card cache unreadable; asking the wallet", extra={"fields": {"error": str(exc)}})
            return None
        if value is None:
            return None
        account_id, _, category = value.decode().partition(_SEPARATOR)
        return (account_id, category) if account_id else None

    def cache_account(self, card_hash: bytes, account_id: str, rider_category: str) -> None:
        if self._ttl_s == 0:
            return
        try:
            self._client.set(CACHE_PREFIX + card_hash.hex(), f"{account_id}{_SEPARATOR}{rider_category}", ex=self._ttl_s)
        except redis.RedisError as exc:
            log.warning("card cache unwritable", extra={"fields": {"error": str(exc)}})

    def forget_card(self, card_hash: bytes) -> None:
        try:
            self._client.delete(CACHE_PREFIX + card_hash.hex())
        except redis.RedisError as exc:
            log.warning("card cache unwritable", extra={"fields": {"error": str(exc)}})

    def account_denied(self, account_id: str) -> bool:
        """True when the wallet's deny list names the account; False when Redis cannot say."""
        try:
            return bool(self._client.sismember(self._deny_key, f"account:{account_id}"))
        except redis.RedisError as exc:
            log.warning("deny list unreadable; relying on the wallet", extra={"fields": {"error": str(exc)}})
            return False
