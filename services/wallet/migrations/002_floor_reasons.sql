-- Split the floor CHECK in two, so a refusal by the database itself (the backstop behind the
-- service's own check) names the same reason the service gives: a zero floor refuses with
-- INSUFFICIENT_FUNDS, a negative allowance that ran out with FLOOR_BREACH.
ALTER TABLE accounts
    ADD CONSTRAINT accounts_floor_zero_respected
        CHECK (floor_minor IS NULL OR floor_minor < 0 OR balance_minor - pending_debits_minor >= floor_minor),
    ADD CONSTRAINT accounts_floor_allowance_respected
        CHECK (floor_minor IS NULL OR floor_minor = 0 OR balance_minor - pending_debits_minor >= floor_minor),
    DROP CONSTRAINT accounts_floor_respected;
