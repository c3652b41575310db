-- The digest of the client's request id a version was made for: a retry finds it and gets the same
-- version back instead of making another.
ALTER TABLE consent_versions ADD COLUMN request_key TEXT;
CREATE UNIQUE INDEX consent_versions_request ON consent_versions(org_id, request_key)
    WHERE request_key IS NOT NULL;
