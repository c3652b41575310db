-- One staged change per org at a time: a second replica's change of the same org is refused at
-- staging instead of being audited and then failing to apply.
CREATE UNIQUE INDEX staged_changes_one_per_org ON staged_changes (org_id);
