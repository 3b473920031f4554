-- Phones that pay: registered devices and the keys the wallet certified for them.
--
-- Applied by libs.postgres.migrate with search_path set to the wallet's schema. A device is
-- registered once under the id the phone chose (RegisterDevice, idempotent on that id);
-- each key the wallet certifies for it is one row of device_keys, numbered by generation.
-- RotateDevice retires the current key and adds the next one; RevokeDevice retires the
-- current key and marks the device revoked. A retired key's fingerprint goes on the Redis
-- revocation set fare-gate reads (services/wallet/devices.py), rebuilt from these tables.
--
-- No NFC token is stored: only its keyed hash (HMAC-SHA256 under the wallet's card hash key),
-- and the random salt the token is derived from with that key, so a retried RegisterDevice
-- can answer with the same token.

CREATE TABLE devices (
    id text PRIMARY KEY,
    account_id text NOT NULL REFERENCES accounts (id),
    label text NOT NULL DEFAULT '',
    -- Fingerprint of the registration (account, first public key, label), for idempotent retries.
    request_hash bytea NOT NULL,
    status text NOT NULL,
    -- The generation of the key in force (the last one certified).
    key_generation integer NOT NULL,
    registered_at timestamptz NOT NULL,
    revoked_at timestamptz,
    revoke_note text NOT NULL DEFAULT '',
    CONSTRAINT devices_id_format CHECK (id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    CONSTRAINT devices_label_length CHECK (length(label) <= 64),
    CONSTRAINT devices_status_known CHECK (status IN ('ACTIVE', 'REVOKED')),
    CONSTRAINT devices_revoked_when CHECK ((status = 'REVOKED') = (revoked_at IS NOT NULL)),
    CONSTRAINT devices_generation_positive CHECK (key_generation >= 1)
);
CREATE INDEX devices_by_account ON devices (account_id, registered_at);

CREATE TABLE device_keys (
    device_id text NOT NULL REFERENCES devices (id),
    generation integer NOT NULL,
    -- The raw 32-byte Ed25519 public key the phone sent.
    public_key bytea NOT NULL,
    -- SHA-256 of public_key: how the revocation set names the key.
    key_fingerprint bytea NOT NULL,
    -- The serialized citytap.common.v1.DeviceCertificate the wallet issued for this key.
    certificate bytea NOT NULL,
    not_after timestamptz NOT NULL,
    -- The random salt the NFC token is derived from, and the token's keyed hash.
    nfc_token_salt bytea NOT NULL,
    nfc_token_hash bytea NOT NULL,
    certified_at timestamptz NOT NULL,
    -- Set when the key stops paying: ROTATED (a newer key took over) or REVOKED.
    retired_at timestamptz,
    retired_reason text,
    PRIMARY KEY (device_id, generation),
    CONSTRAINT device_keys_public_key_length CHECK (length(public_key) = 32),
    CONSTRAINT device_keys_fingerprint_length CHECK (length(key_fingerprint) = 32),
    CONSTRAINT device_keys_salt_length CHECK (length(nfc_token_salt) = 16),
    CONSTRAINT device_keys_token_hash_length CHECK (length(nfc_token_hash) = 32),
    CONSTRAINT device_keys_retired_reason CHECK (
        (retired_at IS NULL AND retired_reason IS NULL)
        OR (retired_at IS NOT NULL AND retired_reason IN ('ROTATED', 'REVOKED')))
);
-- One key, one device, ever: a key seen once is never certified again, even after rotation.
CREATE UNIQUE INDEX device_keys_one_public_key ON device_keys (public_key);
CREATE UNIQUE INDEX device_keys_one_nfc_token ON device_keys (nfc_token_hash);
-- What the revocation set is rebuilt from: retired keys whose certificate has not expired.
CREATE INDEX device_keys_retired ON device_keys (not_after) WHERE retired_at IS NOT NULL;
