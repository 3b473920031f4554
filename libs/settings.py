"""Settings helpers: the one place a service turns environment variables into typed values.

A service declares its settings as a frozen dataclass whose fields carry a `setting(...)`
spec, then calls `load(SettingsClass, os.environ)` once in its entry point. Every missing or
malformed value is collected and reported together in one `SettingsError`, so an operator
fixes the whole environment in one pass instead of one variable per restart.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping
from datetime import time as datetime_time
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")

_MISSING = object()


class SettingsError(Exception):
    """One or more settings are missing or malformed; `problems` names each one."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("invalid settings:\n" + "\n".join(f"  - {p}" for p in problems))


def setting(env: str, parse: Callable[[str], Any] = str, *, default: Any = _MISSING, doc: str = "") -> Any:
    """Declare a dataclass field read from environment variable `env` and parsed by `parse`.

    `parse` raises ValueError with a short explanation when the text is malformed.
    """
    return dataclasses.field(metadata={"env": env, "parse": parse, "default": default, "doc": doc})


def load(cls: type[T], environ: Mapping[str, str]) -> T:
    """Build `cls` from `environ`, raising SettingsError naming every bad or missing variable."""
    values: dict[str, Any] = {}
    problems: list[str] = []
    for field in dataclasses.fields(cls):  # type: ignore[arg-type]
        meta = field.metadata
        env = meta["env"]
        raw = environ.get(env)
        if raw is None or raw == "":
            if meta["default"] is _MISSING:
                problems.append(f"{env} is missing ({meta['doc'] or field.name})")
            else:
                values[field.name] = meta["default"]
            continue
        try:
            values[field.name] = meta["parse"](raw)
        except ValueError as exc:
            problems.append(f"{env}={raw!r} is malformed: {exc}")
    if problems:
        raise SettingsError(problems)
    return cls(**values)


def describe(cls: type) -> list[tuple[str, str, str]]:
    """Return (variable, default, doc) for each setting of `cls`, for READMEs and --help."""
    rows = []
    for field in dataclasses.fields(cls):
        meta = field.metadata
        default = "(required)" if meta["default"] is _MISSING else repr(meta["default"])
        rows.append((meta["env"], default, meta["doc"]))
    return rows


# --- parsers -----------------------------------------------------------------------------

_HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


def host_port(text: str) -> str:
    """A `host:port` address; port 0 is allowed for listeners (the OS picks one)."""
    match = _HOST_PORT.match(text.strip())
    if not match or not 0 <= int(match.group("port")) <= 65535:
        raise ValueError("expected host:port, for example 127.0.0.1:50052")
    return text.strip()


def host_port_list(text: str) -> str:
    """A comma-separated list of `host:port` addresses (Kafka bootstrap servers)."""
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise ValueError("expected one or more host:port addresses separated by commas")
    for part in parts:
        host_port(part)
    return ",".join(parts)


def url(*schemes: str) -> Callable[[str], str]:
    """A URL whose scheme is one of `schemes`."""

    def parse(text: str) -> str:
        scheme, sep, rest = text.partition("://")
        if not sep or scheme not in schemes or not rest:
            raise ValueError(f"expected a URL starting with {' or '.join(s + '://' for s in schemes)}")
        return text

    return parse


def _int_at_least(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise ValueError("expected a whole number") from None
    if value < minimum:
        raise ValueError(f"expected a number {minimum} or greater")
    return value


def positive_int(text: str) -> int:
    """An integer greater than zero."""
    return _int_at_least(text, 1)


def non_negative_int(text: str) -> int:
    """An integer zero or greater."""
    return _int_at_least(text, 0)


def int_between(minimum: int, maximum: int, unit: str = "") -> Callable[[str], int]:
    """A parser of whole numbers from `minimum` to `maximum`, both included."""
    suffix = f" {unit}" if unit else ""

    def parse(text: str) -> int:
        value = _int_at_least(text, minimum)
        if value > maximum:
            raise ValueError(f"expected at most {maximum}{suffix}")
        return value

    return parse


SECRET_KEY_BYTES_MIN = 32


class SecretKey(bytes):
    """Key bytes that never print: settings objects end up in logs and tracebacks."""

    def __repr__(self) -> str:
        return f"SecretKey(<{len(self)} bytes>)"

    __str__ = __repr__


def hex_key(text: str) -> SecretKey:
    """A hex-encoded key of at least 32 bytes (64 hex digits)."""
    try:
        key = bytes.fromhex(text.strip())
    except ValueError:
        raise ValueError("expected hex digits, for example the output of `openssl rand -hex 32`") from None
    if len(key) < SECRET_KEY_BYTES_MIN:
        raise ValueError(f"expected at least {SECRET_KEY_BYTES_MIN} bytes ({2 * SECRET_KEY_BYTES_MIN} hex digits), "
                         f"got {len(key)}")
    return SecretKey(key)


def schema_name(text: str) -> str:
    """A PostgreSQL schema name: lower-case letters, digits and underscores."""
    if not re.fullmatch(r"[a-z][a-z0-9_]{0,62}", text):
        raise ValueError("expected lower-case letters, digits and underscores, starting with a letter")
    return text


def boolean(text: str) -> bool:
    """true/false, yes/no, on/off or 1/0, in any case."""
    lowered = text.strip().lower()
    if lowered in {"true", "yes", "on", "1"}:
        return True
    if lowered in {"false", "no", "off", "0"}:
        return False
    raise ValueError("expected true or false")


def log_level(text: str) -> str:
    """One of the standard logging level names."""
    upper = text.strip().upper()
    if upper not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ValueError("expected DEBUG, INFO, WARNING or ERROR")
    return upper


REPO_ROOT = Path(__file__).resolve().parents[1]


def repo_path(*, suffixes: tuple[str, ...] = ()) -> Callable[[str], Path]:
    """Parser: a file or folder that must exist; relative paths are taken from the repository root."""

    def parse(text: str) -> Path:
        path = Path(text.strip()).expanduser()
        if not path.is_absolute():
            path = REPO_ROOT / path
        if not path.exists():
            raise ValueError(f"{path} does not exist")
        if suffixes and path.is_file() and path.suffix.lower() not in suffixes:
            raise ValueError(f"expected a folder or a {' or '.join(suffixes)} file")
        return path

    return parse


_HH_MM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


def timezone_name(text: str) -> str:
    """Parser: an IANA time zone name, such as Asia/Taipei."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(text.strip())
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError("expected an IANA time zone name such as Asia/Taipei") from None
    return text.strip()


def clock_time(text: str) -> datetime_time:
    """Parser: a local time of day, HH:MM, such as 04:30 (when a service day starts)."""
    match = _HH_MM.match(text.strip())
    if not match:
        raise ValueError("expected HH:MM, for example 04:30")
    return datetime_time(int(match.group(1)), int(match.group(2)))
