-- Settlement's own tables: split contracts, settlement lines, service days, payouts,
-- provider movements, reconciliation runs and exports.
--
-- Applied by libs.postgres.migrate with search_path set to settlement's schema, so no table
-- here names its schema. Contract versions and settlement lines are append-only: a recorded
-- split must stay explainable by the contract version it names, forever.

CREATE TABLE contracts (
    contract_id text NOT NULL,
    version integer NOT NULL,
    revenue_kind text NOT NULL,
    -- Transit operator party id for fares, merchant category code for merchant payments,
    -- '' for the default contract of the kind.
    scope text NOT NULL,
    effective_from timestamptz NOT NULL,
    -- [{party, party_id, basis_points, fixed_fee_minor, remainder}, ...] in term order.
    terms jsonb NOT NULL,
    currency text NOT NULL,
    note text NOT NULL DEFAULT '',
    -- Fingerprint of the CreateContractVersion request, for idempotent retries.
    request_hash bytea NOT NULL,
    created_at timestamptz NOT NULL,
    PRIMARY KEY (contract_id, version),
    CONSTRAINT contracts_id_format CHECK (contract_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    CONSTRAINT contracts_version_positive CHECK (version >= 1),
    CONSTRAINT contracts_kind_known CHECK (revenue_kind IN ('TRANSIT_FARE', 'MERCHANT_PAYMENT')),
    CONSTRAINT contracts_scope_length CHECK (length(scope) <= 64),
    CONSTRAINT contracts_note_length CHECK (length(note) <= 500)
);
-- One contract per revenue kind and scope: only version 1 claims the pair.
CREATE UNIQUE INDEX contracts_one_per_scope ON contracts (revenue_kind, scope) WHERE version = 1;
CREATE INDEX contracts_newest ON contracts (created_at DESC, contract_id, version DESC);

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the settlement table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;
CREATE TRIGGER contracts_append_only BEFORE UPDATE OR DELETE ON contracts
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

-- One row per share of a money movement. `service_day` is the day the movement happened in;
-- `settle_day` the day it is paid in: the same, unless its day was already closed when the
-- event arrived, in which case the first day still open after it.
CREATE TABLE settlement_lines (
    transfer_id text NOT NULL,
    line_no integer NOT NULL,
    service_day date NOT NULL,
    settle_day date NOT NULL,
    source_event_id text NOT NULL,
    revenue_kind text NOT NULL,
    transfer_kind text NOT NULL,
    occurred_at timestamptz NOT NULL,
    -- Signed: refunds and corrections are negative.
    gross_minor bigint NOT NULL,
    party text NOT NULL,
    party_id text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    contract_id text NOT NULL,
    contract_version integer NOT NULL,
    PRIMARY KEY (transfer_id, line_no),
    CONSTRAINT settlement_lines_party_known CHECK (party IN ('MERCHANT', 'TRANSIT_OPERATOR', 'CITY', 'PLATFORM')),
    CONSTRAINT settlement_lines_settle_not_before CHECK (settle_day >= service_day)
);
CREATE INDEX settlement_lines_by_settle_day ON settlement_lines (settle_day, party, party_id);
CREATE INDEX settlement_lines_by_service_day ON settlement_lines (service_day);
CREATE TRIGGER settlement_lines_append_only BEFORE UPDATE OR DELETE ON settlement_lines
    FOR EACH ROW EXECUTE FUNCTION refuse_change();

-- A service day: OPEN (taking lines), CLOSING (totals fixed, payouts being sent), CLOSED.
CREATE TABLE service_days (
    service_day date PRIMARY KEY,
    status text NOT NULL DEFAULT 'OPEN',
    closing_at timestamptz,
    closed_at timestamptz,
    line_count bigint,
    -- The serialized CloseDayResponse, returned unchanged when the day is closed again.
    result bytea,
    CONSTRAINT service_days_status_known CHECK (status IN ('OPEN', 'CLOSING', 'CLOSED')),
    CONSTRAINT service_days_closed_result CHECK ((status = 'CLOSED') = (result IS NOT NULL))
);

-- Each party's total for a closed day. net = lines + carry_in; paid is what went out;
-- carry_out = net - paid is added to the party's next closed day.
CREATE TABLE day_totals (
    service_day date NOT NULL REFERENCES service_days (service_day),
    party text NOT NULL,
    party_id text NOT NULL,
    currency text NOT NULL,
    lines_minor bigint NOT NULL,
    line_count bigint NOT NULL,
    gross_minor bigint NOT NULL,
    carry_in_minor bigint NOT NULL,
    paid_minor bigint NOT NULL,
    carry_out_minor bigint NOT NULL,
    PRIMARY KEY (service_day, party, party_id),
    CONSTRAINT day_totals_adds_up CHECK (lines_minor + carry_in_minor = paid_minor + carry_out_minor)
);
CREATE INDEX day_totals_by_party ON day_totals (party, party_id, service_day);

-- Stripe connected accounts of merchants, learned from the merchant service's events.
CREATE TABLE party_accounts (
    party text NOT NULL,
    party_id text NOT NULL,
    stripe_account_id text NOT NULL,
    updated_at timestamptz NOT NULL,
    PRIMARY KEY (party, party_id)
);

-- One payout per party per closed day. The payout id is the settlement batch id and the
-- Stripe idempotency key. The platform's own share stays in its Stripe balance: no payout.
CREATE TABLE payouts (
    payout_id text PRIMARY KEY,
    service_day date NOT NULL REFERENCES service_days (service_day),
    party text NOT NULL,
    party_id text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    stripe_account_id text NOT NULL DEFAULT '',
    status text NOT NULL,
    stripe_id text NOT NULL DEFAULT '',
    created_at timestamptz NOT NULL,
    sent_at timestamptz,
    UNIQUE (service_day, party, party_id),
    CONSTRAINT payouts_amount_positive CHECK (amount_minor > 0),
    CONSTRAINT payouts_status_known CHECK (status IN ('PENDING', 'SENT')),
    CONSTRAINT payouts_sent_has_id CHECK ((status = 'SENT') = (stripe_id <> ''))
);

-- Money that moved through Stripe, learned from the wallet's top-up events, for the
-- provider side of reconciliation. Signed: refunds are negative.
CREATE TABLE provider_movements (
    transfer_id text PRIMARY KEY,
    kind text NOT NULL,
    stripe_id text NOT NULL,
    reference_id text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    occurred_at timestamptz NOT NULL,
    service_day date NOT NULL,
    source_event_id text NOT NULL,
    CONSTRAINT provider_movements_kind_known CHECK (kind IN ('TOP_UP', 'TOP_UP_REFUND'))
);
CREATE INDEX provider_movements_by_day ON provider_movements (service_day);

CREATE TABLE reconciliations (
    reconciliation_id text PRIMARY KEY,
    service_day date NOT NULL,
    report_sha256 text NOT NULL,
    matched_count bigint NOT NULL,
    difference_count bigint NOT NULL,
    unexplained_count bigint NOT NULL,
    created_at timestamptz NOT NULL
);
CREATE INDEX reconciliations_by_day ON reconciliations (service_day, created_at);

CREATE TABLE reconciliation_differences (
    reconciliation_id text NOT NULL REFERENCES reconciliations (reconciliation_id),
    n integer NOT NULL,
    kind text NOT NULL,
    reference_id text NOT NULL,
    ledger_minor bigint,
    settlement_minor bigint,
    provider_minor bigint,
    currency text NOT NULL,
    cause text NOT NULL,
    explained boolean NOT NULL,
    PRIMARY KEY (reconciliation_id, n)
);

CREATE TABLE exports (
    export_id text PRIMARY KEY,
    request_hash bytea NOT NULL,
    -- The serialized ExportResponse.
    result bytea NOT NULL,
    created_at timestamptz NOT NULL
);
