-- fare-gate's state: taps (with the answer each got), journeys, and each rider's fare state.
-- Every tap writes its rows and its outbox events in one transaction (see README.md).

-- Keys fare-gate generates once and keeps: the credential key that pseudonymizes card UIDs
-- when CITYTAP_FARE_GATE_CREDENTIAL_KEY is not set.
CREATE TABLE secrets (
    name text PRIMARY KEY,
    value bytea NOT NULL CHECK (octet_length(value) >= 32),
    created_at timestamptz NOT NULL DEFAULT now()
);

-- One row per recorded tap: its fingerprint (a retry must match it) and the answer it got.
-- Taps refused as malformed are not recorded; denials are.
CREATE TABLE taps (
    tap_id uuid PRIMARY KEY,
    request_hash bytea NOT NULL CHECK (octet_length(request_hash) = 32),
    gate_id text NOT NULL,
    stop_id text NOT NULL,
    direction smallint NOT NULL CHECK (direction IN (1, 2, 3)),
    route_id text,
    tapped_at timestamptz NOT NULL,
    credential_kind smallint NOT NULL,
    credential_hash bytea NOT NULL CHECK (octet_length(credential_hash) = 32),
    account_id text,
    decision smallint NOT NULL CHECK (decision IN (1, 2)),
    reason smallint NOT NULL,
    journey_id uuid,
    fare_charged_minor bigint NOT NULL DEFAULT 0 CHECK (fare_charged_minor >= 0),
    amount_held_minor bigint NOT NULL DEFAULT 0 CHECK (amount_held_minor >= 0),
    balance_minor bigint,
    currency text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now()
);
-- Double taps: the latest opened tap of a credential at a gate in a direction.
CREATE INDEX taps_openings ON taps (credential_hash, gate_id, direction, tapped_at DESC) WHERE decision = 1;
CREATE INDEX taps_account ON taps (account_id, tapped_at);

-- A journey: begun by an entry (hold for the maximum fare) and ended by an exit, or a whole
-- ride validated on board. At most one OPEN journey per account: that is anti-passback's
-- and concurrency's backstop even if the per-account lock were bypassed.
CREATE TABLE journeys (
    journey_id uuid PRIMARY KEY,
    account_id text NOT NULL,
    status text NOT NULL CHECK (status IN ('OPEN', 'COMPLETED', 'INCOMPLETE', 'UNRESOLVED')),
    network_id text NOT NULL,
    rider_category text,
    currency text NOT NULL,
    entry_tap_id uuid NOT NULL UNIQUE,
    entry_gate_id text NOT NULL,
    entry_stop_id text NOT NULL,
    route_id text,
    started_at timestamptz NOT NULL,
    hold_id text,
    amount_held_minor bigint NOT NULL DEFAULT 0 CHECK (amount_held_minor >= 0),
    incomplete_due_at timestamptz,
    exit_tap_id uuid UNIQUE,
    exit_gate_id text,
    exit_stop_id text,
    ended_at timestamptz,
    fare_minor bigint,
    fare_product_id text,
    transfer_id text,
    note text,
    closed_at timestamptz,
    created_at timestamptz NOT NULL DEFAULT now(),
    CHECK ((status = 'OPEN') = (closed_at IS NULL)),
    CHECK (status <> 'OPEN' OR (hold_id IS NOT NULL AND incomplete_due_at IS NOT NULL))
);
CREATE UNIQUE INDEX journeys_one_open_per_account ON journeys (account_id) WHERE status = 'OPEN';
CREATE INDEX journeys_due ON journeys (incomplete_due_at) WHERE status = 'OPEN';
CREATE INDEX journeys_account ON journeys (account_id, started_at);

-- What the fare engine needs between a rider's taps (services/fare_gate/fares/state.py):
-- cap counters and the open chain of legs a next leg may transfer from, as JSON.
CREATE TABLE rider_fare_states (
    account_id text PRIMARY KEY,
    state jsonb NOT NULL,
    feed_version text NOT NULL,
    last_transfer_id text,
    updated_at timestamptz NOT NULL DEFAULT now()
);
