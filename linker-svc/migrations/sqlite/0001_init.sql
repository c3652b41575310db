-- linker-svc: orgs, admin tokens, link keys, instances and credentials, detection, audit log.
-- Secrets are stored only as SHA-256 digests; timestamps are Unix milliseconds.

CREATE TABLE orgs (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    -- Head of the org's audit chain: the last seq and its hash.
    audit_seq   INTEGER NOT NULL DEFAULT 0,
    audit_head  BLOB NOT NULL
);

CREATE TABLE admin_tokens (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES orgs(id),
    label         TEXT NOT NULL,
    prefix        TEXT NOT NULL,
    digest        BLOB NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER,
    revoked_at    INTEGER
);
CREATE INDEX admin_tokens_org ON admin_tokens(org_id, id);

CREATE TABLE link_keys (
    id               TEXT PRIMARY KEY,
    org_id           TEXT NOT NULL REFERENCES orgs(id),
    label            TEXT NOT NULL,
    prefix           TEXT NOT NULL,
    digest           BLOB NOT NULL UNIQUE,
    created_at       INTEGER NOT NULL,
    expires_at       INTEGER NOT NULL,
    last_used_at     INTEGER,
    revoked_at       INTEGER,
    replaces_key_id  TEXT
);
CREATE INDEX link_keys_org ON link_keys(org_id, id);

CREATE TABLE instances (
    id           TEXT PRIMARY KEY,
    org_id       TEXT NOT NULL REFERENCES orgs(id),
    server_id    TEXT NOT NULL,
    base_url     TEXT NOT NULL,
    product      TEXT NOT NULL,
    version      TEXT NOT NULL,
    license_sen  TEXT NOT NULL,
    node_count   INTEGER NOT NULL,
    link_key_id  TEXT NOT NULL REFERENCES link_keys(id),
    linked_at    INTEGER NOT NULL,
    unlinked_at  INTEGER
);
CREATE INDEX instances_org ON instances(org_id, id);
CREATE UNIQUE INDEX instances_linked_server ON instances(org_id, server_id) WHERE unlinked_at IS NULL;

CREATE TABLE credentials (
    id            TEXT PRIMARY KEY,
    org_id        TEXT NOT NULL REFERENCES orgs(id),
    instance_id   TEXT NOT NULL REFERENCES instances(id),
    prefix        TEXT NOT NULL,
    digest        BLOB NOT NULL UNIQUE,
    created_at    INTEGER NOT NULL,
    last_used_at  INTEGER,
    revoked_at    INTEGER
);
CREATE INDEX credentials_instance ON credentials(instance_id);

CREATE TABLE app_links (
    instance_id     TEXT NOT NULL REFERENCES instances(id),
    url             TEXT NOT NULL,
    product_family  TEXT NOT NULL,
    server_id       TEXT NOT NULL,
    version         TEXT NOT NULL,
    PRIMARY KEY (instance_id, url)
);

CREATE TABLE domains (
    org_id       TEXT NOT NULL REFERENCES orgs(id),
    domain       TEXT NOT NULL,
    token        TEXT NOT NULL,
    claimed_at   INTEGER NOT NULL,
    verified_at  INTEGER,
    PRIMARY KEY (org_id, domain)
);
-- A domain is verified for one org at most.
CREATE UNIQUE INDEX domains_verified ON domains(domain) WHERE verified_at IS NOT NULL;

CREATE TABLE licenses (
    sen          TEXT PRIMARY KEY,
    product      TEXT NOT NULL,
    domain       TEXT NOT NULL,
    imported_at  INTEGER NOT NULL
);
CREATE INDEX licenses_domain ON licenses(domain);

CREATE TABLE audit_events (
    org_id       TEXT NOT NULL REFERENCES orgs(id),
    seq          INTEGER NOT NULL,
    occurred_at  INTEGER NOT NULL,
    actor        TEXT NOT NULL,
    service      TEXT NOT NULL,
    action       TEXT NOT NULL,
    target       TEXT NOT NULL,
    attributes   TEXT NOT NULL,
    prev_hash    BLOB NOT NULL,
    hash         BLOB NOT NULL,
    PRIMARY KEY (org_id, seq)
);
