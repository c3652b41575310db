//! Storage from one URL: `sqlite://…` (the default, a file under the data directory, WAL, every
//! commit synced before it returns) or `postgres://…`. Each service passes its own migrations for
//! both backends; they run at start-up.

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
    Sqlite(SqliteDb),
    Postgres(PgPool),
}

/// An SQLite database: a pool for reads and single statements, and one connection of its own for
/// write transactions ([`Database::begin`]).
///
/// SQLite writes one transaction at a time anyway. Through one connection, writers wait their turn
/// in the pool's queue instead of polling the file lock with the busy handler's sleeps; and that
/// connection keeps its page cache from one transaction to the next (SQLite drops a connection's
/// whole cache when another connection has written since its last transaction, so a writer that
/// took whichever pooled connection was free began each transaction cold, re-reading the index
/// pages it had just written).
///
/// The writer connection commits at synchronous=NORMAL: SQLite writes the commit into the WAL and
/// returns without syncing it, and [`crate::sql::Tx::commit`] then syncs the WAL file itself
/// (`fdatasync`, what synchronous=FULL would have done inside the commit). So a commit is durable
/// when it returns, as everywhere else, while a writer that asks for it
/// ([`crate::sql::Tx::commit_unsynced`]) gets the connection back before the sync and runs its
/// next transaction while the disk flushes the last (its answers wait for the sync). The pool's
/// connections stay at synchronous=FULL: a single statement outside a transaction syncs itself.
///
/// A checkpointer of its own copies what the WAL holds back into the database file (see
/// [`checkpointer`]) while it lives: its last clone stops it, so a pool taken out of it alone
/// writes on without the checkpointer.
#[derive(Debug, Clone)]
pub struct SqliteDb {
    pub pool: SqlitePool,
    /// Only [`Database::begin`] takes it: its commits must be synced by [`crate::sql::Tx`].
    pub(crate) writer: SqlitePool,
    /// The WAL file the writer's commits are synced in.
    pub wal: std::sync::Arc<crate::sql::Wal>,
    _checkpointer: std::sync::Arc<tokio_util::sync::DropGuard>,
}

/// How long an SQLite write waits for the one before it (the file lock, or the writer connection).
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// WAL pages (128 MiB at 4 KiB) after which a committing connection checkpoints itself (SQLite's
/// default is 1,000): a backstop for [`checkpointer`], and what lets the WAL start over from its
/// beginning (the writer finds it fully copied back). Past this size a writer checkpoints after
/// every commit until the WAL starts over, copying what the checkpointer has not yet and syncing
/// the database file on the writer's own thread: at 8,000 pages that was one cycle every few
/// commits under ingest, and the collector ran about 10 % slower (BENCHMARKS.md).
const WAL_AUTOCHECKPOINT: u32 = 32_000;

/// How often the checkpointer looks while writes come in, and at most while none do.
const CHECKPOINT_BUSY: Duration = Duration::from_millis(10);
const CHECKPOINT_IDLE: Duration = Duration::from_secs(1);

/// Copies committed WAL frames back into the database file on a connection of its own, on
/// another thread than the writers', until `stop`.
///
/// A checkpoint (copying frames into the file, and its fsync) would otherwise run inside the
/// commit that pushed the WAL past its limit, on the one writer's thread: every writer waited for
/// it. A PASSIVE checkpoint waits for no one and takes no lock a writer needs; a crash at any point
/// loses nothing (the WAL keeps every committed frame until the file's copy is synced). It looks
/// every [`CHECKPOINT_BUSY`] while the WAL grows and backs off to [`CHECKPOINT_IDLE`] when it does
/// not, so an idle service wakes once a second. It never waits: a RESTART or TRUNCATE checkpoint
/// would hold writers back until readers finish. Starting the WAL over from its beginning is left to
/// a writer's own checkpoint ([`WAL_AUTOCHECKPOINT`]), which then finds it copied back.
async fn checkpointer(options: SqliteConnectOptions, stop: tokio_util::sync::CancellationToken) {
    let options = options.thread_name(|_| "sqlite-checkpoint".to_owned());
    let mut connection = match sqlx::SqliteConnection::connect_with(&options).await {
        Ok(connection) => connection,
        Err(error) => {
            // The writers' own checkpoints (WAL_AUTOCHECKPOINT) still keep the WAL bounded.
            tracing::warn!(%error, "no background checkpointer for this SQLite database");
            return;
        }
    };
    let mut wait = CHECKPOINT_BUSY;
    let mut copied = 0;
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            () = tokio::time::sleep(wait) => {}
        }
        let checkpoint: Result<(i64, i64, i64), _> =
            sqlx::query_as("PRAGMA wal_checkpoint(PASSIVE)")
                .fetch_one(&mut connection)
                .await;
        match checkpoint {
            // (busy, frames in the WAL, frames copied back)
            Ok((_, frames, done)) => {
                wait = if done == copied && frames == done {
                    (wait * 2).min(CHECKPOINT_IDLE)
                } else {
                    CHECKPOINT_BUSY
                };
                copied = done;
            }
            Err(error) => {
                tracing::warn!(%error, "background checkpoint failed");
                wait = CHECKPOINT_IDLE;
            }
        }
    }
    let _ = connection.close().await;
}

/// The default URL for a service's SQLite file, e.g. `sqlite://./data/linker.db`.
pub fn default_sqlite_url(data_dir: &Path, service: &str) -> String {
    format!(
        "sqlite://{}",
        data_dir.join(format!("{service}.db")).display()
    )
}

/// Opens `url` and runs the matching migrations.
/// The name of every SQLite writer connection's thread (in `top -H`, and for [`sched`]).
///
/// [`sched`]: crate::sched
pub const WRITER_THREAD: &str = "sqlite-writer";

pub async fn connect(url: &str, migrations: Migrations) -> Result<Database, StorageError> {
    if url.starts_with("sqlite:") {
        let options = SqliteConnectOptions::from_str(url)
            .map_err(StorageError::Connect)?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(BUSY_TIMEOUT)
            .foreign_keys(true)
            // Deleted rows are overwritten with zeros, in the file and in the WAL's page images:
            // an erasure or a purge leaves no readable copy (see [`Forget`]).
            .pragma("secure_delete", "ON")
            // A 16 MiB page cache per connection (8 connections): with the default 2 MiB,
            // inserts into indexed tables spend much time re-reading pages.
            .pragma("cache_size", "-16384")
            .pragma("wal_autocheckpoint", WAL_AUTOCHECKPOINT.to_string());
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
        // A local file: a connection needs no ping before use (sqlx's default, a round trip to
        // the connection's thread on every acquire).
        let pool = SqlitePoolOptions::new()
            .max_connections(8)
            .test_before_acquire(false)
            .connect_with(
                options
                    .clone()
                    .thread_name(|id| format!("sqlite-pool-{id}")),
            )
            .await
            .map_err(StorageError::Connect)?;
        migrations.sqlite.run(&pool).await?;
        let writer = SqlitePoolOptions::new()
            .max_connections(1)
            .test_before_acquire(false)
            .acquire_timeout(BUSY_TIMEOUT)
            .idle_timeout(None)
            .max_lifetime(None)
            // Its commits are synced by `Tx::commit`, after SQLite returns (see [`SqliteDb`]).
            .connect_with(
                options
                    .clone()
                    .synchronous(SqliteSynchronous::Normal)
                    .thread_name(|_| WRITER_THREAD.to_owned()),
            )
            .await
            .map_err(StorageError::Connect)?;
        let stop = tokio_util::sync::CancellationToken::new();
        let wal = std::sync::Arc::new(crate::sql::Wal::of(options.get_filename()));
        tokio::spawn(checkpointer(options, stop.clone()));
        Ok(Database::Sqlite(SqliteDb {
            pool,
            writer,
            wal,
            _checkpointer: std::sync::Arc::new(stop.drop_guard()),
        }))
    } else if url.starts_with("postgres:") || url.starts_with("postgresql:") {
        // Stores on one database in one process (collector-svc's and insights-svc's locations
        // when they share a database) share one pool, migrated once: ten locations hold the
        // connections of one pool, not of ten.
        static SHARED: std::sync::LazyLock<
            tokio::sync::Mutex<std::collections::HashMap<(String, usize), PgPool>>,
        > = std::sync::LazyLock::new(Default::default);
        let key = (
            url.to_owned(),
            std::ptr::from_ref(migrations.postgres) as usize,
        );
        let mut shared = SHARED.lock().await;
        if let Some(pool) = shared.get(&key).filter(|pool| !pool.is_closed()) {
            return Ok(Database::Postgres(pool.clone()));
        }
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
        shared.insert(key, pool.clone());
        Ok(Database::Postgres(pool))
    } else {
        Err(StorageError::Scheme)
    }
}

/// After personal data was deleted: no file of the data directory keeps a readable copy.
#[async_trait::async_trait]
pub trait Forget {
    async fn forget_deleted(&self) -> Result<(), sqlx::Error>;
}

#[async_trait::async_trait]
impl Forget for SqlitePool {
    /// `secure_delete` zeroes a deleted row where it lies, but SQLite leaves stale copies of rows
    /// in the unused space of pages it rebalanced while they were alive (a row moved to a sibling
    /// page keeps its old bytes behind). VACUUM rewrites every page from the live rows only; the
    /// WAL, which then holds the pages as they were, is checkpointed and truncated. Its cost is
    /// one rewrite of the database (BENCHMARKS.md): erasures and purges are rare. Readers can hold
    /// the checkpoint back: it is tried a few times (each waits up to the busy timeout).
    async fn forget_deleted(&self) -> Result<(), sqlx::Error> {
        sqlx::query("VACUUM").execute(self).await?;
        for _ in 0..5 {
            let (busy, _, _): (i64, i64, i64) = sqlx::query_as("PRAGMA wal_checkpoint(TRUNCATE)")
                .fetch_one(self)
                .await?;
            if busy == 0 {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Err(sqlx::Error::Protocol(
            "the WAL could not be checkpointed: readers held it".into(),
        ))
    }
}

#[async_trait::async_trait]
impl Forget for Database {
    async fn forget_deleted(&self) -> Result<(), sqlx::Error> {
        match self {
            Database::Sqlite(db) => db.pool.forget_deleted().await,
            Database::Postgres(pool) => pool.forget_deleted().await,
        }
    }
}

#[async_trait::async_trait]
impl Forget for PgPool {
    /// PostgreSQL keeps a deleted row's bytes in the table's pages until VACUUM reuses the space,
    /// and in its WAL and backups until those expire (README, "Privacy"): nothing to do per call.
    async fn forget_deleted(&self) -> Result<(), sqlx::Error> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    static NONE: sqlx::migrate::Migrator = sqlx::migrate::Migrator::DEFAULT;
    const NO_MIGRATIONS: Migrations = Migrations {
        sqlite: &NONE,
        postgres: &NONE,
    };

    /// A private data directory (0700, as a service's) holding the SQLite database `name`.
    async fn fresh_sqlite(name: &str) -> (Database, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(
            dir.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .unwrap();
        let db = connect(&default_sqlite_url(dir.path(), name), NO_MIGRATIONS)
            .await
            .unwrap();
        (db, dir)
    }

    /// A write transaction of one statement, committed.
    async fn write(db: &Database, sql: &'static str) {
        let mut tx = db.begin().await.unwrap();
        crate::sql::query(sql).execute(&mut tx).await.unwrap();
        tx.commit().await.unwrap();
    }

    #[tokio::test]
    async fn an_unreachable_postgres_says_why() {
        let error = connect("postgres://sightline@127.0.0.1:1/nothing", NO_MIGRATIONS)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.to_lowercase().contains("refused"), "{error}");
        assert!(!error.contains("timed out"), "{error}");
    }

    #[tokio::test]
    async fn deleted_and_updated_rows_leave_no_readable_bytes_in_any_file() {
        let (db, dir) = fresh_sqlite("forget").await;
        let Database::Sqlite(SqliteDb { pool, .. }) = db else {
            panic!("sqlite")
        };
        let on: (i64,) = sqlx::query_as("PRAGMA secure_delete")
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(on.0, 1);
        sqlx::query("CREATE TABLE t (id TEXT PRIMARY KEY, body BLOB, subject TEXT)")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("CREATE INDEX t_subject ON t (subject)")
            .execute(&pool)
            .await
            .unwrap();
        for i in 0..400 {
            let subject = if i % 2 == 0 {
                "psn1_forgetme"
            } else {
                "someone"
            };
            sqlx::query("INSERT INTO t VALUES ($1, $2, $3)")
                .bind(format!("e{i}"))
                .bind(format!("{:x<100}{subject}", "").into_bytes())
                .bind(subject)
                .execute(&pool)
                .await
                .unwrap();
        }
        sqlx::query("UPDATE t SET body = NULL, subject = NULL WHERE subject = 'psn1_forgetme' AND id < 'e2'")
            .execute(&pool)
            .await
            .unwrap();
        sqlx::query("DELETE FROM t WHERE subject = 'psn1_forgetme'")
            .execute(&pool)
            .await
            .unwrap();
        pool.forget_deleted().await.unwrap();
        for entry in std::fs::read_dir(dir.path()).unwrap() {
            let path = entry.unwrap().path();
            let bytes = std::fs::read(&path).unwrap();
            assert!(
                memchr::memmem::find(&bytes, b"psn1_forgetme").is_none(),
                "{}",
                path.display()
            );
        }
    }

    /// Every write transaction goes through the same connection, whichever pooled connections
    /// readers have opened meanwhile: a temporary table (one connection's own) made in one write
    /// transaction is there in the next. Through the pool (first in, first out), the next write
    /// took another connection, whose page cache SQLite had dropped.
    #[tokio::test]
    async fn write_transactions_on_sqlite_share_one_connection() {
        let (db, _dir) = fresh_sqlite("writer").await;
        // Readers hold several pooled connections at once, then give them back.
        let mut readers = Vec::new();
        for _ in 0..4 {
            readers.push(db.snapshot().await.unwrap());
        }
        for reader in readers {
            reader.rollback().await.unwrap();
        }
        write(&db, "CREATE TEMP TABLE mine (n INTEGER)").await;
        for _ in 0..4 {
            let _reader = db.snapshot().await.unwrap();
            write(&db, "INSERT INTO mine (n) VALUES (1)").await;
        }
        let mut tx = db.begin().await.unwrap();
        let (count,): (i64,) = crate::sql::query_as("SELECT count(*) FROM mine")
            .fetch_one(&mut tx)
            .await
            .unwrap();
        assert_eq!(count, 4);
    }

    /// The writer connection commits without syncing (synchronous=NORMAL) and every write
    /// transaction's commit syncs the WAL itself: `commit` before it returns, `commit_unsynced`
    /// in `synced`, the only way to what the commit made. The pool's connections, which commit
    /// single statements, keep SQLite's own sync (FULL); a read snapshot syncs nothing.
    #[tokio::test]
    async fn every_write_transaction_is_synced_before_it_counts_as_made() {
        let (db, dir) = fresh_sqlite("synced").await;
        let Database::Sqlite(sqlite) = &db else {
            unreachable!()
        };
        assert_eq!(sqlite.wal.path(), dir.path().join("synced.db-wal"));
        let level = async |pool: &SqlitePool| {
            let (level,): (i64,) = sqlx::query_as("PRAGMA synchronous")
                .fetch_one(pool)
                .await
                .unwrap();
            level
        };
        assert_eq!(level(&sqlite.writer).await, 1, "NORMAL");
        assert_eq!(level(&sqlite.pool).await, 2, "FULL");

        write(&db, "CREATE TABLE t (n INTEGER)").await;
        assert!(sqlite.wal.path().exists());
        assert_eq!(sqlite.wal.syncs(), 1);

        let mut tx = db.begin().await.unwrap();
        crate::sql::query("INSERT INTO t (n) VALUES (1)")
            .execute(&mut tx)
            .await
            .unwrap();
        let unsynced = tx.commit_unsynced().await.unwrap().map(|()| "made");
        assert_eq!(sqlite.wal.syncs(), 1, "not synced before it is asked");
        assert_eq!(unsynced.synced().await.unwrap(), "made");
        assert_eq!(sqlite.wal.syncs(), 2);

        let snapshot = db.snapshot().await.unwrap();
        snapshot.commit().await.unwrap();
        assert_eq!(sqlite.wal.syncs(), 2, "a read has nothing to sync");
    }

    /// Committed WAL frames are copied back into the database file by the checkpointer of its
    /// own, although no writer's commit reached the WAL size at which it would checkpoint itself.
    #[tokio::test]
    async fn the_wal_is_copied_back_without_a_writer_waiting_for_it() {
        let (db, dir) = fresh_sqlite("checkpointed").await;
        let file = dir.path().join("checkpointed.db");
        write(
            &db,
            "CREATE TABLE t (n INTEGER PRIMARY KEY, body BLOB NOT NULL)",
        )
        .await;
        // About 2,000 pages in four commits: far below what makes a writer checkpoint.
        const ROWS: i64 = 2_000;
        for part in 0..4 {
            let mut tx = db.begin().await.unwrap();
            for n in part * ROWS / 4..(part + 1) * ROWS / 4 {
                crate::sql::query("INSERT INTO t (n, body) VALUES ($1, zeroblob(4000))")
                    .bind(n)
                    .execute(&mut tx)
                    .await
                    .unwrap();
            }
            tx.commit().await.unwrap();
        }
        assert!(ROWS < i64::from(WAL_AUTOCHECKPOINT));
        let copied_back = 4_000 * ROWS as u64;
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::fs::metadata(&file).unwrap().len() < copied_back {
            assert!(
                std::time::Instant::now() < deadline,
                "the database file holds {} bytes a minute after the commits",
                std::fs::metadata(&file).unwrap().len()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (count,): (i64,) = crate::sql::query_as("SELECT count(*) FROM t")
            .fetch_one(&db)
            .await
            .unwrap();
        assert_eq!(count, ROWS);
    }
}
