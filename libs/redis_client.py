"""Redis client factory. Redis holds hot state only (caches, deny lists, nonces, rate
limits): nothing in it may be the only copy of money, so every value can be rebuilt from
PostgreSQL or expire harmlessly."""

from __future__ import annotations

import redis


def create_redis(url: str, *, timeout_s: float = 0.5) -> redis.Redis:
    """A client for `url` whose every command and connect is bounded by `timeout_s`."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=30,
        decode_responses=False,
    )
