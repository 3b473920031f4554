-- The wallet's ledger of record: accounts, immutable transfers, holds, cards.
--
-- Applied by libs.postgres.migrate with search_path set to the wallet's schema, so no table
-- here names its schema. Trigger functions capture that search_path (SET search_path FROM
-- CURRENT) so they find these tables whatever the calling session's search_path is.
--
-- Invariants the database enforces on its own, whatever the application does:
--   * transfers, transfer_splits, holds and hold_resolutions are append-only;
--   * balances change only by inserting a transfer, which debits and credits the same
--     amount in one statement, so the sum of all balances stays zero; pending columns
--     change only by inserting a hold or its resolution;
--   * an account with a floor never has balance - pending debits below it;
--   * a transfer or hold moves one currency between two distinct accounts of that currency;
--   * a hold is resolved (posted, voided or expired) at most once (hold_resolutions' key);
--     it is posted only before its expiry, expires only after it, and posts at most its amount.

CREATE TABLE accounts (
    id text PRIMARY KEY,
    kind text NOT NULL,
    currency text NOT NULL,
    -- NULL: no floor (system accounts). Otherwise 0, or a negative allowance for riders.
    floor_minor bigint,
    -- Credits minus debits of posted transfers.
    balance_minor bigint NOT NULL DEFAULT 0,
    -- Sums of the pending holds debiting / crediting this account.
    pending_debits_minor bigint NOT NULL DEFAULT 0,
    pending_credits_minor bigint NOT NULL DEFAULT 0,
    rider_category text NOT NULL DEFAULT '',
    category_expires_at timestamptz,
    owner_id text NOT NULL DEFAULT '',
    status text NOT NULL DEFAULT 'ACTIVE',
    block_reason text,
    block_note text NOT NULL DEFAULT '',
    status_changed_at timestamptz,
    -- Fingerprint of the CreateAccount request, for idempotent retries.
    request_hash bytea NOT NULL,
    created_at timestamptz NOT NULL,
    CONSTRAINT accounts_id_format CHECK (id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    CONSTRAINT accounts_kind_known CHECK (kind IN ('RIDER_WALLET', 'OPERATOR_REVENUE', 'CITY_REVENUE',
        'PLATFORM_FEES', 'MERCHANT_PAYABLE', 'STRIPE_CLEARING', 'SUSPENSE')),
    CONSTRAINT accounts_currency_format CHECK (currency ~ '^[A-Z]{3}$'),
    CONSTRAINT accounts_floor_by_kind CHECK ((floor_minor IS NULL) = (kind NOT IN ('RIDER_WALLET', 'MERCHANT_PAYABLE'))),
    CONSTRAINT accounts_floor_not_positive CHECK (floor_minor IS NULL OR floor_minor <= 0),
    CONSTRAINT accounts_pending_not_negative CHECK (pending_debits_minor >= 0 AND pending_credits_minor >= 0),
    CONSTRAINT accounts_floor_respected CHECK (floor_minor IS NULL OR balance_minor - pending_debits_minor >= floor_minor),
    CONSTRAINT accounts_status_known CHECK (status IN ('ACTIVE', 'BLOCKED')),
    CONSTRAINT accounts_block_reason CHECK ((status = 'BLOCKED') = (block_reason IS NOT NULL)),
    CONSTRAINT accounts_block_reason_known CHECK (block_reason IN ('LOST_OR_STOLEN', 'UNPAID_FARES',
        'FRAUD_SUSPECTED', 'STAFF_DECISION')),
    CONSTRAINT accounts_category_only_riders CHECK (rider_category = '' OR kind = 'RIDER_WALLET'),
    CONSTRAINT accounts_category_expiry CHECK (category_expires_at IS NULL OR rider_category <> ''),
    CONSTRAINT accounts_owner_only_merchants CHECK ((owner_id <> '') = (kind = 'MERCHANT_PAYABLE')),
    -- Target of the (account, currency) foreign keys that keep transfers single-currency.
    CONSTRAINT accounts_id_currency UNIQUE (id, currency)
);
CREATE INDEX accounts_blocked ON accounts (id) WHERE status = 'BLOCKED';

CREATE TABLE holds (
    id text PRIMARY KEY,
    debit_account_id text NOT NULL,
    credit_account_id text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    kind text NOT NULL,
    reference text NOT NULL DEFAULT '',
    request_hash bytea NOT NULL,
    created_at timestamptz NOT NULL,
    expires_at timestamptz NOT NULL,
    CONSTRAINT holds_id_format CHECK (id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    CONSTRAINT holds_amount_positive CHECK (amount_minor > 0),
    CONSTRAINT holds_accounts_differ CHECK (debit_account_id <> credit_account_id),
    CONSTRAINT holds_kind_known CHECK (kind IN ('FARE', 'MERCHANT_PAYMENT', 'MERCHANT_REFUND', 'CORRECTION',
        'PAYOUT', 'FEE')),
    CONSTRAINT holds_expiry_after_creation CHECK (expires_at > created_at),
    CONSTRAINT holds_reference_length CHECK (length(reference) <= 128),
    CONSTRAINT holds_debit_account FOREIGN KEY (debit_account_id, currency) REFERENCES accounts (id, currency),
    CONSTRAINT holds_credit_account FOREIGN KEY (credit_account_id, currency) REFERENCES accounts (id, currency)
);

-- The work queue of holds still pending: a row appears with its hold and disappears with its
-- resolution, both by trigger only. The sweeper and lazy expiry find due holds here.
CREATE TABLE pending_holds (
    hold_id text PRIMARY KEY REFERENCES holds (id),
    debit_account_id text NOT NULL,
    credit_account_id text NOT NULL,
    amount_minor bigint NOT NULL,
    expires_at timestamptz NOT NULL
);
CREATE INDEX pending_holds_due ON pending_holds (expires_at);
CREATE INDEX pending_holds_by_debit ON pending_holds (debit_account_id, expires_at);

CREATE TABLE transfers (
    -- Application order: per account, seq follows the order balances changed in.
    seq bigint GENERATED ALWAYS AS IDENTITY,
    id text PRIMARY KEY,
    debit_account_id text NOT NULL,
    credit_account_id text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    kind text NOT NULL,
    -- The hold this transfer posted; its id is the hold's id.
    hold_id text REFERENCES holds (id),
    corrects_transfer_id text REFERENCES transfers (id),
    reference text NOT NULL DEFAULT '',
    request_hash bytea NOT NULL,
    -- Each side's balance right after this transfer; set by the trigger, never by the caller.
    debit_balance_after_minor bigint NOT NULL DEFAULT 0,
    credit_balance_after_minor bigint NOT NULL DEFAULT 0,
    posted_at timestamptz NOT NULL,
    CONSTRAINT transfers_seq_unique UNIQUE (seq),
    CONSTRAINT transfers_id_format CHECK (id ~ '^[A-Za-z0-9._:-]{1,64}$'),
    CONSTRAINT transfers_amount_positive CHECK (amount_minor > 0),
    CONSTRAINT transfers_accounts_differ CHECK (debit_account_id <> credit_account_id),
    CONSTRAINT transfers_kind_known CHECK (kind IN ('FARE', 'MERCHANT_PAYMENT', 'MERCHANT_REFUND', 'TOP_UP',
        'TOP_UP_REFUND', 'CORRECTION', 'PAYOUT', 'FEE')),
    CONSTRAINT transfers_reference_length CHECK (length(reference) <= 128),
    CONSTRAINT transfers_hold_posted_once UNIQUE (hold_id),
    CONSTRAINT transfers_hold_id_is_id CHECK (hold_id IS NULL OR hold_id = id),
    CONSTRAINT transfers_debit_account FOREIGN KEY (debit_account_id, currency) REFERENCES accounts (id, currency),
    CONSTRAINT transfers_credit_account FOREIGN KEY (credit_account_id, currency) REFERENCES accounts (id, currency)
);
CREATE INDEX transfers_by_debit ON transfers (debit_account_id, seq);
CREATE INDEX transfers_by_credit ON transfers (credit_account_id, seq);

CREATE TABLE transfer_splits (
    transfer_id text NOT NULL REFERENCES transfers (id),
    line_no integer NOT NULL,
    party text NOT NULL,
    party_id text NOT NULL,
    amount_minor bigint NOT NULL,
    currency text NOT NULL,
    contract_id text NOT NULL,
    contract_version integer NOT NULL,
    PRIMARY KEY (transfer_id, line_no),
    CONSTRAINT transfer_splits_party_known CHECK (party IN ('MERCHANT', 'TRANSIT_OPERATOR', 'CITY', 'PLATFORM')),
    CONSTRAINT transfer_splits_amount_not_negative CHECK (amount_minor >= 0),
    CONSTRAINT transfer_splits_version_positive CHECK (contract_version >= 1)
);

-- One row per resolved hold. Its primary key is the database's guarantee that no hold is
-- posted, voided or expired twice.
CREATE TABLE hold_resolutions (
    hold_id text PRIMARY KEY REFERENCES holds (id),
    outcome text NOT NULL,
    posted_amount_minor bigint,
    transfer_id text UNIQUE,
    -- Fingerprint of the PostHold request (resolved amount and splits), for idempotent retries.
    request_hash bytea,
    resolved_at timestamptz NOT NULL,
    CONSTRAINT hold_resolutions_outcome_known CHECK (outcome IN ('POSTED', 'VOIDED', 'EXPIRED')),
    CONSTRAINT hold_resolutions_posted_fields CHECK ((outcome = 'POSTED') = (posted_amount_minor IS NOT NULL
        AND transfer_id IS NOT NULL AND request_hash IS NOT NULL)),
    CONSTRAINT hold_resolutions_posted_positive CHECK (posted_amount_minor IS NULL OR posted_amount_minor > 0),
    -- The posting transfer is inserted right after its resolution, in the same transaction.
    CONSTRAINT hold_resolutions_transfer FOREIGN KEY (transfer_id) REFERENCES transfers (id)
        DEFERRABLE INITIALLY DEFERRED
);

CREATE TABLE cards (
    id text PRIMARY KEY,
    account_id text NOT NULL REFERENCES accounts (id),
    -- HMAC-SHA256 of the card UID under the wallet's card hash key; the UID is never stored.
    card_hash bytea NOT NULL,
    label text NOT NULL DEFAULT '',
    linked_at timestamptz NOT NULL,
    unlinked_at timestamptz,
    CONSTRAINT cards_hash_length CHECK (length(card_hash) = 32),
    CONSTRAINT cards_label_length CHECK (length(label) <= 64),
    CONSTRAINT cards_unlinked_after_linked CHECK (unlinked_at IS NULL OR unlinked_at >= linked_at)
);
-- One card, one account: a card hash has at most one live link.
CREATE UNIQUE INDEX cards_one_live_link ON cards (card_hash) WHERE unlinked_at IS NULL;
CREATE INDEX cards_by_account ON cards (account_id, linked_at);

-- --- triggers ---------------------------------------------------------------------------

CREATE FUNCTION refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'the ledger table % is append-only: % refused', TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'integrity_constraint_violation';
END
$$;

CREATE TRIGGER transfers_append_only BEFORE UPDATE OR DELETE ON transfers
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER transfers_no_truncate BEFORE TRUNCATE ON transfers
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER transfer_splits_append_only BEFORE UPDATE OR DELETE ON transfer_splits
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER transfer_splits_no_truncate BEFORE TRUNCATE ON transfer_splits
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER holds_append_only BEFORE UPDATE OR DELETE ON holds
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER holds_no_truncate BEFORE TRUNCATE ON holds
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();
CREATE TRIGGER hold_resolutions_append_only BEFORE UPDATE OR DELETE ON hold_resolutions
    FOR EACH ROW EXECUTE FUNCTION refuse_change();
CREATE TRIGGER hold_resolutions_no_truncate BEFORE TRUNCATE ON hold_resolutions
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- Accounts open empty, are never deleted, keep their identity, and change balances only
-- from inside the ledger triggers below (trigger depth >= 2).
CREATE FUNCTION accounts_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'accounts are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'INSERT' THEN
        IF NEW.balance_minor <> 0 OR NEW.pending_debits_minor <> 0 OR NEW.pending_credits_minor <> 0 THEN
            RAISE EXCEPTION 'accounts open with zero balances' USING ERRCODE = 'integrity_constraint_violation';
        END IF;
        RETURN NEW;
    END IF;
    IF NEW.id <> OLD.id OR NEW.kind <> OLD.kind OR NEW.currency <> OLD.currency
       OR NEW.floor_minor IS DISTINCT FROM OLD.floor_minor OR NEW.owner_id <> OLD.owner_id
       OR NEW.request_hash <> OLD.request_hash OR NEW.created_at <> OLD.created_at THEN
        RAISE EXCEPTION 'an account''s identity, kind, currency and floor never change'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF pg_trigger_depth() < 2 AND (NEW.balance_minor <> OLD.balance_minor
       OR NEW.pending_debits_minor <> OLD.pending_debits_minor
       OR NEW.pending_credits_minor <> OLD.pending_credits_minor) THEN
        RAISE EXCEPTION 'balances change only by posting transfers and holds'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER accounts_guard BEFORE INSERT OR UPDATE OR DELETE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_guard();
CREATE TRIGGER accounts_no_truncate BEFORE TRUNCATE ON accounts
    FOR EACH STATEMENT EXECUTE FUNCTION refuse_change();

-- pending_holds is maintained by the hold triggers only.
CREATE FUNCTION pending_holds_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'pending_holds changes only with holds and their resolutions'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER pending_holds_guard BEFORE INSERT OR UPDATE OR DELETE ON pending_holds
    FOR EACH ROW EXECUTE FUNCTION pending_holds_guard();

-- A transfer moves its amount: debit side down, credit side up, in one statement. A transfer
-- that posts a hold must match that hold's POSTED resolution exactly.
CREATE FUNCTION transfers_apply() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    posting record;
BEGIN
    IF NEW.hold_id IS NOT NULL THEN
        SELECT h.debit_account_id, h.credit_account_id, h.kind, r.outcome, r.posted_amount_minor,
               r.transfer_id
          INTO posting
          FROM holds h LEFT JOIN hold_resolutions r ON r.hold_id = h.id
         WHERE h.id = NEW.hold_id;
        IF NOT FOUND OR posting.outcome IS DISTINCT FROM 'POSTED' OR posting.transfer_id <> NEW.id
           OR posting.posted_amount_minor <> NEW.amount_minor OR posting.kind <> NEW.kind
           OR posting.debit_account_id <> NEW.debit_account_id
           OR posting.credit_account_id <> NEW.credit_account_id THEN
            RAISE EXCEPTION 'transfer % does not match the posting of hold %', NEW.id, NEW.hold_id
                USING ERRCODE = 'integrity_constraint_violation';
        END IF;
    END IF;
    UPDATE accounts SET balance_minor = balance_minor - NEW.amount_minor
     WHERE id = NEW.debit_account_id AND currency = NEW.currency
    RETURNING balance_minor INTO NEW.debit_balance_after_minor;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no % account %', NEW.currency, NEW.debit_account_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    UPDATE accounts SET balance_minor = balance_minor + NEW.amount_minor
     WHERE id = NEW.credit_account_id AND currency = NEW.currency
    RETURNING balance_minor INTO NEW.credit_balance_after_minor;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'no % account %', NEW.currency, NEW.credit_account_id USING ERRCODE = 'foreign_key_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER transfers_apply BEFORE INSERT ON transfers
    FOR EACH ROW EXECUTE FUNCTION transfers_apply();

-- A new hold reserves its amount on the debit side and announces it on the credit side.
CREATE FUNCTION holds_reserve() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE accounts SET pending_debits_minor = pending_debits_minor + NEW.amount_minor
     WHERE id = NEW.debit_account_id;
    UPDATE accounts SET pending_credits_minor = pending_credits_minor + NEW.amount_minor
     WHERE id = NEW.credit_account_id;
    INSERT INTO pending_holds (hold_id, debit_account_id, credit_account_id, amount_minor, expires_at)
    VALUES (NEW.id, NEW.debit_account_id, NEW.credit_account_id, NEW.amount_minor, NEW.expires_at);
    RETURN NULL;
END
$$;
CREATE TRIGGER holds_reserve AFTER INSERT ON holds
    FOR EACH ROW EXECUTE FUNCTION holds_reserve();

-- Resolving a hold releases its reservation, once. Posting is allowed only before the
-- expiry and for at most the held amount; expiring only once the expiry has come.
CREATE FUNCTION hold_resolutions_release() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    hold record;
BEGIN
    SELECT h.id, h.debit_account_id, h.credit_account_id, h.amount_minor, h.expires_at
      INTO hold
      FROM pending_holds p JOIN holds h ON h.id = p.hold_id
     WHERE p.hold_id = NEW.hold_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'hold % is not pending: it was already resolved or never placed', NEW.hold_id
            USING ERRCODE = 'unique_violation', CONSTRAINT = 'hold_resolutions_pkey';
    END IF;
    IF NEW.outcome = 'POSTED' AND (NEW.resolved_at >= hold.expires_at OR NEW.posted_amount_minor > hold.amount_minor
       OR NEW.transfer_id <> NEW.hold_id) THEN
        RAISE EXCEPTION 'hold % cannot be posted: expired, or more than held', NEW.hold_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'hold_resolutions_post_allowed';
    END IF;
    IF NEW.outcome = 'EXPIRED' AND NEW.resolved_at < hold.expires_at THEN
        RAISE EXCEPTION 'hold % has not expired yet', NEW.hold_id
            USING ERRCODE = 'check_violation', CONSTRAINT = 'hold_resolutions_expiry_due';
    END IF;
    UPDATE accounts SET pending_debits_minor = pending_debits_minor - hold.amount_minor
     WHERE id = hold.debit_account_id;
    UPDATE accounts SET pending_credits_minor = pending_credits_minor - hold.amount_minor
     WHERE id = hold.credit_account_id;
    DELETE FROM pending_holds WHERE hold_id = NEW.hold_id;
    RETURN NEW;
END
$$;
CREATE TRIGGER hold_resolutions_release BEFORE INSERT ON hold_resolutions
    FOR EACH ROW EXECUTE FUNCTION hold_resolutions_release();

-- A card link changes once: from live to unlinked.
CREATE FUNCTION cards_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        RAISE EXCEPTION 'card links are never deleted' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    IF NEW.id <> OLD.id OR NEW.account_id <> OLD.account_id OR NEW.card_hash <> OLD.card_hash
       OR NEW.linked_at <> OLD.linked_at OR OLD.unlinked_at IS NOT NULL THEN
        RAISE EXCEPTION 'a card link only changes by being unlinked, once'
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END
$$;
CREATE TRIGGER cards_guard BEFORE UPDATE OR DELETE ON cards
    FOR EACH ROW EXECUTE FUNCTION cards_guard();
