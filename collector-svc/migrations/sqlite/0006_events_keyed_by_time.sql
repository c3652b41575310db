-- An event is keyed by its instance, its id and its time (a retry resends all three, so it is
-- stored once). PostgreSQL partitions events by day of occurred_at, and a partitioned table's key
-- must hold the partition column; SQLite keys them the same way so both backends de-duplicate alike.
CREATE TABLE events_by_time (
    instance_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    occurred_at INTEGER NOT NULL,
    org_id TEXT NOT NULL,
    location TEXT NOT NULL,
    kind INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    subject TEXT,
    consent_version INTEGER NOT NULL,
    policy_revision INTEGER NOT NULL,
    body BLOB,
    PRIMARY KEY (instance_id, event_id, occurred_at)
) WITHOUT ROWID;
INSERT INTO events_by_time (instance_id, event_id, occurred_at, org_id, location, kind, stored_at,
    name, value, subject, consent_version, policy_revision, body)
SELECT instance_id, event_id, occurred_at, org_id, location, kind, stored_at, name, value, subject,
    consent_version, policy_revision, body FROM events;
DROP TABLE events;
ALTER TABLE events_by_time RENAME TO events;
CREATE INDEX events_by_name ON events (instance_id, kind, name, occurred_at);
CREATE INDEX events_by_subject ON events (instance_id, subject) WHERE subject IS NOT NULL;
CREATE INDEX events_by_org ON events (org_id, occurred_at);
