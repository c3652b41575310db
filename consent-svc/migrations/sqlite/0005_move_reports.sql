-- The data owners (services) that have reported their part of a move, comma-separated and sorted;
-- the move is DONE once every owner of its scope is here.
ALTER TABLE residency_moves ADD COLUMN reported_by TEXT NOT NULL DEFAULT '';
