//! What a residency move carries (SPEC E10): every table that holds an org's data, described once
//! so both backends export, import, count and delete the same columns.

use serde::{Deserialize, Serialize};

/// A column's type, as both backends store it (BIGINT / INTEGER, DOUBLE PRECISION / REAL, TEXT,
/// BYTEA / BLOB).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Type {
    Int,
    Real,
    Text,
    Blob,
}

/// One stored value; `None` is NULL (typed, so PostgreSQL accepts it in any column).
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Int(Option<i64>),
    Real(Option<f64>),
    Text(Option<String>),
    Blob(Option<Vec<u8>>),
}

/// A table of org data.
#[derive(Debug, PartialEq, Eq)]
pub struct Table {
    pub name: &'static str,
    pub columns: &'static [(&'static str, Type)],
    /// The primary key's columns: the first ones of `columns`, in order.
    pub key: usize,
    /// Whether rows are counted before the old copy is deleted. Rollup marks are work to do, not
    /// data: a rollup pass may take one meanwhile.
    pub counted: bool,
}

impl Table {
    /// The column named `location`, relabelled when rows move.
    pub fn location_column(&self) -> Option<usize> {
        self.columns
            .iter()
            .position(|(name, _)| *name == "location")
    }

    pub fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    }

    pub fn key_list(&self) -> String {
        self.columns[..self.key]
            .iter()
            .map(|(name, _)| *name)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

use Type::{Blob, Int, Real, Text};

/// Every table of org data, in the order a move copies them.
pub static MOVED_TABLES: &[Table] = &[
    Table {
        name: "events",
        columns: &[
            ("instance_id", Text),
            ("event_id", Text),
            ("occurred_at", Int),
            ("org_id", Text),
            ("location", Text),
            ("kind", Int),
            ("stored_at", Int),
            ("name", Text),
            ("value", Real),
            ("subject", Text),
            ("consent_version", Int),
            ("policy_revision", Int),
            ("body", Blob),
        ],
        key: 3,
        counted: true,
    },
    Table {
        name: "page_view_days",
        columns: &[
            ("instance_id", Text),
            ("page_id", Text),
            ("day", Int),
            ("channel", Int),
            ("consent_version", Int),
            ("policy_revision", Int),
            ("org_id", Text),
            ("space_id", Text),
            ("views", Int),
        ],
        key: 6,
        counted: true,
    },
    Table {
        name: "page_viewers",
        columns: &[
            ("instance_id", Text),
            ("page_id", Text),
            ("day", Int),
            ("viewer", Text),
            ("org_id", Text),
            ("space_id", Text),
            ("consent_version", Int),
            ("policy_revision", Int),
            ("stored_at", Int),
        ],
        key: 4,
        counted: true,
    },
    Table {
        name: "view_times",
        columns: &[
            ("instance_id", Text),
            ("page_id", Text),
            ("viewer", Text),
            ("at", Int),
            ("event_id", Text),
            ("org_id", Text),
            ("stored_at", Int),
            ("counted", Int),
            ("channel", Int),
            ("space_id", Text),
            ("consent_version", Int),
            ("policy_revision", Int),
        ],
        key: 5,
        counted: true,
    },
    Table {
        name: "rollups",
        columns: &[
            ("instance_id", Text),
            ("name", Text),
            ("tags", Text),
            ("hour", Int),
            ("org_id", Text),
            ("location", Text),
            ("unit", Text),
            ("count", Int),
            ("min", Real),
            ("max", Real),
            ("sum", Real),
            ("p50", Real),
            ("p95", Real),
            ("consent_version", Int),
            ("policy_revision", Int),
        ],
        key: 4,
        counted: true,
    },
    Table {
        name: "rollup_dirty",
        columns: &[("instance_id", Text), ("hour", Int), ("org_id", Text)],
        key: 2,
        counted: false,
    },
    Table {
        name: "view_day_totals",
        columns: &[
            ("instance_id", Text),
            ("space_id", Text),
            ("day", Int),
            ("org_id", Text),
            ("views", Int),
            ("channels", Text),
            ("unique_viewers", Int),
            ("sketch", Blob),
        ],
        key: 3,
        counted: true,
    },
    Table {
        name: "view_days_dirty",
        columns: &[
            ("instance_id", Text),
            ("day", Int),
            ("org_id", Text),
            ("generation", Int),
        ],
        key: 2,
        counted: false,
    },
    Table {
        name: "applied_purges",
        columns: &[
            ("purge_id", Text),
            ("org_id", Text),
            ("applied_at", Int),
            ("counts", Text),
        ],
        key: 1,
        counted: true,
    },
];

/// A move of an org's data out of a store, as staged and audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MoveSpec {
    pub move_id: String,
    pub org_id: String,
    pub from_location: String,
    pub to_location: String,
    /// Both locations share one database: the rows stay and are relabelled.
    pub in_place: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_moved_table_has_the_org_and_a_key() {
        for table in MOVED_TABLES {
            assert!(
                table.key >= 1 && table.key <= table.columns.len(),
                "{}",
                table.name
            );
            assert!(
                table.columns.iter().any(|(name, _)| *name == "org_id"),
                "{}",
                table.name
            );
        }
        assert_eq!(
            MOVED_TABLES[0].key_list(),
            "instance_id, event_id, occurred_at"
        );
        assert_eq!(MOVED_TABLES[0].location_column(), Some(4));
    }

    /// The tables of the schema (SQLite migrations, which the PostgreSQL ones mirror) with their
    /// columns.
    fn schema() -> Vec<(String, Vec<String>)> {
        let sql = [
            include_str!("../../migrations/sqlite/0001_init.sql"),
            include_str!("../../migrations/sqlite/0002_epsilon_ledger.sql"),
            include_str!("../../migrations/sqlite/0003_moves.sql"),
            include_str!("../../migrations/sqlite/0004_view_day_totals.sql"),
            include_str!("../../migrations/sqlite/0005_view_times.sql"),
            include_str!("../../migrations/sqlite/0006_events_keyed_by_time.sql"),
        ]
        .join("\n");
        let mut tables: Vec<(String, Vec<String>)> = Vec::new();
        let mut current: Option<(String, Vec<String>)> = None;
        for line in sql.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("ALTER TABLE ") {
                let words: Vec<&str> = rest.trim_end_matches(';').split_whitespace().collect();
                let ["RENAME", "TO", to] = words[1..] else {
                    panic!("teach this reader {line}");
                };
                for (table, _) in tables.iter_mut().filter(|(t, _)| t == words[0]) {
                    to.clone_into(table);
                }
            } else if let Some(rest) = line.strip_prefix("DROP TABLE ") {
                let name = rest.trim_end_matches(';').trim();
                tables.retain(|(table, _)| table != name);
            } else if let Some(rest) = line.strip_prefix("CREATE TABLE ") {
                let name = rest.split_whitespace().next().unwrap_or_default();
                current = Some((name.to_owned(), Vec::new()));
            } else if line.starts_with(')') {
                tables.extend(current.take());
            } else if let Some((_, columns)) = current.as_mut() {
                let word = line.split_whitespace().next().unwrap_or_default();
                if !word.is_empty() && word != "PRIMARY" && !word.starts_with("--") {
                    columns.push(word.to_owned());
                }
            }
        }
        tables
    }

    #[test]
    fn a_move_carries_every_column_of_every_table_of_org_data() {
        // Not org data a move carries: work in flight (settled before a move), the epsilon ledger
        // (kept in the global store), and the store's own bookkeeping.
        let not_moved = [
            "staged_changes",
            "epsilon_ledger",
            "moved_out",
            "store_identity",
        ];
        let schema = schema();
        assert!(schema.len() >= MOVED_TABLES.len() + not_moved.len() - 1);
        for (name, columns) in schema {
            if not_moved.contains(&name.as_str()) {
                continue;
            }
            let table = MOVED_TABLES
                .iter()
                .find(|t| t.name == name)
                .unwrap_or_else(|| panic!("table {name} is not in MOVED_TABLES"));
            let listed: Vec<&str> = table.columns.iter().map(|(c, _)| *c).collect();
            assert_eq!(listed, columns, "{name}");
        }
    }
}
