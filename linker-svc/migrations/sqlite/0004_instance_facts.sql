-- An instance's detection and connection metadata follows its org's data location (SPEC E10): it
-- lives in the store of that location (this database for GLOBAL, or one set per location), keyed by
-- instance id and org, while the identity rows (orgs, tokens, link keys, instances' ids and server
-- ids, credentials, the audit chain) stay here. Existing metadata moves to the new tables, and the
-- identity table keeps none of it.

CREATE TABLE instance_facts (
    instance_id  TEXT PRIMARY KEY,
    org_id       TEXT NOT NULL,
    base_url     TEXT NOT NULL,
    product      TEXT NOT NULL,
    version      TEXT NOT NULL,
    license_sen  TEXT NOT NULL,
    node_count   INTEGER NOT NULL
);
CREATE INDEX instance_facts_org ON instance_facts(org_id, instance_id);

CREATE TABLE instance_app_links (
    instance_id     TEXT NOT NULL,
    org_id          TEXT NOT NULL,
    url             TEXT NOT NULL,
    product_family  TEXT NOT NULL,
    server_id       TEXT NOT NULL,
    version         TEXT NOT NULL,
    PRIMARY KEY (instance_id, url)
);
CREATE INDEX instance_app_links_org ON instance_app_links(org_id, instance_id);

INSERT INTO instance_facts (instance_id, org_id, base_url, product, version, license_sen, node_count)
SELECT id, org_id, base_url, product, version, license_sen, node_count FROM instances;

INSERT INTO instance_app_links (instance_id, org_id, url, product_family, server_id, version)
SELECT a.instance_id, i.org_id, a.url, a.product_family, a.server_id, a.version
FROM app_links a JOIN instances i ON i.id = a.instance_id;

DROP TABLE app_links;

UPDATE instances SET base_url = '', product = '', version = '', license_sen = '', node_count = 0;
