-- System accounts (ids 'system:...') keep no pending sums. They have no floor and no
-- stored-value limit, so nothing reads those sums, while keeping them made every hold and
-- every post write the operator revenue row that every fare credits: the busiest row of the
-- ledger. Holds still reserve on the rider side, and pending_holds still lists every pending
-- hold, whatever its accounts.
CREATE OR REPLACE FUNCTION holds_reserve() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE accounts SET pending_debits_minor = pending_debits_minor + NEW.amount_minor
     WHERE id = NEW.debit_account_id AND id NOT LIKE 'system:%';
    UPDATE accounts SET pending_credits_minor = pending_credits_minor + NEW.amount_minor
     WHERE id = NEW.credit_account_id AND id NOT LIKE 'system:%';
    INSERT INTO pending_holds (hold_id, debit_account_id, credit_account_id, amount_minor, expires_at)
    VALUES (NEW.id, NEW.debit_account_id, NEW.credit_account_id, NEW.amount_minor, NEW.expires_at);
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION hold_resolutions_release() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
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
     WHERE id = hold.debit_account_id AND id NOT LIKE 'system:%';
    UPDATE accounts SET pending_credits_minor = pending_credits_minor - hold.amount_minor
     WHERE id = hold.credit_account_id AND id NOT LIKE 'system:%';
    DELETE FROM pending_holds WHERE hold_id = NEW.hold_id;
    RETURN NEW;
END
$$;

-- What system accounts announced until now: cleared once, under the guard that otherwise
-- lets balances change only through the triggers.
ALTER TABLE accounts DISABLE TRIGGER accounts_guard;
UPDATE accounts SET pending_debits_minor = 0, pending_credits_minor = 0
 WHERE id LIKE 'system:%' AND (pending_debits_minor <> 0 OR pending_credits_minor <> 0);
ALTER TABLE accounts ENABLE TRIGGER accounts_guard;
