//! Helpers for the tests of several crates. Tests that need a real PostgreSQL get a fresh schema in
//! the test database per call, as a URL whose connections use it, so tests run in parallel without
//! seeing each other.

use sqlx::Connection;

use crate::clock::Clock as _;

/// The database tests use: `SIGHTLINE_TEST_POSTGRES_URL`, or the local `test` database.
pub fn postgres_base_url() -> String {
    std::env::var("SIGHTLINE_TEST_POSTGRES_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

/// A fresh PostgreSQL schema's URL when `postgres`, else None (the embedded SQLite default).
/// Panics when PostgreSQL cannot be reached: a test or benchmark that asked for it cannot run.
pub async fn postgres_url_if(postgres: bool) -> Option<String> {
    if !postgres {
        return None;
    }
    match fresh_postgres_url().await {
        Ok(url) => Some(url),
        Err(e) => panic!("PostgreSQL for the test: {e}"),
    }
}

/// Creates an empty schema and returns a URL that puts it first on the search path.
pub async fn fresh_postgres_url() -> Result<String, sqlx::Error> {
    let base = postgres_base_url();
    let schema = format!("t_{}", uuid::Uuid::now_v7().simple());
    let mut conn = sqlx::PgConnection::connect(&base).await?;
    static CLEANED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    if !CLEANED.swap(true, std::sync::atomic::Ordering::Relaxed) {
        drop_stale_schemas(&mut conn, crate::clock::SystemClock.now_ms()).await;
    }
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    if let Ok(mut made) = MADE.lock() {
        made.push(schema.clone());
    }
    let separator = if base.contains('?') { '&' } else { '?' };
    Ok(format!(
        "{base}{separator}options=-c%20search_path%3D{schema}"
    ))
}

/// The schemas [`fresh_postgres_url`] made in this process.
static MADE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// Drops every schema [`fresh_postgres_url`] made in this process (a benchmark's stores hold
/// gigabytes; it calls this when it is done with them).
pub async fn drop_schemas_made_here() -> Result<(), sqlx::Error> {
    let made = MADE
        .lock()
        .map(|mut m| std::mem::take(&mut *m))
        .unwrap_or_default();
    if made.is_empty() {
        return Ok(());
    }
    let mut conn = sqlx::PgConnection::connect(&postgres_base_url()).await?;
    for schema in made {
        drop_schema(&mut conn, &schema).await?;
    }
    conn.close().await
}

/// Drops a schema named by [`fresh_postgres_url`] with what it holds (gone already is fine).
async fn drop_schema(conn: &mut sqlx::PgConnection, schema: &str) -> Result<(), sqlx::Error> {
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "DROP SCHEMA IF EXISTS {schema} CASCADE"
    )))
    .execute(conn)
    .await
    .map(drop)
}

/// How old a test schema is when the next test run drops it: no test or benchmark runs this long,
/// so a schema older than this is left over (each holds its tables until dropped, and a benchmark's
/// a gigabyte or more).
const STALE_SCHEMA_MS: i64 = 6 * 60 * 60 * 1000;

/// Drops the schemas [`fresh_postgres_url`] made more than [`STALE_SCHEMA_MS`] before `now_ms` (a
/// schema's name carries its UUIDv7, whose first 48 bits are its creation time in Unix ms). Once
/// per process (the first call of [`fresh_postgres_url`]); best effort: a schema another process
/// drops at the same time is skipped.
async fn drop_stale_schemas(conn: &mut sqlx::PgConnection, now_ms: i64) {
    let Ok(names) = sqlx::query_scalar::<_, String>(
        "SELECT nspname::text FROM pg_namespace WHERE nspname LIKE 't\\_%'",
    )
    .fetch_all(&mut *conn)
    .await
    else {
        return;
    };
    for name in names {
        if schema_created_ms(&name).is_some_and(|at| now_ms - at > STALE_SCHEMA_MS) {
            let _ = drop_schema(conn, &name).await;
        }
    }
}

/// When a schema named by [`fresh_postgres_url`] was made (Unix ms); None for any other name.
fn schema_created_ms(name: &str) -> Option<i64> {
    let hex = name.strip_prefix("t_")?;
    if hex.len() != 32 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    i64::from_str_radix(&hex[..12], 16).ok()
}

/// A new temporary directory only its owner can enter (mode 0700), removed when dropped.
pub fn private_tempdir() -> std::io::Result<tempfile::TempDir> {
    tempfile::Builder::new()
        .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
        .tempdir()
}

/// A child process (a server a test started) killed and reaped when dropped, however the test
/// holding it ends, a failed assertion included: a failed test leaves no server running.
#[derive(Debug)]
pub struct Reaped(pub std::process::Child);

impl std::ops::Deref for Reaped {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for Reaped {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(Some(_))) {
            let _ = self.0.kill();
        }
        let _ = self.0.wait();
    }
}

/// A backend a store's conformance suite runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// What keeps a fresh database alive until the test ends (a SQLite file's directory).
pub type Guard = Option<tempfile::TempDir>;

impl Backend {
    /// The URL of a fresh, empty database of this backend, named `name` (SQLite: a file in a new
    /// private directory; PostgreSQL: a new schema, see [`fresh_postgres_url`]).
    pub async fn fresh_url(self, name: &str) -> Result<(String, Guard), sqlx::Error> {
        Ok(match self {
            Backend::Sqlite => {
                let dir = private_tempdir()?;
                let url = crate::storage::default_sqlite_url(dir.path(), name);
                (url, Some(dir))
            }
            Backend::Postgres => (fresh_postgres_url().await?, None),
        })
    }
}

/// A zip archive of `entries` (name, contents), as a support bundle is uploaded.
pub fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
    use std::io::Write as _;
    let mut out = std::io::Cursor::new(Vec::new());
    let mut writer = zip::ZipWriter::new(&mut out);
    let written = entries
        .iter()
        .try_for_each(|(name, body)| {
            writer.start_file(*name, zip::write::SimpleFileOptions::default())?;
            writer.write_all(body).map_err(zip::result::ZipError::from)
        })
        .and_then(|()| writer.finish().map(drop));
    if let Err(e) = written {
        panic!("a zip in memory: {e}");
    }
    out.into_inner()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A test that fails while it holds a server leaves no process behind.
    #[test]
    fn a_panic_holding_a_child_kills_and_reaps_it() {
        let (tx, rx) = std::sync::mpsc::channel();
        let failed = std::thread::spawn(move || {
            let child = std::process::Command::new("sleep")
                .arg("600")
                .spawn()
                .map(Reaped)
                .unwrap();
            tx.send(child.id()).unwrap();
            panic!("a failed assertion");
        })
        .join();
        assert!(failed.is_err());
        let pid = rx.recv().unwrap();
        // Killed and reaped: not even a zombie is left under this pid.
        assert!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "sleep {pid} still there"
        );
    }

    /// A test schema is named by its time; one made longer ago than any run is dropped by the next
    /// run, and one of a run still going is left alone.
    #[tokio::test]
    async fn left_over_test_schemas_are_dropped_and_live_ones_kept() {
        let url = fresh_postgres_url().await.unwrap();
        let live = url.rsplit("%3D").next().unwrap().to_owned();
        let made = schema_created_ms(&live).unwrap();
        let now = crate::clock::SystemClock.now_ms();
        assert!(
            (now - made).abs() < 60_000,
            "{live} was made at {made}, now is {now}"
        );
        assert_eq!(schema_created_ms("public"), None);
        assert_eq!(schema_created_ms("t_not_hex_at_all_but_32_chars_xx"), None);

        // A left-over schema (with a table in it) seven hours old, by its name.
        let old = uuid::Uuid::new_v7(uuid::Timestamp::from_unix(
            uuid::NoContext,
            u64::try_from(now - STALE_SCHEMA_MS - 3_600_000).unwrap() / 1000,
            0,
        ));
        let stale = format!("t_{}", old.simple());
        let mut conn = sqlx::PgConnection::connect(&postgres_base_url())
            .await
            .unwrap();
        for sql in [
            format!("CREATE SCHEMA {stale}"),
            format!("CREATE TABLE {stale}.kept (x int)"),
        ] {
            sqlx::query(sqlx::AssertSqlSafe(sql))
                .execute(&mut conn)
                .await
                .unwrap();
        }
        let exists = async |conn: &mut sqlx::PgConnection, name: &str| {
            sqlx::query_scalar::<_, bool>(
                "SELECT EXISTS (SELECT 1 FROM pg_namespace WHERE nspname = $1)",
            )
            .bind(name)
            .fetch_one(conn)
            .await
            .unwrap()
        };
        drop_stale_schemas(&mut conn, now).await;
        assert!(!exists(&mut conn, &stale).await, "{stale} is left over");
        assert!(exists(&mut conn, &live).await, "{live} is in use");
        drop_schema(&mut conn, &live).await.unwrap();
    }
}
