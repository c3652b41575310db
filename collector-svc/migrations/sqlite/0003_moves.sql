-- Which database this is: two locations whose stores name the same identity share one database,
-- and a residency move between them relabels rows instead of copying them.
CREATE TABLE store_identity (
    id TEXT PRIMARY KEY
);
INSERT INTO store_identity (id) VALUES (lower(hex(randomblob(16))));

-- Residency moves that took an org's data out of this store (deleted or relabelled), so a move
-- resumed after a crash knows its copy is the only one left.
CREATE TABLE moved_out (
    move_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    to_location TEXT NOT NULL,
    moved_at INTEGER NOT NULL
);
