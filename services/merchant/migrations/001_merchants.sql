-- The merchant service's state: merchants, their API keys, till charges and refunds, and the
-- Stripe webhook events already handled.
--
-- Applied by libs.postgres.migrate with search_path set to the service's schema. Money itself
-- moves only in the wallet's ledger, through transfers whose ids derive from the ids here:
-- "mch:<charge id>" (and "mch:<charge id>:<n>" for the shares) for a charge,
-- "mrf:<refund key>" (and "mrf:<refund key>:<n>") for a refund.

CREATE TABLE merchants (
    id text PRIMARY KEY,
    name text NOT NULL,
    category text NOT NULL,
    country text NOT NULL,
    email text NOT NULL,
    -- Fingerprint of the Onboard payload (id, name, category, country, email).
    request_hash bytea NOT NULL CHECK (octet_length(request_hash) = 32),
    status text NOT NULL DEFAULT 'ONBOARDING',
    -- Set once the Connect account exists; never changes after that.
    stripe_account_id text UNIQUE,
    -- Set once the wallet has opened the merchant payable ("merchant:<id>").
    payable_account_id text,
    created_at timestamptz NOT NULL,
    verified_at timestamptz,
    CONSTRAINT merchants_id_format CHECK (id ~ '^[A-Za-z0-9_-]{1,40}$'),
    CONSTRAINT merchants_status_known CHECK (status IN ('ONBOARDING', 'VERIFIED', 'SUSPENDED')),
    CONSTRAINT merchants_verified_has_account CHECK (status <> 'VERIFIED'
        OR (verified_at IS NOT NULL AND stripe_account_id IS NOT NULL AND payable_account_id IS NOT NULL))
);

-- API keys: only the SHA-256 of the secret is kept; the secret is shown once.
CREATE TABLE api_keys (
    id text PRIMARY KEY,
    merchant_id text NOT NULL REFERENCES merchants (id),
    label text NOT NULL DEFAULT '',
    secret_prefix text NOT NULL,
    secret_hash bytea NOT NULL UNIQUE CHECK (octet_length(secret_hash) = 32),
    scopes text[] NOT NULL CHECK (cardinality(scopes) >= 1),
    created_at timestamptz NOT NULL,
    revoked_at timestamptz
);
CREATE INDEX api_keys_by_merchant ON api_keys (merchant_id);

-- Till charges. A PENDING row is a charge decided (limits checked, split fixed) whose wallet
-- batch has not been confirmed; a retry with the same order id finishes or removes it. A
-- refused charge leaves no row.
CREATE TABLE charges (
    id text PRIMARY KEY,
    merchant_id text NOT NULL REFERENCES merchants (id),
    order_id text NOT NULL,
    request_hash bytea NOT NULL CHECK (octet_length(request_hash) = 32),
    rider_account_id text NOT NULL,
    credential_kind text NOT NULL CHECK (credential_kind IN ('CARD', 'PHONE_QR', 'NFC', 'FACE')),
    amount_minor bigint NOT NULL CHECK (amount_minor > 0),
    currency text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    description text NOT NULL DEFAULT '',
    service_day date NOT NULL,
    status text NOT NULL,
    refunded_minor bigint NOT NULL DEFAULT 0,
    splits jsonb NOT NULL,
    transfer_id text NOT NULL,
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    UNIQUE (merchant_id, order_id),
    CONSTRAINT charges_status_known CHECK (status IN ('PENDING', 'SUCCEEDED', 'PARTIALLY_REFUNDED', 'REFUNDED')),
    CONSTRAINT charges_refunded_range CHECK (refunded_minor BETWEEN 0 AND amount_minor),
    CONSTRAINT charges_pending_not_refunded CHECK (status <> 'PENDING' OR refunded_minor = 0)
);
-- The per-day limit sums one rider's charges of one service day.
CREATE INDEX charges_by_rider_day ON charges (rider_account_id, service_day);

-- Refunds, idempotent on the merchant's refund id. PENDING: recorded (and counted against what
-- is left to refund) but the wallet batch not yet confirmed.
CREATE TABLE refunds (
    -- The order refunds were recorded in (their times come from the service's clock).
    seq bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    id text PRIMARY KEY,
    merchant_id text NOT NULL REFERENCES merchants (id),
    refund_id text NOT NULL,
    charge_id text NOT NULL REFERENCES charges (id),
    request_hash bytea NOT NULL CHECK (octet_length(request_hash) = 32),
    amount_minor bigint NOT NULL CHECK (amount_minor > 0),
    currency text NOT NULL,
    note text NOT NULL DEFAULT '',
    splits jsonb NOT NULL,
    transfer_id text NOT NULL,
    status text NOT NULL CHECK (status IN ('PENDING', 'SUCCEEDED')),
    created_at timestamptz NOT NULL,
    UNIQUE (merchant_id, refund_id)
);
CREATE INDEX refunds_by_charge ON refunds (charge_id, seq);

-- Stripe events already handled, with what was done: a redelivery is answered DUPLICATE.
CREATE TABLE stripe_webhook_events (
    event_id text PRIMARY KEY,
    event_type text NOT NULL,
    object_id text NOT NULL,
    outcome text NOT NULL,
    received_at timestamptz NOT NULL
);
