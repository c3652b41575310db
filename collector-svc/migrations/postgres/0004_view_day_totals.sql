-- Page views per instance, space ('' for the whole instance) and day: views, views per channel
-- ("channel:views,…"), exact unique viewers of the day, and a HyperLogLog sketch of its viewers that
-- reports merge over a range. Derived from page_view_days and page_viewers: rebuilt for the days
-- marked in view_days_dirty, and a report counts a marked day from those tables instead.
CREATE TABLE view_day_totals (
    instance_id TEXT NOT NULL,
    space_id TEXT NOT NULL,
    day BIGINT NOT NULL,
    org_id TEXT NOT NULL,
    views BIGINT NOT NULL,
    channels TEXT NOT NULL,
    unique_viewers BIGINT NOT NULL,
    sketch BYTEA NOT NULL,
    PRIMARY KEY (instance_id, space_id, day)
);
CREATE INDEX view_day_totals_by_org ON view_day_totals (org_id, space_id, day);

-- Days whose page views changed since their totals were made; generation grows with each change,
-- so a rebuild that raced a change leaves the mark.
CREATE TABLE view_days_dirty (
    instance_id TEXT NOT NULL,
    day BIGINT NOT NULL,
    org_id TEXT NOT NULL,
    generation BIGINT NOT NULL,
    PRIMARY KEY (instance_id, day)
);
CREATE INDEX view_days_dirty_by_org ON view_days_dirty (org_id, day);
