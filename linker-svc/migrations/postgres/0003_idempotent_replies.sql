-- First answers kept for retries of the same request (runtime::idempotency): found by the digest of
-- the client's request id, sealed with a key derived from the id itself (not stored), kept 24 hours.
CREATE TABLE idempotent_replies (
    org_id       TEXT NOT NULL,
    method       TEXT NOT NULL,
    request_key  TEXT NOT NULL,
    sealed       BYTEA NOT NULL,
    created_at   BIGINT NOT NULL,
    PRIMARY KEY (org_id, method, request_key)
);
CREATE INDEX idempotent_replies_age ON idempotent_replies(created_at);
