"""The error tree shared by every CityTap service.

    CityTapError                  base; carries a machine-readable `reason` (UPPER_SNAKE)
    ├── InvalidArgument           the request itself is malformed       -> INVALID_ARGUMENT
    ├── NotFound                  a named thing does not exist          -> NOT_FOUND
    ├── Conflict                  an id is reused with another payload  -> ALREADY_EXISTS
    ├── FailedPrecondition        valid, but the state forbids it       -> FAILED_PRECONDITION
    ├── LimitExceeded             a configured limit would be passed    -> RESOURCE_EXHAUSTED
    ├── PermissionDenied          the caller may not do this            -> PERMISSION_DENIED
    ├── Unauthenticated           the caller could not be identified    -> UNAUTHENTICATED
    └── Unavailable               a dependency is down; safe to retry   -> UNAVAILABLE

Domain code raises these; `libs.grpc_server` maps them to gRPC status codes in one table
and attaches a google.rpc.ErrorInfo whose `reason` a client can switch on. Anything else
that escapes a handler becomes INTERNAL with reason INTERNAL, and its details are logged,
never sent to the caller.
"""

from __future__ import annotations


class CityTapError(Exception):
    """Base of all expected failures; `reason` is stable and machine-readable."""

    def __init__(self, reason: str, message: str, **metadata: str) -> None:
        self.reason = reason
        self.message = message
        self.metadata = {k: str(v) for k, v in metadata.items()}
        super().__init__(f"{reason}: {message}")


class InvalidArgument(CityTapError):
    """The request is malformed: a bad amount, currency, id or field."""


class NotFound(CityTapError):
    """An account, hold, merchant or other named thing does not exist."""


class Conflict(CityTapError):
    """A client-generated id was already used with a different payload."""


class FailedPrecondition(CityTapError):
    """The request is well formed but the current state forbids it (insufficient funds)."""


class LimitExceeded(CityTapError):
    """A configured limit (stored value, per purchase, per day) would be exceeded."""


class PermissionDenied(CityTapError):
    """The caller is known but may not act on this resource."""


class Unauthenticated(CityTapError):
    """The caller's credentials are missing or invalid."""


class Unavailable(CityTapError):
    """A dependency is unreachable; the same request may be retried with the same id."""
