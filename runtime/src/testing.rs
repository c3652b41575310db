//! Helpers for the tests of several crates. Tests that need a real PostgreSQL get a fresh schema in
//! the test database per call, as a URL whose connections use it, so tests run in parallel without
//! seeing each other.

use sqlx::Connection;

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
    sqlx::query(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    let separator = if base.contains('?') { '&' } else { '?' };
    Ok(format!(
        "{base}{separator}options=-c%20search_path%3D{schema}"
    ))
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
                let dir = tempfile::Builder::new()
                    .permissions(std::os::unix::fs::PermissionsExt::from_mode(0o700))
                    .tempdir()?;
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
