-- Blocking time in both directions: every view of a page by a viewer within reach, with its time,
-- whether it counts now, and where its count went (channel, space, consent version, policy
-- revision), so a view that arrives out of order corrects the counts (a view counts when no counted
-- view of the same viewer and page lies within the blocking time before it, in time order). Takes
-- the place of view_memory, whose rows (one last counted time per viewer and page) become counted
-- anchors.
CREATE TABLE view_times (
    instance_id TEXT NOT NULL,
    page_id TEXT NOT NULL,
    viewer TEXT NOT NULL,
    at INTEGER NOT NULL,
    event_id TEXT NOT NULL,
    org_id TEXT NOT NULL,
    stored_at INTEGER NOT NULL,
    counted INTEGER NOT NULL,
    channel INTEGER NOT NULL,
    space_id TEXT NOT NULL,
    consent_version INTEGER NOT NULL,
    policy_revision INTEGER NOT NULL,
    PRIMARY KEY (instance_id, page_id, viewer, at, event_id)
) WITHOUT ROWID;
CREATE INDEX view_times_by_viewer ON view_times (instance_id, viewer);
CREATE INDEX view_times_by_org ON view_times (org_id, at);
INSERT INTO view_times (instance_id, page_id, viewer, at, event_id, org_id, stored_at, counted, channel, space_id, consent_version, policy_revision)
    SELECT instance_id, page_id, viewer, last_at, '', org_id, stored_at, 1, 0, '', 0, 0 FROM view_memory;
DROP TABLE view_memory;
