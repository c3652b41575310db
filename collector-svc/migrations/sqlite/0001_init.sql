-- Every stored event, de-identified at the door. kind 0 is a tombstone: the event was purged or
-- erased and only its id is remembered (for de-duplication) until the org's event-id memory ends.
CREATE TABLE events (
    instance_id TEXT NOT NULL,
    event_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    location TEXT NOT NULL,
    kind INTEGER NOT NULL,
    occurred_at INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    name TEXT NOT NULL,
    value REAL,
    subject TEXT,
    consent_version INTEGER NOT NULL,
    policy_revision INTEGER NOT NULL,
    body BLOB,
    PRIMARY KEY (instance_id, event_id)
) WITHOUT ROWID;
CREATE INDEX events_by_name ON events (instance_id, kind, name, occurred_at);
CREATE INDEX events_by_subject ON events (instance_id, subject) WHERE subject IS NOT NULL;
CREATE INDEX events_by_org ON events (org_id, occurred_at);

-- Page views counted per page, day (UTC, days since 1970-01-01) and channel, per consent version
-- and policy revision (so purges cover exactly what they name).
CREATE TABLE page_view_days (
    instance_id TEXT NOT NULL,
    page_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    consent_version INTEGER NOT NULL,
    policy_revision INTEGER NOT NULL,
    org_id TEXT NOT NULL,
    space_id TEXT NOT NULL,
    views INTEGER NOT NULL,
    PRIMARY KEY (instance_id, page_id, day, channel, consent_version, policy_revision)
) WITHOUT ROWID;
CREATE INDEX page_view_days_by_space ON page_view_days (instance_id, space_id, day);
CREATE INDEX page_view_days_by_org ON page_view_days (org_id, day);

-- Which viewers (pseudonyms) viewed a page on a day: unique viewers are counted from these, exactly.
CREATE TABLE page_viewers (
    instance_id TEXT NOT NULL,
    page_id TEXT NOT NULL,
    day INTEGER NOT NULL,
    viewer TEXT NOT NULL,
    org_id TEXT NOT NULL,
    space_id TEXT NOT NULL,
    consent_version INTEGER NOT NULL,
    policy_revision INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (instance_id, page_id, day, viewer)
) WITHOUT ROWID;
CREATE INDEX page_viewers_by_viewer ON page_viewers (instance_id, viewer);
CREATE INDEX page_viewers_by_space ON page_viewers (instance_id, space_id, day);
CREATE INDEX page_viewers_by_org ON page_viewers (org_id, day);

-- Blocking-time memory: when a viewer's view of a page last counted.
CREATE TABLE view_memory (
    instance_id TEXT NOT NULL,
    page_id TEXT NOT NULL,
    viewer TEXT NOT NULL,
    org_id TEXT NOT NULL,
    last_at INTEGER NOT NULL,
    stored_at INTEGER NOT NULL,
    PRIMARY KEY (instance_id, page_id, viewer)
) WITHOUT ROWID;
CREATE INDEX view_memory_by_viewer ON view_memory (instance_id, viewer);

-- Hourly rollups per instance, metric, tag set and hour (Unix ms of the hour's start).
CREATE TABLE rollups (
    instance_id TEXT NOT NULL,
    name TEXT NOT NULL,
    tags TEXT NOT NULL,
    hour INTEGER NOT NULL,
    org_id TEXT NOT NULL,
    location TEXT NOT NULL,
    unit TEXT NOT NULL,
    count INTEGER NOT NULL,
    min REAL NOT NULL,
    max REAL NOT NULL,
    sum REAL NOT NULL,
    p50 REAL NOT NULL,
    p95 REAL NOT NULL,
    consent_version INTEGER NOT NULL,
    policy_revision INTEGER NOT NULL,
    PRIMARY KEY (instance_id, name, tags, hour)
) WITHOUT ROWID;
CREATE INDEX rollups_by_org ON rollups (org_id, hour);

-- Hours with samples not rolled up yet.
CREATE TABLE rollup_dirty (
    instance_id TEXT NOT NULL,
    hour INTEGER NOT NULL,
    org_id TEXT NOT NULL,
    PRIMARY KEY (instance_id, hour)
) WITHOUT ROWID;

-- Purges applied, so each is applied once.
CREATE TABLE applied_purges (
    purge_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    applied_at INTEGER NOT NULL,
    counts TEXT NOT NULL
);

-- Audited changes (purges, erasures) staged until their audit entry is in the org's log.
CREATE TABLE staged_changes (
    change_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    payload TEXT NOT NULL,
    staged_at INTEGER NOT NULL
);
CREATE INDEX staged_changes_by_org ON staged_changes (org_id, staged_at);
