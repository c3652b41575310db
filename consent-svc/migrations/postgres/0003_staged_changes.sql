-- Changes written but not applied yet: each waits for its audit entry (the commit point) and is then
-- applied or discarded (runtime::audited). A staged change has no effect on any policy.
CREATE TABLE staged_changes (
    change_id  TEXT PRIMARY KEY,
    org_id     TEXT NOT NULL,
    -- The audit entry, JSON.
    entry      TEXT NOT NULL,
    -- The change and its purge, JSON.
    payload    TEXT NOT NULL,
    staged_at  BIGINT NOT NULL
);
CREATE INDEX staged_changes_org ON staged_changes(org_id, staged_at);
