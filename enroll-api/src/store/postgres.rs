//! The PostgreSQL dialect, with row-level security: connecting, the tenant
//! set per transaction, the statements that differ from SQLite, and how its
//! columns hold UUIDs and use counts. The queries themselves are in `sql.rs`.
//!
//! Migrations run on a dedicated connection as the login role (the table
//! owner). Every pooled connection then does `SET ROLE <app_role>`
//! (`oneprotect_app`, created NOLOGIN by the migration), and the store
//! refuses to start if that role is a superuser or has BYPASSRLS — so the
//! policies always apply. Each tenant-scoped operation runs in a transaction
//! that first calls `set_config('oneprotect.tenant_id', <tenant>, true)`.

use std::str::FromStr;
use std::time::Duration;

use sqlx::encode::IsNull;
use sqlx::error::BoxDynError;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgTypeInfo, PgValueRef};
use sqlx::{
    Connection, Database, Decode, Encode, Executor, PgConnection, PgPool, Postgres, Transaction,
    Type,
};
use uuid::Uuid;

use oneprotect_identity::TenantId;

use super::db::{Db, DbUuid, DialectSql, UseCount};
use super::{AnyStore, StoreError};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/postgres");

/// A pooled connection idle at least this long is pinged before use.
const PING_AFTER_IDLE: Duration = Duration::from_secs(1);

/// The role the migrations create and the service runs as.
pub const DEFAULT_APP_ROLE: &str = "oneprotect_app";

/// How to reach PostgreSQL.
#[derive(Debug, Clone)]
pub struct PgOptions {
    /// Connection URL of the login role (which must be allowed to `SET ROLE`
    /// to `app_role`).
    pub url: String,
    /// Schema to use (`search_path`); `None` for the server default.
    pub schema: Option<String>,
    /// The role every pooled connection switches to. Must match
    /// `[a-z_][a-z0-9_]*`.
    pub app_role: String,
    /// Pool size.
    pub max_connections: u32,
}

fn valid_ident(s: &str) -> bool {
    let mut chars = s.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

impl AnyStore {
    /// Opens the PostgreSQL store: connects, applies the embedded
    /// migrations as the login role, and opens a pool whose connections run
    /// as `app_role`. Fails if that role could bypass row-level security.
    pub async fn open_postgres(o: &PgOptions) -> Result<Self, StoreError> {
        if !valid_ident(&o.app_role) {
            return Err(StoreError::RoleBypassesRls(o.app_role.clone()));
        }
        let mut opts = PgConnectOptions::from_str(&o.url)?;
        if let Some(schema) = &o.schema {
            opts = opts.options([("search_path", schema.as_str())]);
        }
        let mut conn = PgConnection::connect_with(&opts).await?;
        MIGRATOR.run(&mut conn).await?;
        conn.close().await?;

        let set_role = format!("SET ROLE \"{}\"", o.app_role);
        let pool = PgPoolOptions::new()
            .max_connections(o.max_connections.max(1))
            .acquire_timeout(Duration::from_secs(5))
            // A connection that answered within the last second is handed
            // out as is; one idle longer is pinged first (and replaced if
            // dead). A backend that dies in between fails that one
            // operation, as it would mid-transaction: 503, nothing written.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for >= PING_AFTER_IDLE {
                        conn.ping().await?;
                    }
                    Ok(true)
                })
            })
            .after_connect(move |conn, _meta| {
                let set_role = set_role.clone();
                Box::pin(async move {
                    conn.execute(set_role.as_str()).await?;
                    Ok(())
                })
            })
            .connect_with(opts)
            .await?;
        let bypass: bool = sqlx::query_scalar(
            "SELECT rolsuper OR rolbypassrls FROM pg_roles WHERE rolname = current_user",
        )
        .fetch_one(&pool)
        .await?;
        if bypass {
            return Err(StoreError::RoleBypassesRls(o.app_role.clone()));
        }
        Ok(Self {
            db: Db::Postgres(pool),
            outbox: crate::relay::RelayWaker::new(),
            groups: Default::default(),
        })
    }

    /// The PostgreSQL pool (connections already switched to the app role),
    /// `None` on SQLite. For tests that show what a raw query without a
    /// tenant sees.
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.db {
            Db::Postgres(pool) => Some(pool),
            Db::Sqlite(_) => None,
        }
    }
}

/// A transaction whose first statement sets the tenant that the RLS
/// policies filter on (transaction-local).
pub(super) async fn begin(
    pool: &PgPool,
    tenant: TenantId,
) -> Result<Transaction<'static, Postgres>, StoreError> {
    // One round trip: `BEGIN` and the tenant in one simple query (both run
    // before the answer; a failing `set_config` fails the begin). The tenant
    // is a typed UUID, whose text is hex digits and hyphens only: nothing
    // in it can end the literal.
    Ok(pool
        .begin_with(format!(
            "BEGIN; SELECT set_config('oneprotect.tenant_id', '{tenant}', true)"
        ))
        .await?)
}

/// The statements that differ from SQLite's. The reads that run before the
/// tenant is known (by keyed hash) or across tenants (the outbox relay, the
/// projection rebuild, the rotation sweep) cannot see through RLS, so each
/// is one narrow `SECURITY DEFINER` function of the migrations returning
/// exactly what it needs; everything else runs under RLS with the tenant
/// set.
pub(super) const SQL: DialectSql = DialectSql {
    token_by_hash: "SELECT id, tenant_id, max_uses, uses, expires_at, created_at, revoked_at, \
                    description, labels, tenant_name, tenant_leaf_lifetime_secs, tenant_created_at \
                    FROM oneprotect_exchange_token($1)",
    admin_key_ref_by_hash: "SELECT key_id, tenant_id FROM oneprotect_admin_key_ref($1)",
    outbox_pending: "SELECT seq, body FROM oneprotect_outbox_pending($1)",
    // A VARIADIC function, its arguments as one array: a function takes at
    // most 100 arguments, so a full relay batch (the time and 100 seqs)
    // passed one by one was refused and wedged the relay on its first
    // backlog of 100 rows. The seqs stay separate bind parameters (no array
    // type among the store's arguments).
    outbox_mark_sent_many: |n| {
        format!(
            "SELECT oneprotect_outbox_mark_sent_many($1, VARIADIC ARRAY[{}]::bigint[])",
            crate::store::db::placeholders(2, n).trim_start_matches(", ")
        )
    },
    tenant_ids: "SELECT tenant_id FROM oneprotect_tenant_ids()",
    rotations_due: "SELECT tenant_id, agent_id FROM oneprotect_rotations_due($1, $2)",
    // `FOR UPDATE`: the row lock makes a concurrent rotation step of the same
    // agent wait and then decide on the committed result.
    rotation_state: "SELECT status, current_serial, previous_serial, previous_valid_until \
                     FROM agents WHERE tenant_id = $1 AND id = $2 FOR UPDATE",
    // One statement, in the implicit transaction of its own, for a group of
    // one token's exchanges (store/batch.rs): the function sets the tenant,
    // locks the token's row, takes as many uses as it writes agents and
    // writes the rows (migration 0007). Every exchange of a fleet's shared
    // token needs that row: in groups, one lock, update and commit serve
    // many exchanges (issue 16 part 3, ADR-0027).
    enroll_many: Some(enroll_many),
    // A group of one (a token with one exchange in flight: the usual case
    // when agents are spread over many tokens) as migration 0006's
    // single-exchange function: its plain arguments and single-row
    // statements cost the database less than arrays of one.
    enroll_one: Some(
        "SELECT oneprotect_enroll($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, \
         $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26, $27, $28)",
    ),
};

/// The array type of each of `sql::ENROLL_COLUMNS` columns, in argument
/// order (migration 0007's parameters after the first four).
#[rustfmt::skip]
const ENROLL_COLUMN_TYPES: [&str; crate::store::sql::ENROLL_COLUMNS] = [
    // the agent's row
    "uuid", "uuid", "text", "text", "text", "text", "text", "uuid", "bigint", "text", "bigint",
    // the certificate's
    "text", "uuid", "uuid", "text", "bigint", "bigint", "text", "bigint",
    // the event's
    "uuid", "uuid", "text", "bigint", "text",
];

/// `oneprotect_enroll_many` for a group of `n`: each column one array of
/// `n` placeholders.
fn enroll_many(n: usize) -> String {
    let mut sql = String::from("SELECT oneprotect_enroll_many($1, $2, $3, $4");
    for (column, ty) in ENROLL_COLUMN_TYPES.iter().enumerate() {
        let first = 5 + column * n;
        sql.push_str(", ARRAY[");
        sql.push_str(crate::store::db::placeholders(first, n).trim_start_matches(", "));
        sql.push_str("]::");
        sql.push_str(ty);
        sql.push_str("[]");
    }
    sql.push(')');
    sql
}

// UUIDs are native `uuid` columns.
impl Type<Postgres> for DbUuid {
    fn type_info() -> PgTypeInfo {
        <Uuid as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for DbUuid {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer<'_>,
    ) -> Result<IsNull, BoxDynError> {
        <Uuid as Encode<'_, Postgres>>::encode_by_ref(&self.0, buf)
    }
}

impl<'r> Decode<'r, Postgres> for DbUuid {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        <Uuid as Decode<'r, Postgres>>::decode(value).map(DbUuid)
    }
}

// Use counts are `integer` (32-bit) columns; a count above `i32::MAX` is
// stored as `i32::MAX`.
impl Type<Postgres> for UseCount {
    fn type_info() -> PgTypeInfo {
        <i32 as Type<Postgres>>::type_info()
    }
}

impl Encode<'_, Postgres> for UseCount {
    fn encode_by_ref(
        &self,
        buf: &mut <Postgres as Database>::ArgumentBuffer<'_>,
    ) -> Result<IsNull, BoxDynError> {
        <i32 as Encode<'_, Postgres>>::encode(i32::try_from(self.0).unwrap_or(i32::MAX), buf)
    }
}

impl<'r> Decode<'r, Postgres> for UseCount {
    fn decode(value: PgValueRef<'r>) -> Result<Self, BoxDynError> {
        Ok(UseCount(u32::try_from(
            <i32 as Decode<'r, Postgres>>::decode(value)?,
        )?))
    }
}

#[cfg(test)]
mod tests {
    /// Column `j` of a group of `n` is one array of placeholders `$5 + j·n ..`.
    #[test]
    fn the_group_statement_takes_one_array_per_column() {
        let sql = super::enroll_many(2);
        assert!(sql.starts_with(
            "SELECT oneprotect_enroll_many($1, $2, $3, $4, ARRAY[$5, $6]::uuid[], ARRAY[$7, $8]::uuid[], ARRAY[$9, $10]::text[]"
        ), "{sql}");
        assert!(sql.ends_with(", ARRAY[$51, $52]::text[])"), "{sql}");
        assert_eq!(
            sql.matches("ARRAY[").count(),
            crate::store::sql::ENROLL_COLUMNS
        );
    }
}
