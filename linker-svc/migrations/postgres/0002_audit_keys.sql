-- Idempotency keys of audit entries: the change each entry records. A key with a seq is in the log;
-- a fenced key (seq NULL) never will be, so a service that could not tell whether its append landed
-- can settle its change either way.
CREATE TABLE audit_keys (
    org_id           TEXT NOT NULL REFERENCES orgs(id),
    idempotency_key  TEXT NOT NULL,
    seq              BIGINT,
    fenced_at        BIGINT,
    PRIMARY KEY (org_id, idempotency_key)
);
