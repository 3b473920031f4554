"""Every machine-readable reason the code raises is part of the published contract
(citytap.common.v1.ErrorReason), so clients can rely on the list in proto/."""

from __future__ import annotations

import re
from pathlib import Path

from citytap.common.v1 import errors_pb2

ROOT = Path(__file__).resolve().parents[2]
RAISE = re.compile(
    r"\b(?:InvalidArgument|NotFound|Conflict|FailedPrecondition|LimitExceeded|PermissionDenied|Unauthenticated|"
    r"Unavailable|MoneyError|CityTapError)\(\s*\"([A-Z_]+)\""
)


def reasons_in_code() -> dict[str, str]:
    found: dict[str, str] = {}
    for path in [*ROOT.joinpath("services").rglob("*.py"), *ROOT.joinpath("libs").rglob("*.py")]:
        for reason in RAISE.findall(path.read_text()):
            found.setdefault(reason, str(path.relative_to(ROOT)))
    return found


def test_every_raised_reason_is_in_the_error_reason_enum() -> None:
    published = {name.removeprefix("ERROR_REASON_") for name in errors_pb2.ErrorReason.keys()}
    found = reasons_in_code()
    assert len(found) >= 10  # the scan itself works
    missing = {reason: where for reason, where in found.items() if reason not in published}
    assert not missing, f"add these reasons to proto/citytap/common/v1/errors.proto: {missing}"
