-- consent-svc: consent versions with their receipts, overrides, tracking, residency, retention, and
-- each org's policy revision. Timestamps are Unix milliseconds; levels are stored by name.

CREATE TABLE consent_versions (
    org_id                  TEXT NOT NULL,
    version                 BIGINT NOT NULL,
    usage_level             TEXT NOT NULL,
    sharing_level           TEXT NOT NULL,
    contribute_metadata     BOOLEAN NOT NULL,
    contribute_in_app_data  BOOLEAN NOT NULL,
    compliance_restricted   BOOLEAN NOT NULL,
    actor                   TEXT NOT NULL,
    reason                  TEXT NOT NULL,
    created_at              BIGINT NOT NULL,
    receipt_payload         BYTEA NOT NULL,
    receipt_signature       BYTEA NOT NULL,
    key_id                  TEXT NOT NULL,
    PRIMARY KEY (org_id, version)
);

CREATE TABLE instance_overrides (
    org_id         TEXT NOT NULL,
    instance_id    TEXT NOT NULL,
    usage_level    TEXT NOT NULL,
    sharing_level  TEXT NOT NULL,
    reason         TEXT NOT NULL,
    updated_at     BIGINT NOT NULL,
    PRIMARY KEY (org_id, instance_id)
);

CREATE TABLE tracking_settings (
    org_id                TEXT PRIMARY KEY,
    enabled_channels      TEXT NOT NULL,
    exclude_anonymous     BOOLEAN NOT NULL,
    excluded_groups       TEXT NOT NULL,
    blocking_time_ms      BIGINT NOT NULL,
    view_counter_enabled  BOOLEAN NOT NULL,
    global_report_group   TEXT NOT NULL,
    updated_at            BIGINT NOT NULL
);

CREATE TABLE residency (
    org_id                   TEXT PRIMARY KEY,
    location                 TEXT NOT NULL,
    support_bundle_location  TEXT NOT NULL,
    updated_at               BIGINT NOT NULL
);

CREATE TABLE residency_moves (
    move_id        TEXT PRIMARY KEY,
    org_id         TEXT NOT NULL,
    scope          TEXT NOT NULL,
    from_location  TEXT NOT NULL,
    to_location    TEXT NOT NULL,
    state          TEXT NOT NULL,
    requested_at   BIGINT NOT NULL,
    started_at     BIGINT,
    completed_at   BIGINT
);
CREATE INDEX residency_moves_org ON residency_moves(org_id, scope, requested_at);

CREATE TABLE retention (
    org_id           TEXT PRIMARY KEY,
    raw_days         BIGINT NOT NULL,
    assessment_days  BIGINT NOT NULL,
    aggregate_days   BIGINT NOT NULL,
    updated_at       BIGINT NOT NULL
);

-- Increases with every change to an org's policy; holds the latest purge instruction.
CREATE TABLE policy_state (
    org_id              TEXT PRIMARY KEY,
    revision            BIGINT NOT NULL,
    purge_usage         TEXT,
    purge_sharing       TEXT,
    purge_from_version  BIGINT,
    purge_issued_at     BIGINT
);
