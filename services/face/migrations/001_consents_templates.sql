-- The face service's records: consents, and encrypted face templates (never images).
--
-- Applied by libs.postgres.migrate with search_path set to the face schema, so no table here
-- names its schema.
--
-- A template row holds only AES-GCM ciphertext: the 128 float32 components of the
-- face_recognition descriptor, encrypted under the key named by key_id with a random 96-bit
-- nonce and the account id as associated data (so a ciphertext copied onto another account's
-- row fails to decrypt). There is at most one template per account: enrolling again replaces
-- it. `label` is the template's id in the in-memory approximate-nearest-neighbour index; a
-- replaced template keeps its label.

CREATE TABLE consents (
    consent_id text PRIMARY KEY,
    account_id text NOT NULL,
    purpose text NOT NULL,
    retention_days integer NOT NULL,
    channel text NOT NULL,
    notice_version text NOT NULL,
    given_at timestamptz NOT NULL,
    recorded_at timestamptz NOT NULL,
    -- Set when the rider deletes their face or the retention ends; a withdrawn consent no
    -- longer allows enrolment or matching.
    withdrawn_at timestamptz,
    -- Fingerprint of the RecordConsent request, for idempotent retries.
    request_hash bytea NOT NULL,
    CONSTRAINT consents_id_format CHECK (consent_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    CONSTRAINT consents_account_format CHECK (account_id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    CONSTRAINT consents_purpose_known CHECK (purpose IN ('TRANSIT_FARES', 'MERCHANT_PAYMENTS')),
    CONSTRAINT consents_retention_positive CHECK (retention_days > 0)
);
CREATE INDEX consents_active_by_account ON consents (account_id) WHERE withdrawn_at IS NULL;

CREATE TABLE templates (
    account_id text PRIMARY KEY,
    label bigint GENERATED ALWAYS AS IDENTITY UNIQUE,
    key_id text NOT NULL,
    nonce bytea NOT NULL,
    ciphertext bytea NOT NULL,
    enrolled_at timestamptz NOT NULL,
    -- The enrolment or the latest match; retention counts from here.
    last_used_at timestamptz NOT NULL,
    retain_until timestamptz NOT NULL,
    CONSTRAINT templates_nonce_size CHECK (octet_length(nonce) = 12),
    CONSTRAINT templates_ciphertext_size CHECK (octet_length(ciphertext) = 128 * 4 + 16)
);
CREATE INDEX templates_retain_until ON templates (retain_until);
CREATE INDEX templates_key_id ON templates (key_id);
