-- A transfer's seq is drawn after its balance updates, that is after it holds both accounts'
-- row locks. System accounts are no longer locked before the insert (the row lock of a hot
-- revenue account is taken by these updates), so a seq drawn earlier, with the row's
-- defaults, could order two concurrent transfers of one account differently from the order
-- their balance changes happened in, and the running balance in history would disagree with
-- the balance. Drawn here, each account's transfers are numbered in the order it changed.
CREATE OR REPLACE FUNCTION transfers_apply() RETURNS trigger LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
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
    NEW.seq := nextval(pg_get_serial_sequence('transfers', 'seq'));
    RETURN NEW;
END
$$;
