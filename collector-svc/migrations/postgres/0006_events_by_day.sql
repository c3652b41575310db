-- Events partitioned by day (UTC) of occurred_at, so retention drops a whole expired day instead of
-- deleting its rows one by one. collector-svc creates each day's partition ahead of time
-- (events_YYYY_MM_DD); an event for a day without one lands in events_default, from which the
-- day's rows move when its partition is made. A partitioned table's key must hold the partition
-- column: an event is keyed by its instance, its id and its time (a retry resends all three, so it
-- is stored once), on SQLite too.
ALTER TABLE events RENAME TO events_unpartitioned;
ALTER INDEX events_pkey RENAME TO events_unpartitioned_pkey;
DROP INDEX events_by_name;
DROP INDEX events_by_subject;
DROP INDEX events_by_org;
CREATE TABLE events (
    instance_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    occurred_at BIGINT NOT NULL,
    org_id TEXT NOT NULL,
    location TEXT NOT NULL,
    kind BIGINT NOT NULL,
    stored_at BIGINT NOT NULL,
    name TEXT NOT NULL,
    value DOUBLE PRECISION,
    subject TEXT,
    consent_version BIGINT NOT NULL,
    policy_revision BIGINT NOT NULL,
    body BYTEA,
    PRIMARY KEY (instance_id, event_id, occurred_at)
) PARTITION BY RANGE (occurred_at);
CREATE INDEX events_by_name ON events (instance_id, kind, name, occurred_at);
CREATE INDEX events_by_subject ON events (instance_id, subject) WHERE subject IS NOT NULL;
CREATE INDEX events_by_org ON events (org_id, occurred_at);
CREATE TABLE events_default PARTITION OF events DEFAULT;
-- A partition for each day the stored events cover.
DO $$
DECLARE
    d BIGINT;
BEGIN
    FOR d IN SELECT DISTINCT occurred_at / 86400000 FROM events_unpartitioned WHERE occurred_at >= 0
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF events FOR VALUES FROM (%s) TO (%s)',
            'events_' || to_char(to_timestamp(d * 86400) AT TIME ZONE 'UTC', 'YYYY_MM_DD'),
            d * 86400000, (d + 1) * 86400000);
    END LOOP;
END $$;
INSERT INTO events (instance_id, event_id, occurred_at, org_id, location, kind, stored_at, name,
    value, subject, consent_version, policy_revision, body)
SELECT instance_id, event_id, occurred_at, org_id, location, kind, stored_at, name, value, subject,
    consent_version, policy_revision, body FROM events_unpartitioned;
DROP TABLE events_unpartitioned;
