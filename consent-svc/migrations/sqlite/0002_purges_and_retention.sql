-- Purge instructions as enforcement points read them literally (one row per purge; a policy carries
-- the latest of each scope), and retention for every kind of stored data.

CREATE TABLE purges (
    purge_id                 TEXT PRIMARY KEY,
    org_id                   TEXT NOT NULL,
    -- 'ORG' or 'INSTANCE'.
    scope                    TEXT NOT NULL,
    -- Empty for the org scope.
    instance_id              TEXT NOT NULL,
    -- Event kind numbers, comma-separated.
    delete_kinds             TEXT NOT NULL,
    -- Data class numbers, comma-separated.
    strip_classes            TEXT NOT NULL,
    withdraw_metadata        BOOLEAN NOT NULL,
    withdraw_in_app_data     BOOLEAN NOT NULL,
    before_consent_version   INTEGER NOT NULL,
    before_revision          INTEGER NOT NULL,
    issued_at                INTEGER NOT NULL
);
CREATE INDEX purges_org ON purges(org_id, before_revision);

ALTER TABLE retention ADD COLUMN score_history_days INTEGER NOT NULL DEFAULT 730;
ALTER TABLE retention ADD COLUMN support_bundle_days INTEGER NOT NULL DEFAULT 730;
ALTER TABLE retention ADD COLUMN event_id_days INTEGER NOT NULL DEFAULT 35;
