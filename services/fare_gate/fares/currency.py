"""Currency amounts from a feed, turned into exact integer minor units.

GTFS writes an amount as a decimal (`20`, `20.00`, `-8.5`) whose number of decimal places
is the currency's ISO 4217 exponent. CityTap carries money as integer minor units
everywhere, so the feed loader converts each amount once, here, and refuses an amount
that is not a whole number of minor units (`20.005` TWD) rather than rounding it.

For TWD the exponent is 2: one minor unit is NT$0.01, so NT$20 is 2000 minor units and
NT$10,000 is 1,000,000, the same scale the wallet's ledger uses.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

# ISO 4217 active codes and their minor-unit exponent. Codes absent here are refused:
# a feed in an unknown currency cannot be converted exactly.
_EXPONENT_0 = "BIF CLP DJF GNF ISK JPY KMF KRW PYG RWF UGX UYI VND VUV XAF XOF XPF"
_EXPONENT_3 = "BHD IQD JOD KWD LYD OMR TND"
_EXPONENT_4 = "CLF UYW"
_EXPONENT_2 = (
    "AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BMD BND BOB BOV BRL BSD BTN "
    "BWP BYN BZD CAD CDF CHE CHF CHW CNY COP COU CRC CUP CVE CZK DKK DOP DZD EGP ERN ETB "
    "EUR FJD FKP GBP GEL GHS GIP GMD GTQ GYD HKD HNL HTG HUF IDR ILS INR IRR JMD KES KGS "
    "KHR KPW KYD KZT LAK LBP LKR LRD LSL MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN "
    "MXV MYR MZN NAD NGN NIO NOK NPR NZD PAB PEN PGK PHP PKR PLN QAR RON RSD RUB SAR SBD "
    "SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TOP TRY TTD TWD TZS "
    "UAH USD USN UYU UZS VED VES WST XCD YER ZAR ZMW ZWG"
)
CURRENCY_EXPONENTS: dict[str, int] = {
    **{code: 0 for code in _EXPONENT_0.split()},
    **{code: 2 for code in _EXPONENT_2.split()},
    **{code: 3 for code in _EXPONENT_3.split()},
    **{code: 4 for code in _EXPONENT_4.split()},
}

# Every amount we store fits a PostgreSQL bigint and a protobuf int64.
AMOUNT_MINOR_MAX = 2**63 - 1

_DECIMAL = re.compile(r"^-?[0-9]+(\.[0-9]+)?$")


class AmountError(ValueError):
    """An amount or currency that cannot become exact minor units; the message says why."""


def exponent(currency: str) -> int:
    """The ISO 4217 minor-unit exponent of `currency`, or AmountError if it is unknown."""
    if currency not in CURRENCY_EXPONENTS:
        raise AmountError(f"{currency!r} is not an ISO 4217 currency code this engine knows (such as TWD)")
    return CURRENCY_EXPONENTS[currency]


def to_minor(amount: str, currency: str) -> int:
    """Convert a GTFS decimal amount such as "20.00" to integer minor units of `currency`."""
    places = exponent(currency)
    if not _DECIMAL.match(amount):
        raise AmountError(f"{amount!r} is not a decimal amount such as 20 or 20.00")
    try:
        value = Decimal(amount)
    except InvalidOperation as exc:  # pragma: no cover - the pattern already excludes these
        raise AmountError(f"{amount!r} is not a decimal amount") from exc
    scaled = value.scaleb(places)
    if scaled != scaled.to_integral_value():
        raise AmountError(f"{amount} {currency} is not a whole number of minor units ({currency} has {places} decimal places)")
    minor = int(scaled)
    if abs(minor) > AMOUNT_MINOR_MAX:
        raise AmountError(f"{amount} {currency} does not fit in a signed 64-bit number of minor units")
    return minor


def format_minor(amount_minor: int, currency: str) -> str:
    """Show minor units for people: 2000 TWD -> "NT$20.00", -800 TWD -> "-NT$8.00"."""
    places = CURRENCY_EXPONENTS.get(currency, 2)
    sign = "-" if amount_minor < 0 else ""
    whole, fraction = divmod(abs(amount_minor), 10**places)
    number = f"{whole:,}" + (f".{fraction:0{places}d}" if places else "")
    if currency == "TWD":
        return f"{sign}NT${number}"
    return f"{sign}{number} {currency}"
