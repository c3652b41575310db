-- Contributed aggregates: the epsilon each org's data has been charged in all (kept in the store of
-- the global location).
CREATE TABLE epsilon_ledger (
    org_id TEXT PRIMARY KEY,
    spent DOUBLE PRECISION NOT NULL,
    updated_at BIGINT NOT NULL
);
