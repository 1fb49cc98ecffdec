//! The one place that knows there are two databases at run time: either
//! backend's pool and transaction, and the three ways to run a statement
//! (`execute`, `fetch_optional`, `fetch_all`) on either. `sql.rs` above it
//! writes every query once; the backends' own files below it supply only
//! what differs (connecting, the transaction set-up, a few statements, and
//! how a column holds a UUID or a use count).
//!
//! Statements use numbered placeholders (`$1`, `$2`, …), which PostgreSQL
//! and SQLite (through sqlx) both read; a number used twice is one value.

use std::borrow::Cow;

use sqlx::pool::PoolConnection;
use sqlx::postgres::PgRow;
use sqlx::sqlite::SqliteRow;
use sqlx::{
    Arguments, Database, Encode, FromRow, PgConnection, PgPool, Postgres, Sqlite, SqliteConnection,
    SqlitePool, Transaction, Type,
};
use time::OffsetDateTime;
use uuid::Uuid;

use oneprotect_identity::{AgentId, AgentStatus, SerialNumber, TenantId, TokenId};

use super::{postgres, sqlite, AnyStore, StoreError};
use crate::relay::RelayWaker;

/// Either backend's pool.
#[derive(Debug, Clone)]
pub(crate) enum Db {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

/// The statements whose text differs between the dialects; each backend's
/// table says why.
#[derive(Debug)]
pub(crate) struct DialectSql {
    /// The token with keyed hash `$1` (`SELECT_TOKEN`'s columns) and its
    /// tenant's `tenant_name, tenant_leaf_lifetime_secs, tenant_created_at`
    /// (`NULL` when the tenant is missing).
    pub(crate) token_by_hash: &'static str,
    /// `(id, tenant_id)` of the unrevoked admin key with keyed hash `$1`.
    pub(crate) admin_key_ref_by_hash: &'static str,
    /// `(seq, body)` of up to `$1` unsent outbox rows of every tenant, oldest first.
    pub(crate) outbox_pending: &'static str,
    /// The statement marking `n` outbox rows sent: `$1` the time, `$2 ..
    /// $n+1` the rows' seqs (each only if not yet sent).
    pub(crate) outbox_mark_sent_many: fn(usize) -> String,
    /// Every tenant id, in id order.
    pub(crate) tenant_ids: &'static str,
    /// `(tenant_id, agent_id)` of up to `$2` agents of every tenant whose
    /// rotation grace ended at or before `$1`, soonest first.
    pub(crate) rotations_due: &'static str,
    /// Agent `$2` of tenant `$1`: `status, current_serial, previous_serial,
    /// previous_valid_until`, read to decide a rotation step and write it in
    /// the same transaction.
    pub(crate) rotation_state: &'static str,
    /// The write of a group of exchanges of one token as one statement in
    /// its own transaction, for a group of `n`, where the dialect can
    /// (`None`: each exchange in a transaction, statement by statement).
    /// Arguments: `$1` token id, `$2` tenant, `$3` keyed hash, `$4` now,
    /// then `sql::ENROLL_COLUMNS` arrays of `n` (the agent's row, the
    /// certificate's and the event's, each column as its own `INSERT` of
    /// `sql.rs` takes it; column `j` at `$5 + j·n ..`). One `integer`: the
    /// uses it took; the first that many exchanges' rows are written.
    pub(crate) enroll_many: Option<fn(usize) -> String>,
    /// A group of one: the same write with plain arguments, cheaper than
    /// arrays of one (`None` with `enroll_many`). Arguments: the consume's
    /// four, then the agent's row, the certificate's and the event's, each
    /// as its own `INSERT` of `sql.rs` takes them (`$5 .. $15`, `$16 ..
    /// $23`, `$24 .. $28`). One `integer`: the uses it took (0 or 1).
    pub(crate) enroll_one: Option<&'static str>,
}

/// `n` numbered placeholders from `$first`, each preceded by `, ` (a
/// statement's tail): `placeholders(2, 3)` is `, $2, $3, $4`.
pub(crate) fn placeholders(first: usize, n: usize) -> String {
    (first..first + n).map(|i| format!(", ${i}")).collect()
}

/// A UUID column that is not one of the identity newtypes (admin key ids,
/// `created_by`, event ids): how each backend holds it is its own
/// `Type`/`Encode`/`Decode` impl, the same rule as the identity ids'.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DbUuid(pub(crate) Uuid);

/// A token's `max_uses` or `uses`: the column's integer width is each
/// backend's `Type`/`Encode`/`Decode` impl.
#[derive(Debug, Clone, Copy)]
pub(crate) struct UseCount(pub(crate) u32);

/// One bind value, made with `.into()` from the store's types.
#[derive(Debug, Clone)]
pub(crate) enum Arg<'a> {
    /// A UUID column (the identity ids and [`DbUuid`]s).
    Uuid(Uuid),
    /// An integer column: timestamps (unix seconds), limits, sequence numbers.
    Int(i64),
    /// A token's use count or limit.
    Count(u32),
    /// A text column.
    Text(Cow<'a, str>),
    /// A nullable text column.
    OptText(Option<&'a str>),
    /// A keyed hash.
    Bytes(&'a [u8]),
}

macro_rules! uuid_arg {
    ($($t:ty),*) => {$(
        impl From<$t> for Arg<'_> {
            fn from(id: $t) -> Self {
                Arg::Uuid(*id.as_uuid())
            }
        }
    )*};
}
uuid_arg!(TenantId, AgentId, TokenId);

impl From<Uuid> for Arg<'_> {
    fn from(u: Uuid) -> Self {
        Arg::Uuid(u)
    }
}

impl From<OffsetDateTime> for Arg<'_> {
    fn from(t: OffsetDateTime) -> Self {
        Arg::Int(t.unix_timestamp())
    }
}

impl From<i64> for Arg<'_> {
    fn from(i: i64) -> Self {
        Arg::Int(i)
    }
}

impl From<SerialNumber> for Arg<'_> {
    fn from(s: SerialNumber) -> Self {
        Arg::Text(Cow::Owned(s.to_string()))
    }
}

impl From<AgentStatus> for Arg<'_> {
    fn from(s: AgentStatus) -> Self {
        Arg::Text(Cow::Borrowed(s.as_str()))
    }
}

impl From<String> for Arg<'_> {
    fn from(s: String) -> Self {
        Arg::Text(Cow::Owned(s))
    }
}

impl<'a> From<&'a str> for Arg<'a> {
    fn from(s: &'a str) -> Self {
        Arg::Text(Cow::Borrowed(s))
    }
}

impl<'a> From<Option<&'a str>> for Arg<'a> {
    fn from(s: Option<&'a str>) -> Self {
        Arg::OptText(s)
    }
}

impl<'a> From<&'a [u8]> for Arg<'a> {
    fn from(b: &'a [u8]) -> Self {
        Arg::Bytes(b)
    }
}

/// `args` as `DB`'s bind arguments.
fn arguments<'q, DB: Database>(args: &'q [Arg<'_>]) -> Result<DB::Arguments<'q>, sqlx::Error>
where
    DbUuid: Encode<'q, DB> + Type<DB>,
    UseCount: Encode<'q, DB> + Type<DB>,
    i64: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    Option<&'q str>: Encode<'q, DB> + Type<DB>,
    &'q [u8]: Encode<'q, DB> + Type<DB>,
{
    let mut out = DB::Arguments::default();
    for arg in args {
        match arg {
            Arg::Uuid(u) => out.add(DbUuid(*u)),
            Arg::Int(i) => out.add(*i),
            Arg::Count(n) => out.add(UseCount(*n)),
            Arg::Text(s) => out.add(s.as_ref()),
            Arg::OptText(s) => out.add(*s),
            Arg::Bytes(b) => out.add(*b),
        }
        .map_err(sqlx::Error::Encode)?;
    }
    Ok(out)
}

/// A row type both backends decode (a `#[derive(FromRow)]` struct over
/// types with codecs on both, or a tuple of them).
pub(crate) trait Decodable:
    for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

impl<T> Decodable for T where
    T: for<'r> FromRow<'r, PgRow> + for<'r> FromRow<'r, SqliteRow> + Send + Unpin
{
}

/// A connection of either backend, in or outside a transaction.
pub(crate) enum Conn<'c> {
    Postgres(&'c mut PgConnection),
    Sqlite(&'c mut SqliteConnection),
}

impl Conn<'_> {
    /// Runs a statement; the number of rows it changed.
    pub(crate) async fn execute(self, sql: &str, args: &[Arg<'_>]) -> Result<u64, StoreError> {
        let done = match self {
            Conn::Postgres(c) => sqlx::query_with(sql, arguments::<Postgres>(args)?)
                .execute(c)
                .await?
                .rows_affected(),
            Conn::Sqlite(c) => sqlx::query_with(sql, arguments::<Sqlite>(args)?)
                .execute(c)
                .await?
                .rows_affected(),
        };
        Ok(done)
    }

    /// The first row of a query, if any.
    pub(crate) async fn fetch_optional<T: Decodable>(
        self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Option<T>, StoreError> {
        Ok(match self {
            Conn::Postgres(c) => {
                sqlx::query_as_with(sql, arguments::<Postgres>(args)?)
                    .fetch_optional(c)
                    .await?
            }
            Conn::Sqlite(c) => {
                sqlx::query_as_with(sql, arguments::<Sqlite>(args)?)
                    .fetch_optional(c)
                    .await?
            }
        })
    }

    /// Every row of a query.
    pub(crate) async fn fetch_all<T: Decodable>(
        self,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<T>, StoreError> {
        Ok(match self {
            Conn::Postgres(c) => {
                sqlx::query_as_with(sql, arguments::<Postgres>(args)?)
                    .fetch_all(c)
                    .await?
            }
            Conn::Sqlite(c) => {
                sqlx::query_as_with(sql, arguments::<Sqlite>(args)?)
                    .fetch_all(c)
                    .await?
            }
        })
    }
}

/// Either backend's open transaction.
enum Backend {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

/// A transaction of either backend. It remembers whether it wrote an outbox
/// row; [`Tx::commit`] then wakes the store's relay (ADR-0019), so no caller
/// has to.
pub(crate) struct Tx {
    backend: Backend,
    outbox: RelayWaker,
    wrote_outbox: bool,
}

impl Tx {
    fn new(backend: Backend, outbox: &RelayWaker) -> Self {
        Self {
            backend,
            outbox: outbox.clone(),
            wrote_outbox: false,
        }
    }

    /// The connection the transaction runs on.
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match &mut self.backend {
            Backend::Postgres(tx) => Conn::Postgres(tx),
            Backend::Sqlite(tx) => Conn::Sqlite(tx),
        }
    }

    /// This backend's differing statements.
    pub(crate) fn dialect(&self) -> &'static DialectSql {
        match self.backend {
            Backend::Postgres(_) => &postgres::SQL,
            Backend::Sqlite(_) => &sqlite::SQL,
        }
    }

    /// Notes that the transaction inserted an outbox row (`sql.rs`'s one
    /// `insert_event` calls it).
    pub(crate) fn wrote_outbox(&mut self) {
        self.wrote_outbox = true;
    }

    /// Commits; when an outbox row was written, then wakes the relay (only
    /// after the commit answered: the relay must find the row).
    pub(crate) async fn commit(self) -> Result<(), StoreError> {
        match self.backend {
            Backend::Postgres(tx) => tx.commit().await?,
            Backend::Sqlite(tx) => tx.commit().await?,
        }
        if self.wrote_outbox {
            self.outbox.wake();
        }
        Ok(())
    }

    /// Rolls back (as dropping it would, but waiting for the answer).
    pub(crate) async fn rollback(self) -> Result<(), StoreError> {
        match self.backend {
            Backend::Postgres(tx) => tx.rollback().await?,
            Backend::Sqlite(tx) => tx.rollback().await?,
        }
        Ok(())
    }
}

/// A pooled connection outside any transaction.
pub(crate) enum Pooled {
    Postgres(PoolConnection<Postgres>),
    Sqlite(PoolConnection<Sqlite>),
}

impl Pooled {
    /// The connection.
    pub(crate) fn conn(&mut self) -> Conn<'_> {
        match self {
            Pooled::Postgres(c) => Conn::Postgres(c),
            Pooled::Sqlite(c) => Conn::Sqlite(c),
        }
    }
}

impl AnyStore {
    /// A transaction over `tenant`'s rows. On PostgreSQL it first sets the
    /// tenant for row-level security; on SQLite it is a plain (deferred)
    /// `BEGIN`, and every statement carries its tenant filter.
    pub(crate) async fn begin(&self, tenant: TenantId) -> Result<Tx, StoreError> {
        let backend = match &self.db {
            Db::Postgres(pool) => Backend::Postgres(postgres::begin(pool, tenant).await?),
            Db::Sqlite(pool) => Backend::Sqlite(pool.begin().await?),
        };
        Ok(Tx::new(backend, &self.outbox))
    }

    /// A transaction that reads, decides and then writes (the rotation
    /// steps). On PostgreSQL as [`Self::begin`]: the read takes the agent's
    /// row lock (`FOR UPDATE`). SQLite has no row locks, so it takes the
    /// database write lock up front (`BEGIN IMMEDIATE`) and the sequence
    /// cannot fail on a lock upgrade.
    pub(crate) async fn begin_write(&self, tenant: TenantId) -> Result<Tx, StoreError> {
        let backend = match &self.db {
            Db::Postgres(pool) => Backend::Postgres(postgres::begin(pool, tenant).await?),
            Db::Sqlite(pool) => Backend::Sqlite(sqlite::begin_immediate(pool).await?),
        };
        Ok(Tx::new(backend, &self.outbox))
    }

    /// A connection outside any transaction, for the narrow cross-tenant
    /// and pre-tenant statements of [`DialectSql`].
    pub(crate) async fn pooled(&self) -> Result<Pooled, StoreError> {
        Ok(match &self.db {
            Db::Postgres(pool) => Pooled::Postgres(pool.acquire().await?),
            Db::Sqlite(pool) => Pooled::Sqlite(pool.acquire().await?),
        })
    }

    /// This backend's differing statements.
    pub(crate) fn dialect(&self) -> &'static DialectSql {
        match &self.db {
            Db::Postgres(_) => &postgres::SQL,
            Db::Sqlite(_) => &sqlite::SQL,
        }
    }

    /// The relay waker every commit that wrote an outbox row wakes (shared
    /// by the store's clones); the relay waits on it.
    pub fn relay_waker(&self) -> &RelayWaker {
        &self.outbox
    }

    /// Closes the pool; later operations fail as unavailable.
    pub async fn close(&self) {
        match &self.db {
            Db::Postgres(pool) => pool.close().await,
            Db::Sqlite(pool) => pool.close().await,
        }
    }
}
