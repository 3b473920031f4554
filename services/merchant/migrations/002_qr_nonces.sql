-- Phone QR codes pay once: the nonce of every code a charge accepted, kept until the code
-- could no longer pass verification anyway (its validity plus the clock skew, both ways).
-- Written in the same transaction as the charge it paid for, so a refused charge leaves none.
CREATE TABLE qr_nonces (
    nonce bytea PRIMARY KEY CHECK (octet_length(nonce) BETWEEN 16 AND 64),
    charge_id text NOT NULL,
    forget_at timestamptz NOT NULL
);
CREATE INDEX qr_nonces_forget_at ON qr_nonces (forget_at);
