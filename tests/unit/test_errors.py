"""Domain errors map to gRPC status codes through one table; subclasses inherit the mapping."""

from __future__ import annotations

import grpc
import pytest

from libs import errors
from libs.grpc_server import STATUS_FOR_ERROR, status_code_for


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidArgument("INVALID_AMOUNT", "x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.NotFound("UNKNOWN_ACCOUNT", "x"), grpc.StatusCode.NOT_FOUND),
        (errors.Conflict("IDEMPOTENCY_CONFLICT", "x"), grpc.StatusCode.ALREADY_EXISTS),
        (errors.FailedPrecondition("INSUFFICIENT_FUNDS", "x"), grpc.StatusCode.FAILED_PRECONDITION),
        (errors.LimitExceeded("LIMIT_EXCEEDED", "x"), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (errors.PermissionDenied("FORBIDDEN", "x"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.Unauthenticated("BAD_KEY", "x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.Unavailable("DEPENDENCY_DOWN", "x"), grpc.StatusCode.UNAVAILABLE),
    ],
)
def test_each_error_kind_has_its_status(error: errors.CityTapError, code: grpc.StatusCode) -> None:
    assert status_code_for(error) == code


def test_every_error_class_is_mapped() -> None:
    kinds = {cls for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.CityTapError)}
    assert kinds - {errors.CityTapError} == set(STATUS_FOR_ERROR)


def test_subclass_inherits_its_parents_status() -> None:
    class InsufficientFunds(errors.FailedPrecondition):
        pass

    assert status_code_for(InsufficientFunds("INSUFFICIENT_FUNDS", "x")) == grpc.StatusCode.FAILED_PRECONDITION
    assert status_code_for(errors.CityTapError("X", "unmapped base")) == grpc.StatusCode.INTERNAL
