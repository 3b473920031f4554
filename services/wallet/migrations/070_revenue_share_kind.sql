-- Transfers of kind REVENUE_SHARE: one party's share of a payment, moved from the account the
-- payment credited (operator revenue, a merchant payable) to the party's account, posted in
-- the same transaction as the payment (PostHold's linked transfers, or a linked batch).
ALTER TABLE transfers DROP CONSTRAINT transfers_kind_known;
ALTER TABLE transfers ADD CONSTRAINT transfers_kind_known CHECK (kind IN ('FARE', 'MERCHANT_PAYMENT',
    'MERCHANT_REFUND', 'TOP_UP', 'TOP_UP_REFUND', 'CORRECTION', 'PAYOUT', 'FEE', 'REVENUE_SHARE'));
