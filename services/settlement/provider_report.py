"""Stripe's payout reconciliation report (CSV), read strictly; and written, for the demo.

Finance staff download the itemized payout reconciliation report from Stripe
(`payout_reconciliation.itemized.5` in the Reporting API). Each row is one balance
transaction. Stripe writes amounts in major units of the currency ("350.00" for NT$350) and
the currency in lower case; times in `created_utc` are "YYYY-MM-DD HH:MM:SS" in UTC.

Columns read (the report may carry more, in any order; the names are Stripe's):

| column | required | used for |
|---|---|---|
| `balance_transaction_id` | yes | the row's identity; the same id twice is a duplicate |
| `created_utc` | yes | which service day the row belongs to |
| `currency`, `gross`, `fee`, `net` | yes | the amount; `net` must equal `gross - fee` |
| `reporting_category` | yes | `charge` (top-ups), `refund` (top-up refunds), `transfer` (payouts to parties); others are not compared |
| `source_id` | no | the Stripe object: `ch_`/`py_` charge, `re_` refund, `tr_` transfer |
| `payment_intent_id`, `refund_id` | no | match top-ups and their refunds |
| `payment_metadata[top_up_id]`, `refund_metadata[refund_id]`, `transfer_metadata[payout_id]` | no | match by CityTap's own ids |

A file that is not UTF-8, lacks a required column, has a row of the wrong width, or holds a
malformed id, currency, amount or time is refused whole with MALFORMED_REPORT, naming the
line and column of the first problem: nothing of it is used.
"""

from __future__ import annotations

import csv
import io
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation

from libs import errors

REQUIRED = ("balance_transaction_id", "created_utc", "currency", "gross", "fee", "net", "reporting_category")
OPTIONAL = ("source_id", "payment_intent_id", "refund_id", "payment_metadata[top_up_id]",
            "refund_metadata[refund_id]", "transfer_metadata[payout_id]", "automatic_payout_id", "description")
ROWS_MAX = 100_000
_ID = re.compile(r"^[A-Za-z0-9_]{1,255}$")
_CURRENCY = re.compile(r"^[A-Za-z]{3}$")
_AMOUNT = re.compile(r"^-?\d{1,15}(\.\d{1,3})?$")

# ISO 4217 minor-unit exponents that are not 2.
_EXPONENT = {"BIF": 0, "CLP": 0, "DJF": 0, "GNF": 0, "ISK": 0, "JPY": 0, "KMF": 0, "KRW": 0, "PYG": 0, "RWF": 0,
             "UGX": 0, "VND": 0, "VUV": 0, "XAF": 0, "XOF": 0, "XPF": 0,
             "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3}


def exponent(currency: str) -> int:
    return _EXPONENT.get(currency.upper(), 2)


@dataclass(frozen=True)
class ProviderRow:
    """One balance transaction of the report, amounts in ISO minor units (signed as Stripe signs them)."""

    line: int
    balance_transaction_id: str
    created_at: datetime
    currency: str  # upper case
    gross_minor: int
    fee_minor: int
    net_minor: int
    reporting_category: str
    source_id: str = ""
    payment_intent_id: str = ""
    refund_id: str = ""
    top_up_id: str = ""
    citytap_refund_id: str = ""
    payout_id: str = ""


def _malformed(message: str, line: int, column: str = "") -> errors.InvalidArgument:
    metadata = {"line": str(line)}
    if column:
        metadata["column"] = column
    where = f"line {line}" + (f", column {column}" if column else "")
    return errors.InvalidArgument("MALFORMED_REPORT", f"provider report {where}: {message}",
                                  field="provider_report_csv", **metadata)


def _minor(text: str, currency: str, line: int, column: str) -> int:
    if not _AMOUNT.match(text):
        raise _malformed(f"{text!r} is not an amount such as 350.00", line, column)
    places = exponent(currency)
    try:
        value = Decimal(text) * (10 ** places)
    except InvalidOperation:
        raise _malformed(f"{text!r} is not an amount", line, column) from None
    if value != value.to_integral_value():
        raise _malformed(f"{text!r} has more decimals than {currency} has", line, column)
    return int(value)


def _time(text: str, line: int) -> datetime:
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise _malformed(f"{text!r} is not a time such as 2030-01-01 08:30:00", line, "created_utc") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc)


def parse(data: bytes) -> list[ProviderRow]:
    """The rows of a payout reconciliation report, or MALFORMED_REPORT naming the first problem."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise _malformed("the file is not UTF-8 text", 1) from None
    if "\x00" in text:
        raise _malformed("the file holds NUL bytes: it is not a CSV report", 1)
    reader = csv.reader(io.StringIO(text, newline=""), strict=True)
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            raise _malformed("the file is empty: a report has a header row", 1)
        names = [cell.strip() for cell in header]
        missing = [name for name in REQUIRED if name not in names]
        if missing:
            raise _malformed(f"missing column(s) {', '.join(missing)}: is this Stripe's payout reconciliation "
                             "report?", 1, missing[0])
        if len(set(names)) != len(names):
            raise _malformed("a column name appears twice", 1)
        index = {name: names.index(name) for name in (*REQUIRED, *OPTIONAL) if name in names}
        rows: list[ProviderRow] = []
        for row in reader:
            line = reader.line_num
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) != len(names):
                raise _malformed(f"{len(row)} fields where the header has {len(names)}", line)
            if len(rows) >= ROWS_MAX:
                raise _malformed(f"more than {ROWS_MAX} rows", line)
            get = {name: row[i].strip() for name, i in index.items()}
            txn = get["balance_transaction_id"]
            if not _ID.match(txn):
                raise _malformed(f"{txn!r} is not a balance transaction id", line, "balance_transaction_id")
            currency = get["currency"]
            if not _CURRENCY.match(currency):
                raise _malformed(f"{currency!r} is not a currency code", line, "currency")
            currency = currency.upper()
            gross = _minor(get["gross"], currency, line, "gross")
            fee = _minor(get["fee"], currency, line, "fee")
            net = _minor(get["net"], currency, line, "net")
            if gross - fee != net:
                raise _malformed("net is not gross minus fee", line, "net")
            category = get["reporting_category"]
            if not re.match(r"^[a-z_]{1,64}$", category):
                raise _malformed(f"{category!r} is not a reporting category", line, "reporting_category")
            for name in ("source_id", "payment_intent_id", "refund_id"):
                if get.get(name) and not _ID.match(get[name]):
                    raise _malformed(f"{get[name]!r} is not a Stripe id", line, name)
            rows.append(ProviderRow(
                line=line, balance_transaction_id=txn, created_at=_time(get["created_utc"], line), currency=currency,
                gross_minor=gross, fee_minor=fee, net_minor=net, reporting_category=category,
                source_id=get.get("source_id", ""), payment_intent_id=get.get("payment_intent_id", ""),
                refund_id=get.get("refund_id", ""), top_up_id=get.get("payment_metadata[top_up_id]", ""),
                citytap_refund_id=get.get("refund_metadata[refund_id]", ""),
                payout_id=get.get("transfer_metadata[payout_id]", "")))
    except csv.Error as exc:
        raise _malformed(f"not a well-formed CSV file ({exc})", reader.line_num or 1) from None
    return rows


# --- writing, for the demo and the tests -----------------------------------------------------

WRITE_COLUMNS = ("balance_transaction_id", "created_utc", "available_on_utc", "currency", "gross", "fee", "net",
                 "reporting_category", "source_id", "payment_intent_id", "refund_id", "description",
                 "payment_metadata[top_up_id]", "refund_metadata[refund_id]", "transfer_metadata[payout_id]")


@dataclass(frozen=True)
class ReportItem:
    """One balance transaction to write (amounts in minor units, signed as Stripe signs them)."""

    balance_transaction_id: str
    created_at: datetime
    currency: str
    gross_minor: int
    reporting_category: str
    source_id: str = ""
    payment_intent_id: str = ""
    refund_id: str = ""
    top_up_id: str = ""
    refund_reference: str = ""
    payout_id: str = ""
    fee_minor: int = 0
    description: str = ""


def _major(amount_minor: int, currency: str) -> str:
    places = exponent(currency)
    value = Decimal(amount_minor).scaleb(-places)
    return f"{value:.{places}f}"


def write(items: Iterable[ReportItem]) -> bytes:
    """A report in Stripe's format holding `items`, for stripe-mock setups that cannot run reports."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(WRITE_COLUMNS)
    for item in items:
        stamp = item.created_at.astimezone(timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        writer.writerow([item.balance_transaction_id, stamp, stamp, item.currency.lower(),
                         _major(item.gross_minor, item.currency), _major(item.fee_minor, item.currency),
                         _major(item.gross_minor - item.fee_minor, item.currency), item.reporting_category,
                         item.source_id, item.payment_intent_id, item.refund_id, item.description, item.top_up_id,
                         item.refund_reference, item.payout_id])
    return out.getvalue().encode()
