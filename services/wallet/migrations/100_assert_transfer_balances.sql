-- The ledger's cross-check of a write, run by the database inside the transaction: the
-- balances the transfers' trigger computed must be those the domain planned (NULL: not
-- compared, as for a system account, whose balance the domain cannot know in advance). A
-- write whose COMMIT travels in the same round trip as its inserts (a hold's post: the hot
-- system accounts' row locks are then held only while the server runs the batch) cannot
-- check the returned balances in Python before the commit; this check, queued before the
-- COMMIT, aborts the transaction instead.
CREATE OR REPLACE FUNCTION assert_transfer_balances(ids text[], debit_after bigint[], credit_after bigint[])
RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    i int;
    row record;
BEGIN
    IF cardinality(ids) <> cardinality(debit_after) OR cardinality(ids) <> cardinality(credit_after) THEN
        RAISE EXCEPTION 'assert_transfer_balances: % ids, % debit and % credit balances',
            cardinality(ids), cardinality(debit_after), cardinality(credit_after)
            USING ERRCODE = 'internal_error';
    END IF;
    FOR i IN 1 .. coalesce(cardinality(ids), 0) LOOP
        SELECT debit_balance_after_minor, credit_balance_after_minor INTO row FROM transfers WHERE id = ids[i];
        IF NOT FOUND THEN
            RAISE EXCEPTION 'ledger drift: transfer % was not written', ids[i] USING ERRCODE = 'internal_error';
        END IF;
        IF (debit_after[i] IS NOT NULL AND row.debit_balance_after_minor <> debit_after[i])
           OR (credit_after[i] IS NOT NULL AND row.credit_balance_after_minor <> credit_after[i]) THEN
            RAISE EXCEPTION 'ledger drift on %: database %/%, planned %/%', ids[i],
                row.debit_balance_after_minor, row.credit_balance_after_minor, debit_after[i], credit_after[i]
                USING ERRCODE = 'internal_error';
        END IF;
    END LOOP;
END
$$;
