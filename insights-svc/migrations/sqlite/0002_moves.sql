-- Support-bundle residency moves carried out, once each: a move is claimed when its change is
-- staged (so concurrent passes or replicas audit it once) and released if that change is discarded.
CREATE TABLE applied_moves (
    move_id TEXT PRIMARY KEY,
    org_id TEXT NOT NULL,
    claimed_at INTEGER NOT NULL
);
