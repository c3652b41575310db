//! The thin shim between a store's SQL and its backend. Every store writes its queries once, as
//! ordinary Rust over [`Database`] and [`Tx`]: `sql::query("… $1 …").bind(org_id).fetch_all(db)`.
//! Both backends take `$n` placeholders, `ON CONFLICT` and `RETURNING`; what differs sits here:
//! how a write transaction begins (SQLite takes its lock up front), how a multi-row statement
//! numbers its placeholders ([`Builder`]: `?` on SQLite, where each binds in constant time), and
//! which concrete sqlx types carry a row. A store that needs more asks [`Tx::backend`].

use std::marker::PhantomData;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sqlx::postgres::{PgArguments, PgConnection, PgRow};
use sqlx::query::{Query as SqlxQuery, QueryAs};
use sqlx::sqlite::{SqliteArguments, SqliteConnection, SqliteRow};
use sqlx::{AssertSqlSafe, FromRow, Postgres, SqlSafeStr, SqlStr, Sqlite, Transaction};

pub use crate::storage::Database;

/// Which database a store runs on, for the few statements that differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

impl Database {
    pub fn backend(&self) -> Backend {
        match self {
            Database::Sqlite(_) => Backend::Sqlite,
            Database::Postgres(_) => Backend::Postgres,
        }
    }

    /// Begins a write transaction: on SQLite with `BEGIN IMMEDIATE`, so two writers never both
    /// read and then fail to upgrade their lock.
    pub async fn begin(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Database::Sqlite(db) => Tx::Sqlite(
                db.writer.begin_with("BEGIN IMMEDIATE").await?,
                Some(db.wal.clone()),
            ),
            Database::Postgres(pool) => Tx::Postgres(pool.begin().await?),
        })
    }

    /// Begins a read-only transaction whose statements all see one snapshot (SQLite: a deferred
    /// transaction in WAL mode; PostgreSQL: REPEATABLE READ). For a read made of several
    /// statements that a concurrent writer must not fall between.
    pub async fn snapshot(&self) -> Result<Tx, sqlx::Error> {
        Ok(match self {
            Database::Sqlite(db) => Tx::Sqlite(db.pool.begin_with("BEGIN DEFERRED").await?, None),
            Database::Postgres(pool) => Tx::Postgres(
                pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
                    .await?,
            ),
        })
    }
}

/// An open transaction on either backend; dropped without [`Tx::commit`], it rolls back.
#[derive(Debug)]
pub enum Tx {
    /// With the WAL file its commit is synced in (a write transaction: the writer connection
    /// commits without syncing, see [`crate::storage::SqliteDb`]); None for a read snapshot.
    Sqlite(Transaction<'static, Sqlite>, Option<Arc<Wal>>),
    Postgres(Transaction<'static, Postgres>),
}

impl Tx {
    pub fn backend(&self) -> Backend {
        match self {
            Tx::Sqlite(..) => Backend::Sqlite,
            Tx::Postgres(_) => Backend::Postgres,
        }
    }

    /// Commits; returns once the commit is durable.
    pub async fn commit(self) -> Result<(), sqlx::Error> {
        self.commit_unsynced().await?.synced().await
    }

    /// Commits, and returns before the commit is durable (SQLite: before its WAL is synced; on
    /// PostgreSQL a commit is durable when it returns): others may see it already, and a power
    /// loss may still undo it, so nothing that depends on it may be answered before
    /// [`Unsynced::synced`]. Meanwhile the connection serves the next transaction: a writer
    /// that commits again and again overlaps each sync with its next transaction's work.
    pub async fn commit_unsynced(self) -> Result<Unsynced<()>, sqlx::Error> {
        let wal = match self {
            Tx::Sqlite(tx, wal) => {
                tx.commit().await?;
                wal
            }
            Tx::Postgres(tx) => {
                tx.commit().await?;
                None
            }
        };
        Ok(Unsynced { value: (), wal })
    }

    pub async fn rollback(self) -> Result<(), sqlx::Error> {
        match self {
            Tx::Sqlite(tx, _) => tx.rollback().await,
            Tx::Postgres(tx) => tx.rollback().await,
        }
    }
}

/// What a commit made, to be had once the commit is durable: [`Unsynced::synced`] is the only way
/// to the value, so what a caller answers from it cannot go out before the sync.
#[derive(Debug)]
#[must_use = "a commit is durable only once synced"]
pub struct Unsynced<T> {
    value: T,
    /// The WAL file still to be synced (None: durable already).
    wal: Option<Arc<Wal>>,
}

impl<T> Unsynced<T> {
    /// What the commit made, with what else its caller carries to the sync.
    pub fn map<U>(self, f: impl FnOnce(T) -> U) -> Unsynced<U> {
        Unsynced {
            value: f(self.value),
            wal: self.wal,
        }
    }

    /// Waits until the commit is durable (SQLite: syncs its WAL file, on a blocking thread), and
    /// returns what it made.
    pub async fn synced(self) -> Result<T, sqlx::Error> {
        if let Some(wal) = self.wal {
            tokio::task::spawn_blocking(move || wal.sync())
                .await
                .map_err(|error| sqlx::Error::Io(std::io::Error::other(error)))?
                .map_err(sqlx::Error::Io)?;
        }
        Ok(self.value)
    }
}

/// The WAL file of an SQLite database whose writer commits without syncing (see
/// [`crate::storage::SqliteDb`]), and how many times it was synced.
#[derive(Debug)]
pub struct Wal {
    path: PathBuf,
    syncs: AtomicU64,
}

impl Wal {
    /// The WAL of the database file `database` (SQLite names it `<database>-wal`).
    pub fn of(database: &Path) -> Self {
        let mut path = database.as_os_str().to_owned();
        path.push("-wal");
        Self {
            path: path.into(),
            syncs: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Syncs made so far.
    pub fn syncs(&self) -> u64 {
        self.syncs.load(Ordering::Relaxed)
    }

    /// `fdatasync` of the WAL file: what synchronous=FULL does at the end of every commit (every
    /// frame written so far, the last commit's included, is on the disk when it returns).
    fn sync(&self) -> std::io::Result<()> {
        match std::fs::File::open(&self.path) {
            Ok(file) => file.sync_data()?,
            // No WAL file: the database's last connection closed since the commit, and SQLite
            // copied the WAL back into the database file, synced, before deleting it.
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => return Err(error),
        }
        self.syncs.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

/// Where a statement runs: a pool ([`Database`]) or an open transaction ([`Tx`]).
pub trait Executor: Send {
    fn target(&mut self) -> Target<'_>;
}

/// The concrete connection a statement runs on.
#[derive(Debug)]
pub enum Target<'a> {
    SqlitePool(&'a sqlx::SqlitePool),
    PgPool(&'a sqlx::PgPool),
    Sqlite(&'a mut SqliteConnection),
    Postgres(&'a mut PgConnection),
}

impl Executor for &Database {
    fn target(&mut self) -> Target<'_> {
        match self {
            Database::Sqlite(db) => Target::SqlitePool(&db.pool),
            Database::Postgres(pool) => Target::PgPool(pool),
        }
    }
}

impl Executor for &mut Tx {
    fn target(&mut self) -> Target<'_> {
        match self {
            Tx::Sqlite(tx, _) => Target::Sqlite(tx),
            Tx::Postgres(tx) => Target::Postgres(tx),
        }
    }
}

/// One bound value, kept as its own type until the backend is known.
#[derive(Debug, Clone)]
pub enum Value<'q> {
    Int(Option<i64>),
    Real(Option<f64>),
    Bool(Option<bool>),
    Text(Option<&'q str>),
    OwnedText(Option<String>),
    Blob(Option<&'q [u8]>),
    OwnedBlob(Option<Vec<u8>>),
    /// Text many statements bind (a batch's org, say): each bind shares it instead of copying it
    /// (sqlx copies a borrowed `&str` into a new allocation per bind).
    Shared(Arc<str>),
}

macro_rules! values_from {
    ($($t:ty => $variant:ident($v:ident) $e:expr;)*) => {
        $(impl<'q> From<$t> for Value<'q> {
            fn from($v: $t) -> Self {
                Value::$variant($e)
            }
        })*
    };
}

values_from! {
    i64 => Int(v) Some(v);
    Option<i64> => Int(v) v;
    &'q i64 => Int(v) Some(*v);
    &'q Option<i64> => Int(v) *v;
    i32 => Int(v) Some(i64::from(v));
    f64 => Real(v) Some(v);
    Option<f64> => Real(v) v;
    &'q Option<f64> => Real(v) *v;
    bool => Bool(v) Some(v);
    Option<bool> => Bool(v) v;
    &'q str => Text(v) Some(v);
    &'q String => Text(v) Some(v.as_str());
    Option<&'q str> => Text(v) v;
    &'q Option<String> => Text(v) v.as_deref();
    String => OwnedText(v) Some(v);
    Option<String> => OwnedText(v) v;
    &'q [u8] => Blob(v) Some(v);
    &'q Vec<u8> => Blob(v) Some(v.as_slice());
    Option<&'q [u8]> => Blob(v) v;
    &'q Option<Vec<u8>> => Blob(v) v.as_deref();
    Vec<u8> => OwnedBlob(v) Some(v);
    Option<Vec<u8>> => OwnedBlob(v) v;
    Arc<str> => Shared(v) v;
}

/// A statement with its bound values, run with one of the `execute` / `fetch_*` methods.
#[derive(Debug, Clone)]
pub struct Query<'q> {
    sql: SqlStr,
    args: Vec<Value<'q>>,
}

/// A statement whose text is fixed (`&'static str`) or assembled from trusted pieces
/// (`sqlx::AssertSqlSafe(format!(…))`).
pub fn query<'q>(sql: impl SqlSafeStr) -> Query<'q> {
    Query {
        sql: sql.into_sql_str(),
        args: Vec::new(),
    }
}

/// A statement whose rows are read as `T`, for where the binding that receives them does not name
/// the type: `sql::query_as::<(String, i64)>("…")`.
pub fn query_as<'q, T: Record>(sql: impl SqlSafeStr) -> TypedQuery<'q, T> {
    TypedQuery {
        query: query(sql),
        record: PhantomData,
    }
}

/// A [`Query`] that reads its rows as `T` ([`query_as`]).
#[derive(Debug)]
pub struct TypedQuery<'q, T> {
    query: Query<'q>,
    record: PhantomData<fn() -> T>,
}

impl<'q, T: Record> TypedQuery<'q, T> {
    pub fn bind(mut self, value: impl Into<Value<'q>>) -> Self {
        self.query = self.query.bind(value);
        self
    }

    pub async fn fetch_all(self, on: impl Executor) -> Result<Vec<T>, sqlx::Error> {
        self.query.fetch_all(on).await
    }

    pub async fn fetch_optional(self, on: impl Executor) -> Result<Option<T>, sqlx::Error> {
        self.query.fetch_optional(on).await
    }

    pub async fn fetch_one(self, on: impl Executor) -> Result<T, sqlx::Error> {
        self.query.fetch_one(on).await
    }
}

/// What a statement that returns no rows did.
#[derive(Debug, Clone, Copy)]
pub struct Done(u64);

impl Done {
    pub fn rows_affected(&self) -> u64 {
        self.0
    }
}

/// A row of either backend, read by column number.
#[derive(Debug)]
pub enum Row {
    Sqlite(SqliteRow),
    Postgres(PgRow),
}

impl Row {
    pub fn try_get<T: Decoded>(&self, index: usize) -> Result<T, sqlx::Error> {
        use sqlx::Row as _;
        match self {
            Row::Sqlite(row) => row.try_get(index),
            Row::Postgres(row) => row.try_get(index),
        }
    }
}

/// A column type both backends decode.
pub trait Decoded:
    for<'r> sqlx::Decode<'r, Sqlite>
    + sqlx::Type<Sqlite>
    + for<'r> sqlx::Decode<'r, Postgres>
    + sqlx::Type<Postgres>
{
}

impl<T> Decoded for T where
    T: for<'r> sqlx::Decode<'r, Sqlite>
        + sqlx::Type<Sqlite>
        + for<'r> sqlx::Decode<'r, Postgres>
        + sqlx::Type<Postgres>
{
}

/// A record both backends read from a row (`#[derive(sqlx::FromRow)]`, or a tuple).
pub trait Record:
    for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}

impl<T> Record for T where
    T: for<'r> FromRow<'r, SqliteRow> + for<'r> FromRow<'r, PgRow> + Send + Unpin
{
}

macro_rules! bind_all {
    ($query:expr, $args:expr) => {{
        let mut query = $query;
        for value in $args {
            query = match value {
                Value::Int(v) => query.bind(v),
                Value::Real(v) => query.bind(v),
                Value::Bool(v) => query.bind(v),
                Value::Text(v) => query.bind(v),
                Value::OwnedText(v) => query.bind(v),
                Value::Blob(v) => query.bind(v),
                Value::OwnedBlob(v) => query.bind(v),
                Value::Shared(v) => query.bind(v),
            };
        }
        query
    }};
}

impl<'q> Query<'q> {
    pub fn bind(mut self, value: impl Into<Value<'q>>) -> Self {
        self.args.push(value.into());
        self
    }

    /// The statement with its values already turned into SQLite's arguments, to run later on an
    /// SQLite connection: a writer can prepare the next statement while SQLite's thread runs the
    /// current one.
    pub fn into_sqlite(self) -> SqlxQuery<'q, Sqlite, SqliteArguments> {
        bind_all!(sqlx::query(self.sql), self.args)
    }

    fn postgres(self) -> SqlxQuery<'q, Postgres, PgArguments> {
        bind_all!(sqlx::query(self.sql), self.args)
    }

    fn sqlite_as<T: Record>(self) -> QueryAs<'q, Sqlite, T, SqliteArguments> {
        bind_all!(sqlx::query_as(self.sql), self.args)
    }

    fn postgres_as<T: Record>(self) -> QueryAs<'q, Postgres, T, PgArguments> {
        bind_all!(sqlx::query_as(self.sql), self.args)
    }

    pub async fn execute(self, mut on: impl Executor) -> Result<Done, sqlx::Error> {
        use sqlx::Executor as _;
        Ok(Done(match on.target() {
            Target::SqlitePool(pool) => pool.execute(self.into_sqlite()).await?.rows_affected(),
            Target::Sqlite(conn) => conn.execute(self.into_sqlite()).await?.rows_affected(),
            Target::PgPool(pool) => pool.execute(self.postgres()).await?.rows_affected(),
            Target::Postgres(conn) => conn.execute(self.postgres()).await?.rows_affected(),
        }))
    }

    pub async fn fetch_all<T: Record>(self, mut on: impl Executor) -> Result<Vec<T>, sqlx::Error> {
        match on.target() {
            Target::SqlitePool(pool) => self.sqlite_as().fetch_all(pool).await,
            Target::Sqlite(conn) => self.sqlite_as().fetch_all(conn).await,
            Target::PgPool(pool) => self.postgres_as().fetch_all(pool).await,
            Target::Postgres(conn) => self.postgres_as().fetch_all(conn).await,
        }
    }

    pub async fn fetch_optional<T: Record>(
        self,
        mut on: impl Executor,
    ) -> Result<Option<T>, sqlx::Error> {
        match on.target() {
            Target::SqlitePool(pool) => self.sqlite_as().fetch_optional(pool).await,
            Target::Sqlite(conn) => self.sqlite_as().fetch_optional(conn).await,
            Target::PgPool(pool) => self.postgres_as().fetch_optional(pool).await,
            Target::Postgres(conn) => self.postgres_as().fetch_optional(conn).await,
        }
    }

    pub async fn fetch_one<T: Record>(self, mut on: impl Executor) -> Result<T, sqlx::Error> {
        match on.target() {
            Target::SqlitePool(pool) => self.sqlite_as().fetch_one(pool).await,
            Target::Sqlite(conn) => self.sqlite_as().fetch_one(conn).await,
            Target::PgPool(pool) => self.postgres_as().fetch_one(pool).await,
            Target::Postgres(conn) => self.postgres_as().fetch_one(conn).await,
        }
    }

    /// Rows read by column number ([`Row::try_get`]), for a result no record type describes.
    pub async fn fetch_rows(self, mut on: impl Executor) -> Result<Vec<Row>, sqlx::Error> {
        Ok(match on.target() {
            Target::SqlitePool(pool) => {
                wrap(self.into_sqlite().fetch_all(pool).await?, Row::Sqlite)
            }
            Target::Sqlite(conn) => wrap(self.into_sqlite().fetch_all(conn).await?, Row::Sqlite),
            Target::PgPool(pool) => wrap(self.postgres().fetch_all(pool).await?, Row::Postgres),
            Target::Postgres(conn) => wrap(self.postgres().fetch_all(conn).await?, Row::Postgres),
        })
    }
}

/// Ids one `IN (…)` list holds at most: far below either backend's limit on bound values.
pub const IN_CHUNK: usize = 500;

/// The rows of `{head} IN (ids…) {tail}`, one statement per [`IN_CHUNK`] ids, in the order of
/// the chunks (so `tail` orders within each).
pub async fn fetch_in<T: Record>(
    db: &Database,
    head: &str,
    ids: &[String],
    tail: &str,
) -> Result<Vec<T>, sqlx::Error> {
    let mut all = Vec::new();
    for chunk in ids.chunks(IN_CHUNK) {
        let mut query = Builder::new(db.backend(), format!("{head} IN ("));
        let mut list = query.separated();
        for id in chunk {
            list.push_bind(id);
        }
        query.push(") ").push(tail);
        all.extend(query.build().fetch_all::<T>(db).await?);
    }
    Ok(all)
}

fn wrap<R>(rows: Vec<R>, row: fn(R) -> Row) -> Vec<Row> {
    rows.into_iter().map(row).collect()
}

/// A statement assembled piece by piece, for a row count known only at run time: each
/// [`Builder::push_bind`] writes the backend's next placeholder (`?` on SQLite, `$n` on
/// PostgreSQL).
#[derive(Debug)]
pub struct Builder<'q> {
    backend: Backend,
    sql: String,
    args: Vec<Value<'q>>,
}

impl<'q> Builder<'q> {
    pub fn new(backend: Backend, sql: impl Into<String>) -> Self {
        Self {
            backend,
            sql: sql.into(),
            args: Vec::new(),
        }
    }

    pub fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    pub fn push_bind(&mut self, value: impl Into<Value<'q>>) -> &mut Self {
        self.args.push(value.into());
        match self.backend {
            Backend::Sqlite => self.sql.push('?'),
            Backend::Postgres => {
                self.sql.push('$');
                self.sql.push_str(&self.args.len().to_string());
            }
        }
        self
    }

    /// `VALUES (…), (…)`: one parenthesised, comma-separated group per item, its values pushed by
    /// `row` through [`Builder::push_bind`] (the commas between them are written here).
    pub fn push_values<I: IntoIterator>(
        &mut self,
        items: I,
        mut row: impl FnMut(&mut Separated<'_, 'q>, I::Item),
    ) -> &mut Self {
        self.sql.push_str("VALUES ");
        for (n, item) in items.into_iter().enumerate() {
            if n > 0 {
                self.sql.push_str(", ");
            }
            self.sql.push('(');
            let mut separated = Separated {
                builder: self,
                first: true,
            };
            row(&mut separated, item);
            self.sql.push(')');
        }
        self
    }

    /// Binds pushed one after another with `, ` between them (an `IN (…)` list).
    pub fn separated(&mut self) -> Separated<'_, 'q> {
        Separated {
            builder: self,
            first: true,
        }
    }

    pub fn build(self) -> Query<'q> {
        Query {
            sql: AssertSqlSafe(self.sql).into_sql_str(),
            args: self.args,
        }
    }
}

/// Binds separated by commas, inside a [`Builder`].
#[derive(Debug)]
pub struct Separated<'b, 'q> {
    builder: &'b mut Builder<'q>,
    first: bool,
}

impl<'q> Separated<'_, 'q> {
    pub fn push_bind(&mut self, value: impl Into<Value<'q>>) -> &mut Self {
        if !self.first {
            self.builder.sql.push_str(", ");
        }
        self.first = false;
        self.builder.push_bind(value);
        self
    }
}
