-- Top-ups through Stripe: top-ups, their refunds, processed webhook events, auto-reload.
--
-- Applied by libs.postgres.migrate with search_path set to the wallet's schema. These tables
-- hold the state of the Stripe flow; money itself moves only in the ledger (001_ledger.sql),
-- through transfers whose ids derive from the ids here: "tu:<top_up_id>" credits a top-up,
-- "tur:<refund_id>" debits a refund, "tuc:<refund_id>" undoes a refund Stripe refused.
-- Unlike the ledger these rows change state (PENDING -> SUCCEEDED ...); the constraints
-- below keep every state consistent with what the ledger can have done.

CREATE TABLE top_ups (
    id text PRIMARY KEY,
    account_id text NOT NULL REFERENCES accounts (id),
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    -- RIDER: started by TopUp; AUTO_RELOAD: started by the auto-reload worker.
    origin text NOT NULL,
    status text NOT NULL,
    -- Fingerprint of the request (account, amount, currency), for idempotent retries.
    request_hash bytea NOT NULL,
    -- Set once the PaymentIntent exists; never changes after that.
    payment_intent_id text UNIQUE,
    -- The PaymentIntent's client secret, kept so a retried TopUp returns the same one
    -- without asking Stripe again (rider top-ups only). It lets the rider's app pay this one
    -- intent; it is not a card credential.
    client_secret text,
    -- The saved card an auto-reload charges.
    stripe_customer_id text,
    stripe_payment_method_id text,
    -- The ledger transfer that credited the wallet ("tu:<id>"); set exactly when credited.
    transfer_id text,
    refunded_amount_minor bigint NOT NULL DEFAULT 0,
    failure_code text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    CONSTRAINT top_ups_id_format CHECK (id ~ '^[A-Za-z0-9._:-]{1,60}$'),
    CONSTRAINT top_ups_amount_positive CHECK (amount_minor > 0),
    CONSTRAINT top_ups_currency_format CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT top_ups_origin_known CHECK (origin IN ('RIDER', 'AUTO_RELOAD')),
    CONSTRAINT top_ups_status_known CHECK (status IN ('PENDING', 'SUCCEEDED', 'FAILED', 'OVER_LIMIT',
        'PARTIALLY_REFUNDED', 'REFUNDED')),
    CONSTRAINT top_ups_refunded_range CHECK (refunded_amount_minor BETWEEN 0 AND amount_minor),
    CONSTRAINT top_ups_credited_has_transfer CHECK (
        (status IN ('SUCCEEDED', 'PARTIALLY_REFUNDED') AND transfer_id IS NOT NULL)
        OR (status IN ('PENDING', 'FAILED', 'OVER_LIMIT') AND transfer_id IS NULL)
        OR status = 'REFUNDED'),
    CONSTRAINT top_ups_paid_has_intent CHECK (status IN ('PENDING', 'FAILED') OR payment_intent_id IS NOT NULL),
    CONSTRAINT top_ups_auto_reload_card CHECK (origin <> 'AUTO_RELOAD'
        OR (stripe_customer_id IS NOT NULL AND stripe_payment_method_id IS NOT NULL))
);
-- Pending top-ups count against the stored-value limit; the worker finds unsent ones.
CREATE INDEX top_ups_pending_by_account ON top_ups (account_id, created_at) WHERE status = 'PENDING';
CREATE INDEX top_ups_over_limit ON top_ups (updated_at) WHERE status = 'OVER_LIMIT';

CREATE TABLE top_up_refunds (
    id text PRIMARY KEY,
    top_up_id text NOT NULL REFERENCES top_ups (id),
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    -- RESERVED -> DEBITING -> DEBITED -> SUCCEEDED, or -> FAILED (from RESERVED/DEBITING:
    -- nothing moved; through REVERSING: Stripe refused and the debit was corrected).
    state text NOT NULL,
    request_hash bytea NOT NULL,
    note text NOT NULL DEFAULT '',
    debit_transfer_id text,
    reversal_transfer_id text,
    stripe_refund_id text UNIQUE,
    failure_reason text NOT NULL DEFAULT '',
    failure_code text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    CONSTRAINT top_up_refunds_id_format CHECK (id ~ '^[A-Za-z0-9._:-]{1,60}$'),
    CONSTRAINT top_up_refunds_amount_positive CHECK (amount_minor > 0),
    CONSTRAINT top_up_refunds_state_known CHECK (state IN ('RESERVED', 'DEBITING', 'DEBITED', 'REVERSING',
        'SUCCEEDED', 'FAILED')),
    CONSTRAINT top_up_refunds_debited_has_transfer CHECK (state NOT IN ('DEBITED', 'SUCCEEDED', 'REVERSING')
        OR debit_transfer_id IS NOT NULL),
    CONSTRAINT top_up_refunds_succeeded_has_stripe_id CHECK (state <> 'SUCCEEDED' OR stripe_refund_id IS NOT NULL),
    CONSTRAINT top_up_refunds_note_length CHECK (length(note) <= 500)
);
CREATE INDEX top_up_refunds_by_top_up ON top_up_refunds (top_up_id);
CREATE INDEX top_up_refunds_open ON top_up_refunds (updated_at)
    WHERE state IN ('RESERVED', 'DEBITING', 'DEBITED', 'REVERSING');

-- Every Stripe event handled, by its id: a redelivered event is acknowledged and skipped.
CREATE TABLE stripe_webhook_events (
    event_id text PRIMARY KEY,
    event_type text NOT NULL,
    object_id text NOT NULL DEFAULT '',
    top_up_id text,
    -- What the handling did: CREDITED, ALREADY_CREDITED, MARKED_FAILED, UNKNOWN_TOP_UP, ...
    outcome text NOT NULL,
    received_at timestamptz NOT NULL
);
CREATE INDEX stripe_webhook_events_by_top_up ON stripe_webhook_events (top_up_id) WHERE top_up_id IS NOT NULL;

-- A rider's auto-reload: below the threshold, charge the saved card, once a service day.
CREATE TABLE auto_reloads (
    account_id text PRIMARY KEY REFERENCES accounts (id),
    threshold_minor bigint NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    stripe_customer_id text NOT NULL,
    stripe_payment_method_id text NOT NULL,
    enabled boolean NOT NULL,
    updated_at timestamptz NOT NULL,
    CONSTRAINT auto_reloads_threshold_positive CHECK (threshold_minor > 0),
    CONSTRAINT auto_reloads_amount_positive CHECK (amount_minor > 0)
);
CREATE INDEX auto_reloads_enabled ON auto_reloads (account_id) WHERE enabled;

-- One row per auto-reload charge; the key is the guarantee of at most one per service day.
CREATE TABLE auto_reload_runs (
    account_id text NOT NULL REFERENCES accounts (id),
    service_day date NOT NULL,
    top_up_id text NOT NULL UNIQUE REFERENCES top_ups (id),
    created_at timestamptz NOT NULL,
    PRIMARY KEY (account_id, service_day)
);
