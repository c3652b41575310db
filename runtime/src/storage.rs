//! Storage from one URL: `sqlite://…` (the default, a file under the data directory, WAL with
//! synchronous=FULL) or `postgres://…`. Each service passes its own migrations for both backends;
//! they run at start-up.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::Connection;
use sqlx::migrate::Migrator;
use sqlx::postgres::{PgPool, PgPoolOptions};
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("unsupported database URL scheme (use sqlite:// or postgres://)")]
    Scheme,
    #[error("data directory or database file {path}: {source}")]
    DataDir {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
    #[error("migrations failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
}

/// What a database error means for the caller, the same on SQLite and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DbFailure {
    UniqueViolation,
    ForeignKeyViolation,
    /// The database cannot be reached right now; retrying may work.
    Unavailable,
    Other,
}

pub fn classify(error: &sqlx::Error) -> DbFailure {
    match error {
        sqlx::Error::Database(db) if db.is_unique_violation() => DbFailure::UniqueViolation,
        sqlx::Error::Database(db) if db.is_foreign_key_violation() => {
            DbFailure::ForeignKeyViolation
        }
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Io(_) => {
            DbFailure::Unavailable
        }
        _ => DbFailure::Other,
    }
}

/// A service's migrations, one set per backend.
#[derive(Debug, Clone, Copy)]
pub struct Migrations {
    pub sqlite: &'static Migrator,
    pub postgres: &'static Migrator,
}

/// An open, migrated database.
#[derive(Debug, Clone)]
pub enum Database {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// The default URL for a service's SQLite file, e.g. `sqlite://./data/linker.db`.
pub fn default_sqlite_url(data_dir: &Path, service: &str) -> String {
    format!(
        "sqlite://{}",
        data_dir.join(format!("{service}.db")).display()
    )
}

/// Opens `url` and runs the matching migrations.
pub async fn connect(url: &str, migrations: Migrations) -> Result<Database, StorageError> {
    if url.starts_with("sqlite:") {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StorageError::Connect)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(10))
            .foreign_keys(true)
            // A 16 MiB page cache per connection (8 connections): with the default 2 MiB,
            // inserts into indexed tables spend much time re-reading pages.
            .pragma("cache_size", "-16384");
        if let Some(parent) = options.get_filename().parent()
            && !parent.as_os_str().is_empty()
        {
            crate::secret_file::private_dir(parent).map_err(|source| StorageError::DataDir {
                path: parent.display().to_string(),
                source,
            })?;
        }
        crate::secret_file::private_database_file(options.get_filename()).map_err(|source| {
            StorageError::DataDir {
                path: options.get_filename().display().to_string(),
                source,
            }
        })?;
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .connect_with(options)
            .await
            .map_err(StorageError::Connect)?;
        migrations.sqlite.run(&pool).await?;
        Ok(Database::Sqlite(pool))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        // One plain connection first: a pool that cannot connect says only "timed out", while
        // this says why (refused, unknown host, authentication failed, no such database).
        sqlx::PgConnection::connect(url)
            .await
            .map_err(StorageError::Connect)?
            .close()
            .await
            .map_err(StorageError::Connect)?;
        let pool = PgPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(10))
            .connect(url)
            .await
            .map_err(StorageError::Connect)?;
        migrations.postgres.run(&pool).await?;
        Ok(Database::Postgres(pool))
    } else {
        Err(StorageError::Scheme)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NONE: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;

    #[tokio::test]
    async fn an_unreachable_postgres_says_why() {
        let migrations = Migrations {
            sqlite: &NONE,
            postgres: &NONE,
        };
        let error = connect("postgres://sightline@127.0.0.1:1/nothing", migrations)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.to_lowercase().contains("refused"), "{error}");
        assert!(!error.contains("timed out"), "{error}");
    }
}
