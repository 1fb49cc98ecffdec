//! The SQLite dialect, the embedded default (one file): connecting, the
//! write-lock transaction, the statements that differ from PostgreSQL, and
//! how its columns hold UUIDs and use counts. The queries themselves are in
//! `sql.rs`.
//!
//! SQLite has no row-level security, so every query carries its `tenant_id`
//! filter. WAL mode with a busy timeout lets readers run beside the single
//! writer; the token consume is the first statement of its transaction, so
//! the write lock is taken up front and concurrent exchanges queue on the
//! busy timeout instead of failing on a lock upgrade.

use std::path::Path;
use std::time::Duration;

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous, SqliteTypeInfo,
    SqliteValueRef,
};
use sqlx::{Database, Decode, Encode, Sqlite, SqlitePool, Transaction, Type};

use super::db::{Db, DbUuid, DialectSql, UseCount};
use super::{AnyStore, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

impl AnyStore {
    /// Opens the SQLite store: the database file at `path` (created if
    /// missing), with the embedded migrations applied. `max_connections`
    /// bounds the pool.
    pub async fn open_sqlite(path: &Path, max_connections: u32) -> Result<Self, StoreError> {
        let opts = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let pool = SqlitePoolOptions::new()
            .max_connections(max_connections.max(1))
            .acquire_timeout(Duration::from_secs(10))
            .connect_with(opts)
            .await?;
        MIGRATOR.run(&pool).await?;
        Ok(Self {
            db: Db::Sqlite(pool),
            outbox: crate::relay::RelayWaker::new(),
            groups: Default::default(),
        })
    }
}

/// A transaction holding SQLite's write lock from its first statement, so a
/// read-decide-write sequence cannot fail on a lock upgrade.
pub(super) async fn begin_immediate(
    pool: &SqlitePool,
) -> Result<Transaction<'static, Sqlite>, StoreError> {
    Ok(pool.begin_with("BEGIN IMMEDIATE").await?)
}

/// The statements that differ from PostgreSQL's: without RLS there is
/// nothing to see through, so the pre-tenant and cross-tenant reads that
/// PostgreSQL makes through `SECURITY DEFINER` functions are plain queries
/// here (returning the same columns).
pub(super) const SQL: DialectSql = DialectSql {
    token_by_hash: "SELECT t.id, t.tenant_id, t.max_uses, t.uses, t.expires_at, t.created_at, \
                    t.revoked_at, t.description, t.labels, n.name AS tenant_name, \
                    n.leaf_lifetime_secs AS tenant_leaf_lifetime_secs, \
                    n.created_at AS tenant_created_at \
                    FROM enrollment_tokens t LEFT JOIN tenants n ON n.id = t.tenant_id \
                    WHERE t.token_hash = $1",
    admin_key_ref_by_hash: "SELECT id, tenant_id FROM admin_keys \
                            WHERE key_hash = $1 AND revoked_at IS NULL",
    outbox_pending: "SELECT seq, body FROM events_outbox WHERE published_at IS NULL \
                     ORDER BY seq LIMIT $1",
    outbox_mark_sent_many: |n| {
        format!(
            "UPDATE events_outbox SET published_at = $1 \
             WHERE published_at IS NULL AND seq IN ({})",
            crate::store::db::placeholders(2, n).trim_start_matches(", ")
        )
    },
    tenant_ids: "SELECT id FROM tenants ORDER BY id",
    rotations_due: "SELECT tenant_id, id FROM agents \
                    WHERE previous_valid_until IS NOT NULL AND previous_valid_until <= $1 \
                    ORDER BY previous_valid_until LIMIT $2",
    // No `FOR UPDATE` (SQLite has no row locks): the rotation steps run in a
    // `BEGIN IMMEDIATE` transaction, which holds the database write lock.
    rotation_state: "SELECT status, current_serial, previous_serial, previous_valid_until \
                     FROM agents WHERE tenant_id = $1 AND id = $2",
    // No stored procedures; the database's write lock serialises
    // exchanges whichever way they are written.
    enroll_many: None,
    enroll_one: None,
};

// SQLite has no UUID type: UUIDs are canonical text (lowercase, hyphenated),
// as the identity ids are.
impl Type<Sqlite> for DbUuid {
    fn type_info() -> SqliteTypeInfo {
        <str as Type<Sqlite>>::type_info()
    }
}

impl<'q> Encode<'q, Sqlite> for DbUuid {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as Database>::ArgumentBuffer<'q>,
    ) -> Result<IsNull, BoxDynError> {
        <String as Encode<'q, Sqlite>>::encode(self.0.to_string(), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for DbUuid {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(DbUuid(
            <&str as Decode<'r, Sqlite>>::decode(value)?.parse()?,
        ))
    }
}

// Use counts are 64-bit `INTEGER`s.
impl Type<Sqlite> for UseCount {
    fn type_info() -> SqliteTypeInfo {
        <i64 as Type<Sqlite>>::type_info()
    }
}

impl<'q> Encode<'q, Sqlite> for UseCount {
    fn encode_by_ref(
        &self,
        buf: &mut <Sqlite as Database>::ArgumentBuffer<'q>,
    ) -> Result<IsNull, BoxDynError> {
        <i64 as Encode<'q, Sqlite>>::encode(i64::from(self.0), buf)
    }
}

impl<'r> Decode<'r, Sqlite> for UseCount {
    fn decode(value: SqliteValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(UseCount(u32::try_from(
            <i64 as Decode<'r, Sqlite>>::decode(value)?,
        )?))
    }
}
