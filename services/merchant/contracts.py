"""Split contracts for merchant payments: the shared cache of `libs.contract_cache` for
REVENUE_KIND_MERCHANT_PAYMENT. The choice of version for a charge (`domain.contract_in_force`:
the merchant category's contract, else the default) is made on every charge."""

from __future__ import annotations

from functools import partial

from citytap.settlement.v1 import settlement_pb2
from libs.contract_cache import ContractCache as _ContractCache

# A cache of the merchant-payment contract versions; same arguments as libs.contract_cache's.
ContractCache = partial(_ContractCache, revenue_kind=settlement_pb2.REVENUE_KIND_MERCHANT_PAYMENT)
