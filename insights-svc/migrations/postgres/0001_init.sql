-- insights-svc's store. `subject` names whose data a row is: the instance id of a linked instance,
-- or "server:" and the product's server id for an upload from an instance that is not linked.

-- Assessment files as stored: the contract's Assessment message (protobuf), after the policy's
-- field rules were applied.
CREATE TABLE assessments (
    upload_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    stored_at BIGINT NOT NULL,
    consent_version BIGINT NOT NULL,
    size_bytes BIGINT NOT NULL,
    body BYTEA NOT NULL
);
CREATE INDEX assessments_by_subject ON assessments (org_id, subject, stored_at);
CREATE INDEX assessments_by_org ON assessments (org_id, stored_at);

-- The latest readiness report per subject (ReadinessReport, protobuf).
CREATE TABLE readiness (
    org_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    assessed_at BIGINT NOT NULL,
    score BIGINT NOT NULL,
    report BYTEA NOT NULL,
    PRIMARY KEY (org_id, subject)
);
CREATE INDEX readiness_by_org ON readiness (org_id, assessed_at);

-- Scores computed hourly (score history) and from uploads.
CREATE TABLE scores (
    org_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    at BIGINT NOT NULL,
    score BIGINT NOT NULL,
    rules_version TEXT NOT NULL,
    source BIGINT NOT NULL,
    PRIMARY KEY (org_id, subject, at)
);
CREATE INDEX scores_by_org ON scores (org_id, at);

-- Support bundles: the scrubbed zip is a file in its location's directory; this is its record.
CREATE TABLE bundles (
    upload_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    subject TEXT NOT NULL,
    location TEXT NOT NULL,
    file_name TEXT NOT NULL,
    stored_at BIGINT NOT NULL,
    size_bytes BIGINT NOT NULL,
    sha256 TEXT NOT NULL,
    files_read BIGINT NOT NULL,
    scrubbed TEXT NOT NULL
);
CREATE INDEX bundles_by_org ON bundles (org_id, stored_at);

-- Purges applied (once each), with what they removed.
CREATE TABLE applied_purges (
    purge_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    applied_at BIGINT NOT NULL,
    counts TEXT NOT NULL
);

-- Audited changes (retention sweeps, purges) staged until their audit entry is in the org's log.
CREATE TABLE staged_changes (
    change_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    entry TEXT NOT NULL,
    payload TEXT NOT NULL,
    staged_at BIGINT NOT NULL
);
CREATE INDEX staged_changes_by_org ON staged_changes (org_id, staged_at);
