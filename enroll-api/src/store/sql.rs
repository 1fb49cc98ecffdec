//! Every query of the store, written once (SPIRE's `sqlstore.go`): the
//! [`Store`] implementation over either backend.
//!
//! Each tenant-scoped operation runs in one transaction from
//! [`AnyStore::begin`] (on PostgreSQL the tenant is set for row-level
//! security first) and still filters on `tenant_id` in every statement, which
//! is all the isolation SQLite has. Outbox events are written in the same
//! transaction as the change they announce. The statements whose text
//! differs between the dialects come from the backend's `DialectSql` table;
//! rows decode through `FromRow` into the small row structs below.

use std::borrow::Cow;
use std::fmt::Write as _;

use sqlx::FromRow;
use time::OffsetDateTime;

use oneprotect_identity::events::{Actor, Event, Payload};
use oneprotect_identity::{AgentId, AgentStatus, CertStatus, SerialNumber, TenantId, TokenId};

use super::db::{Arg, DbUuid, Decodable, Tx, UseCount};
use super::rotation::{
    plan_confirmation, plan_expiry, plan_rotation, rotated_event, superseded_event, RotationState,
};
use super::window_start;
use super::{
    AdminKeyRef, AgentRecord, AnyStore, CertificateState, ConfirmOutcome, EnrollOutcome,
    Enrollment, NewAdminKey, NewToken, OutboxEvent, Page, ReuseOutcome, RotateOutcome, Rotation,
    RotationRefusal, Store, StoreError, Supersede, SupersededUseRecord, Tenant, TokenRecord,
    TokenRefusal, TokenStatus,
};

const SELECT_TOKEN: &str = "SELECT id, tenant_id, max_uses, uses, expires_at, created_at, \
     revoked_at, description, labels FROM enrollment_tokens";
const SELECT_AGENT: &str = "SELECT id, tenant_id, spiffe_id, status, hostname, os, \
     agent_version, token_id, enrolled_at, current_serial, certificate_not_after, revoked_at, \
     revocation_reason, previous_serial, previous_valid_until FROM agents";

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

fn ts(secs: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp(secs).map_err(corrupt)
}

fn opt_ts(secs: Option<i64>) -> Result<Option<OffsetDateTime>, StoreError> {
    secs.map(ts).transpose()
}

fn event_json(e: &Event) -> Result<String, StoreError> {
    serde_json::to_string(e).map_err(corrupt)
}

#[derive(FromRow)]
struct TenantRow {
    id: TenantId,
    name: String,
    leaf_lifetime_secs: i64,
    created_at: i64,
}

impl TryFrom<TenantRow> for Tenant {
    type Error = StoreError;
    fn try_from(r: TenantRow) -> Result<Self, StoreError> {
        Ok(Tenant {
            id: r.id,
            name: r.name,
            leaf_lifetime_secs: r.leaf_lifetime_secs,
            created_at: ts(r.created_at)?,
        })
    }
}

#[derive(FromRow)]
struct TokenRow {
    id: TokenId,
    tenant_id: TenantId,
    max_uses: UseCount,
    uses: UseCount,
    expires_at: i64,
    created_at: i64,
    revoked_at: Option<i64>,
    description: Option<String>,
    labels: String,
}

/// A token with its tenant's columns (`DialectSql::token_by_hash`); the
/// tenant's are `NULL` when it is missing (a broken store).
#[derive(FromRow)]
struct TokenAndTenantRow {
    #[sqlx(flatten)]
    token: TokenRow,
    tenant_name: Option<String>,
    tenant_leaf_lifetime_secs: Option<i64>,
    tenant_created_at: Option<i64>,
}

impl TryFrom<TokenAndTenantRow> for (TokenRecord, Option<Tenant>) {
    type Error = StoreError;
    fn try_from(r: TokenAndTenantRow) -> Result<Self, StoreError> {
        let tenant = match (
            r.tenant_name,
            r.tenant_leaf_lifetime_secs,
            r.tenant_created_at,
        ) {
            (Some(name), Some(leaf_lifetime_secs), Some(created_at)) => {
                Some(Tenant::try_from(TenantRow {
                    id: r.token.tenant_id,
                    name,
                    leaf_lifetime_secs,
                    created_at,
                })?)
            }
            _ => None,
        };
        Ok((TokenRecord::try_from(r.token)?, tenant))
    }
}

impl TryFrom<TokenRow> for TokenRecord {
    type Error = StoreError;
    fn try_from(r: TokenRow) -> Result<Self, StoreError> {
        Ok(TokenRecord {
            id: r.id,
            tenant_id: r.tenant_id,
            max_uses: r.max_uses.0,
            uses: r.uses.0,
            expires_at: ts(r.expires_at)?,
            created_at: ts(r.created_at)?,
            revoked_at: opt_ts(r.revoked_at)?,
            description: r.description,
            labels: serde_json::from_str(&r.labels).map_err(corrupt)?,
        })
    }
}

#[derive(FromRow)]
struct AgentRow {
    id: AgentId,
    tenant_id: TenantId,
    spiffe_id: String,
    status: AgentStatus,
    hostname: String,
    os: String,
    agent_version: String,
    token_id: TokenId,
    enrolled_at: i64,
    current_serial: SerialNumber,
    certificate_not_after: i64,
    revoked_at: Option<i64>,
    revocation_reason: Option<String>,
    previous_serial: Option<SerialNumber>,
    previous_valid_until: Option<i64>,
}

impl TryFrom<AgentRow> for AgentRecord {
    type Error = StoreError;
    fn try_from(r: AgentRow) -> Result<Self, StoreError> {
        Ok(AgentRecord {
            id: r.id,
            tenant_id: r.tenant_id,
            spiffe_id: r.spiffe_id,
            status: r.status,
            hostname: r.hostname,
            os: r.os,
            agent_version: r.agent_version,
            token_id: r.token_id,
            enrolled_at: ts(r.enrolled_at)?,
            current_serial: r.current_serial,
            certificate_not_after: ts(r.certificate_not_after)?,
            previous_serial: r.previous_serial,
            previous_valid_until: opt_ts(r.previous_valid_until)?,
            revoked_at: opt_ts(r.revoked_at)?,
            revocation_reason: r.revocation_reason,
        })
    }
}

#[derive(FromRow)]
struct CertificateRow {
    serial: SerialNumber,
    agent_id: AgentId,
    status: CertStatus,
    not_after: i64,
}

impl TryFrom<CertificateRow> for CertificateState {
    type Error = StoreError;
    fn try_from(r: CertificateRow) -> Result<Self, StoreError> {
        Ok(CertificateState {
            serial: r.serial,
            agent_id: r.agent_id,
            status: r.status,
            not_after: ts(r.not_after)?,
        })
    }
}

#[derive(FromRow)]
struct OutboxRow {
    seq: i64,
    body: String,
}

impl TryFrom<OutboxRow> for OutboxEvent {
    type Error = StoreError;
    fn try_from(r: OutboxRow) -> Result<Self, StoreError> {
        Ok(OutboxEvent {
            seq: r.seq,
            event: serde_json::from_str(&r.body).map_err(corrupt)?,
        })
    }
}

#[derive(FromRow)]
struct RotationRow {
    status: AgentStatus,
    current_serial: SerialNumber,
    previous_serial: Option<SerialNumber>,
    previous_valid_until: Option<i64>,
}

/// Decodes every row into its record.
fn records<R, T>(rows: Vec<R>) -> Result<Vec<T>, StoreError>
where
    T: TryFrom<R, Error = StoreError>,
{
    rows.into_iter().map(T::try_from).collect()
}

/// A statement whose filters vary, with its binds numbered as they are
/// pushed.
struct Statement<'a> {
    sql: String,
    args: Vec<Arg<'a>>,
}

impl<'a> Statement<'a> {
    fn new(sql: &str) -> Self {
        Self {
            sql: sql.to_owned(),
            args: Vec::new(),
        }
    }

    fn push(&mut self, sql: &str) -> &mut Self {
        self.sql.push_str(sql);
        self
    }

    fn bind(&mut self, arg: impl Into<Arg<'a>>) -> &mut Self {
        self.args.push(arg.into());
        // Writing to a String cannot fail.
        let _ = write!(self.sql, "${}", self.args.len());
        self
    }
}

/// The condition (over `revoked_at`, `uses`, `max_uses`, `expires_at`) that
/// selects tokens with `status` at `now`: [`TokenRecord::status`] in SQL.
fn token_status_filter(q: &mut Statement<'_>, status: TokenStatus, now: OffsetDateTime) {
    match status {
        TokenStatus::Revoked => q.push(" AND revoked_at IS NOT NULL"),
        TokenStatus::UsedUp => q.push(" AND revoked_at IS NULL AND uses >= max_uses"),
        TokenStatus::Expired => q
            .push(" AND revoked_at IS NULL AND uses < max_uses AND expires_at <= ")
            .bind(now),
        TokenStatus::Active => q
            .push(" AND revoked_at IS NULL AND uses < max_uses AND expires_at > ")
            .bind(now),
    };
}

/// The free-text rule ([`crate::text`]) for what the store writes from
/// clients, checked before any transaction opens, so that neither backend
/// holds what the other would refuse (PostgreSQL cannot store a NUL).
mod text_rule {
    use super::{Enrollment, NewToken, StoreError};
    use crate::text::check_no_control;

    pub(super) fn token(t: &NewToken) -> Result<(), StoreError> {
        if let Some(d) = &t.record.description {
            check_no_control("description", d)?;
        }
        for (k, v) in &t.record.labels {
            check_no_control("labels", k)?;
            check_no_control("labels", v)?;
        }
        Ok(())
    }

    pub(super) fn enrollment(e: &Enrollment) -> Result<(), StoreError> {
        check_no_control("agent.hostname", &e.agent.hostname)?;
        check_no_control("agent.os", &e.agent.os)?;
        check_no_control("agent.agent_version", &e.agent.agent_version)?;
        Ok(())
    }

    pub(super) fn reason(reason: &str) -> Result<(), StoreError> {
        Ok(check_no_control("reason", reason)?)
    }
}

/// An outbox row: `event_id, tenant_id, event_type, occurred_at, body`.
const INSERT_EVENT: &str = "INSERT INTO events_outbox (event_id, tenant_id, event_type, \
     occurred_at, body) VALUES ($1, $2, $3, $4, $5)";

/// [`INSERT_EVENT`]'s arguments.
fn event_args(event: &Event) -> Result<[Arg<'static>; 5], StoreError> {
    Ok([
        event.event_id.into(),
        event.tenant_id.into(),
        event.payload.event_type().into(),
        event.occurred_at.into(),
        event_json(event)?.into(),
    ])
}

async fn insert_event(tx: &mut Tx, event: &Event) -> Result<(), StoreError> {
    tx.conn().execute(INSERT_EVENT, &event_args(event)?).await?;
    tx.wrote_outbox();
    Ok(())
}

/// The consume of an exchange: one use of the token, only while it is
/// usable and its hash matches. Its row count decides a race: on PostgreSQL
/// (READ COMMITTED) a concurrent updater of the row waits, then re-evaluates
/// the `WHERE` on the new version, so the count is exact; on SQLite the
/// `UPDATE` takes the write lock at once, so concurrent exchanges queue on
/// the busy timeout.
const CONSUME_TOKEN: &str = "UPDATE enrollment_tokens SET uses = uses + 1 \
     WHERE id = $1 AND tenant_id = $2 AND token_hash = $3 \
     AND revoked_at IS NULL AND uses < max_uses AND expires_at > $4";

/// The consume's four arguments.
fn consume_args(e: &Enrollment) -> [Arg<'_>; 4] {
    [
        e.token_id.into(),
        e.agent.tenant_id.into(),
        e.token_hash.as_slice().into(),
        e.now.into(),
    ]
}

/// A new agent's row, in column order.
const INSERT_AGENT: &str = "INSERT INTO agents (id, tenant_id, spiffe_id, status, hostname, \
     os, agent_version, token_id, enrolled_at, current_serial, certificate_not_after) \
     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)";

/// [`INSERT_AGENT`]'s arguments.
fn agent_args(a: &AgentRecord) -> [Arg<'_>; 11] {
    [
        a.id.into(),
        a.tenant_id.into(),
        a.spiffe_id.as_str().into(),
        a.status.into(),
        a.hostname.as_str().into(),
        a.os.as_str().into(),
        a.agent_version.as_str().into(),
        a.token_id.into(),
        a.enrolled_at.into(),
        a.current_serial.into(),
        a.certificate_not_after.into(),
    ]
}

/// A new agent's first certificate, `active`.
const INSERT_CERTIFICATE: &str = "INSERT INTO certificates (serial, tenant_id, agent_id, \
     status, fingerprint, not_before, not_after, cert_pem, issued_at) \
     VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $8)";

/// [`INSERT_CERTIFICATE`]'s arguments.
fn certificate_args(e: &Enrollment) -> [Arg<'_>; 8] {
    let c = &e.certificate;
    [
        c.serial.into(),
        e.agent.tenant_id.into(),
        e.agent.id.into(),
        c.fingerprint.as_str().into(),
        c.not_before.into(),
        c.not_after.into(),
        c.cert_pem.as_str().into(),
        e.now.into(),
    ]
}

/// The columns of one exchange's three rows, as the group statement takes
/// them (`DialectSql::enroll_many`): the agent's, the certificate's and the
/// event's arguments, each as its own `INSERT` above takes them.
pub(crate) const ENROLL_COLUMNS: usize = 11 + 8 + 5;

/// Writes a group of exchanges of one token (`group[0]`'s; every one of
/// the same token and tenant, in queue order) with the dialect's
/// `enroll_many` statement, in its own transaction: takes as many uses as
/// the token has left, up to the group's size, and writes the rows of that
/// many exchanges, first ones first. Returns how many took a use. The
/// expiry is checked at the group's latest `now`.
pub(crate) async fn enroll_group(
    store: &AnyStore,
    group: &[&Enrollment],
) -> Result<usize, StoreError> {
    let dialect = store.dialect();
    let (Some(first), Some(many)) = (group.first(), dialect.enroll_many) else {
        return Ok(0);
    };
    let mut args: Vec<Arg<'_>> = Vec::with_capacity(4 + ENROLL_COLUMNS * group.len());
    let sql = match (group.len(), dialect.enroll_one) {
        (1, Some(one)) => {
            args.extend(consume_args(first));
            args.extend(agent_args(&first.agent));
            args.extend(certificate_args(first));
            args.extend(event_args(&first.event)?);
            Cow::Borrowed(one)
        }
        (n, _) => {
            let rows = group
                .iter()
                .map(|e| {
                    let mut row = Vec::with_capacity(ENROLL_COLUMNS);
                    row.extend(agent_args(&e.agent));
                    row.extend(certificate_args(e));
                    row.extend(event_args(&e.event)?);
                    Ok(row)
                })
                .collect::<Result<Vec<Vec<Arg<'_>>>, StoreError>>()?;
            // The consume's four, then column by column, one array each.
            let now = group.iter().map(|e| e.now).max().unwrap_or(first.now);
            args.extend([
                first.token_id.into(),
                first.agent.tenant_id.into(),
                first.token_hash.as_slice().into(),
                now.into(),
            ]);
            for column in 0..ENROLL_COLUMNS {
                args.extend(rows.iter().map(|row| row[column].clone()));
            }
            Cow::Owned(many(n))
        }
    };
    let (granted,): (i32,) = store
        .pooled()
        .await?
        .conn()
        .fetch_optional(&sql, &args)
        .await?
        .ok_or_else(|| corrupt("the enrollment statement returned no row"))?;
    let granted = usize::try_from(granted)
        .ok()
        .filter(|g| *g <= group.len())
        .ok_or_else(|| corrupt("the enrollment statement granted more uses than asked"))?;
    if granted > 0 {
        store.relay_waker().wake();
    }
    Ok(granted)
}

/// An enrollment statement by statement: the consume first, then (only if
/// it took a use) the agent, its certificate and the event.
async fn enroll_in_steps(tx: &mut Tx, e: &Enrollment) -> Result<bool, StoreError> {
    if tx.conn().execute(CONSUME_TOKEN, &consume_args(e)).await? != 1 {
        return Ok(false);
    }
    tx.conn()
        .execute(INSERT_AGENT, &agent_args(&e.agent))
        .await?;
    tx.conn()
        .execute(INSERT_CERTIFICATE, &certificate_args(e))
        .await?;
    insert_event(tx, &e.event).await?;
    Ok(true)
}

const SELECT_TENANT: &str =
    "SELECT id, name, leaf_lifetime_secs, created_at FROM tenants WHERE id = $1";

const SELECT_AGENT_CERTIFICATES: &str =
    "SELECT serial, agent_id, status, not_after FROM certificates \
     WHERE tenant_id = $1 AND agent_id = $2 ORDER BY serial";

async fn fetch_token_in(
    tx: &mut Tx,
    tenant: TenantId,
    id: TokenId,
) -> Result<Option<TokenRecord>, StoreError> {
    let row: Option<TokenRow> = tx
        .conn()
        .fetch_optional(
            &format!("{SELECT_TOKEN} WHERE tenant_id = $1 AND id = $2"),
            &[tenant.into(), id.into()],
        )
        .await?;
    row.map(TokenRecord::try_from).transpose()
}

async fn fetch_agent_in(
    tx: &mut Tx,
    tenant: TenantId,
    id: AgentId,
) -> Result<Option<AgentRecord>, StoreError> {
    let row: Option<AgentRow> = tx
        .conn()
        .fetch_optional(
            &format!("{SELECT_AGENT} WHERE tenant_id = $1 AND id = $2"),
            &[tenant.into(), id.into()],
        )
        .await?;
    row.map(AgentRecord::try_from).transpose()
}

/// The agent's rotation state, read with the dialect's statement (under the
/// agent's row lock on PostgreSQL): a concurrent rotation of the same agent
/// waits, then decides on the committed result.
async fn rotation_state(
    tx: &mut Tx,
    tenant: TenantId,
    agent: AgentId,
    presented: Option<SerialNumber>,
) -> Result<Option<RotationState>, StoreError> {
    let sql = tx.dialect().rotation_state;
    let Some(row) = tx
        .conn()
        .fetch_optional::<RotationRow>(sql, &[tenant.into(), agent.into()])
        .await?
    else {
        return Ok(None);
    };
    let presented = match presented {
        None => None,
        Some(serial) => tx
            .conn()
            .fetch_optional::<(CertStatus,)>(
                "SELECT status FROM certificates \
                 WHERE tenant_id = $1 AND agent_id = $2 AND serial = $3",
                &[tenant.into(), agent.into(), serial.into()],
            )
            .await?
            .map(|(status,)| status),
    };
    Ok(Some(RotationState {
        status: row.status,
        current: row.current_serial,
        previous: row.previous_serial,
        previous_valid_until: opt_ts(row.previous_valid_until)?,
        presented,
    }))
}

/// Marks `s.serial` superseded (only if active) and writes its event.
async fn apply_supersede(
    tx: &mut Tx,
    tenant: TenantId,
    agent: AgentId,
    s: &Supersede,
    actor: Actor,
    now: OffsetDateTime,
) -> Result<(), StoreError> {
    tx.conn()
        .execute(
            "UPDATE certificates SET status = 'superseded', superseded_at = $4 \
             WHERE tenant_id = $1 AND agent_id = $2 AND serial = $3 AND status = 'active'",
            &[tenant.into(), agent.into(), s.serial.into(), now.into()],
        )
        .await?;
    insert_event(tx, &superseded_event(tenant, agent, s, actor, now)).await
}

/// Ends the agent's pending rotation (no previous certificate).
async fn clear_previous(tx: &mut Tx, tenant: TenantId, agent: AgentId) -> Result<(), StoreError> {
    tx.conn()
        .execute(
            "UPDATE agents SET previous_serial = NULL, previous_valid_until = NULL \
             WHERE tenant_id = $1 AND id = $2",
            &[tenant.into(), agent.into()],
        )
        .await?;
    Ok(())
}

impl AnyStore {
    /// Runs one query over `tenant`'s rows in a transaction of its own (on
    /// PostgreSQL the RLS tenant is set first): every row.
    async fn read_all<R: Decodable>(
        &self,
        tenant: TenantId,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<R>, StoreError> {
        let mut tx = self.begin(tenant).await?;
        let rows = tx.conn().fetch_all(sql, args).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// As [`Self::read_all`], the first row if any.
    async fn read_optional<R: Decodable>(
        &self,
        tenant: TenantId,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Option<R>, StoreError> {
        let mut tx = self.begin(tenant).await?;
        let row = tx.conn().fetch_optional(sql, args).await?;
        tx.commit().await?;
        Ok(row)
    }

    /// Runs one write to `tenant`'s rows in a transaction of its own.
    async fn write_one(
        &self,
        tenant: TenantId,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<(), StoreError> {
        let mut tx = self.begin(tenant).await?;
        tx.conn().execute(sql, args).await?;
        tx.commit().await
    }

    /// One page of `tenant`'s rows of `select` (a `SELECT … FROM table`
    /// with an `id` column) by id: after `page.after`, at most
    /// `page.limit`, with `filter`'s conditions ANDed in.
    async fn list_page<R: Decodable>(
        &self,
        tenant: TenantId,
        select: &str,
        page: Page,
        filter: impl FnOnce(&mut Statement<'_>),
    ) -> Result<Vec<R>, StoreError> {
        let mut q = Statement::new(select);
        q.push(" WHERE tenant_id = ").bind(tenant);
        if let Some(after) = page.after {
            q.push(" AND id > ").bind(after);
        }
        filter(&mut q);
        q.push(" ORDER BY id LIMIT ").bind(i64::from(page.limit));
        self.read_all(tenant, &q.sql, &q.args).await
    }

    /// Up to `limit` of `tenant`'s outbox events in order, only those whose
    /// body matches the `LIKE` pattern `body_like` if given.
    async fn list_outbox(
        &self,
        tenant: TenantId,
        body_like: Option<String>,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let mut q = Statement::new("SELECT seq, body FROM events_outbox WHERE tenant_id = ");
        q.bind(tenant);
        if let Some(pattern) = body_like {
            q.push(" AND body LIKE ").bind(pattern);
        }
        q.push(" ORDER BY seq LIMIT ").bind(i64::from(limit));
        let rows: Vec<OutboxRow> = self.read_all(tenant, &q.sql, &q.args).await?;
        records(rows)
    }
}

impl Store for AnyStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.pooled().await?.conn().execute("SELECT 1", &[]).await?;
        Ok(())
    }

    async fn create_tenant(&self, t: &Tenant) -> Result<(), StoreError> {
        self.write_one(
            t.id,
            "INSERT INTO tenants (id, name, leaf_lifetime_secs, created_at) \
             VALUES ($1, $2, $3, $4)",
            &[
                t.id.into(),
                t.name.as_str().into(),
                t.leaf_lifetime_secs.into(),
                t.created_at.into(),
            ],
        )
        .await
    }

    async fn fetch_tenant(&self, id: TenantId) -> Result<Option<Tenant>, StoreError> {
        let row: Option<TenantRow> = self.read_optional(id, SELECT_TENANT, &[id.into()]).await?;
        row.map(Tenant::try_from).transpose()
    }

    async fn create_admin_key(&self, k: &NewAdminKey) -> Result<(), StoreError> {
        self.write_one(
            k.tenant_id,
            "INSERT INTO admin_keys (id, tenant_id, name, key_hash, created_at) \
             VALUES ($1, $2, $3, $4, $5)",
            &[
                k.id.into(),
                k.tenant_id.into(),
                k.name.as_str().into(),
                k.key_hash.as_slice().into(),
                k.created_at.into(),
            ],
        )
        .await
    }

    async fn fetch_admin_key_by_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<AdminKeyRef>, StoreError> {
        let row: Option<(DbUuid, TenantId)> = self
            .pooled()
            .await?
            .conn()
            .fetch_optional(self.dialect().admin_key_ref_by_hash, &[hash.into()])
            .await?;
        Ok(row.map(|(id, tenant_id)| AdminKeyRef {
            id: id.0,
            tenant_id,
        }))
    }

    async fn create_token(&self, t: &NewToken, event: &Event) -> Result<(), StoreError> {
        text_rule::token(t)?;
        let r = &t.record;
        let labels = serde_json::to_string(&r.labels).unwrap_or_else(|_| "{}".into());
        let mut tx = self.begin(r.tenant_id).await?;
        tx.conn()
            .execute(
                "INSERT INTO enrollment_tokens (id, tenant_id, token_hash, max_uses, uses, \
                 expires_at, created_at, description, labels, created_by) \
                 VALUES ($1, $2, $3, $4, 0, $5, $6, $7, $8, $9)",
                &[
                    r.id.into(),
                    r.tenant_id.into(),
                    t.token_hash.as_slice().into(),
                    Arg::Count(r.max_uses),
                    r.expires_at.into(),
                    r.created_at.into(),
                    r.description.as_deref().into(),
                    labels.into(),
                    t.created_by.into(),
                ],
            )
            .await?;
        insert_event(&mut tx, event).await?;
        tx.commit().await
    }

    async fn fetch_token(
        &self,
        tenant: TenantId,
        id: TokenId,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let mut tx = self.begin(tenant).await?;
        let t = fetch_token_in(&mut tx, tenant, id).await?;
        tx.commit().await?;
        Ok(t)
    }

    async fn list_tokens(
        &self,
        tenant: TenantId,
        status: Option<TokenStatus>,
        now: OffsetDateTime,
        page: Page,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let rows: Vec<TokenRow> = self
            .list_page(tenant, SELECT_TOKEN, page, |q| {
                if let Some(status) = status {
                    token_status_filter(q, status, now);
                }
            })
            .await?;
        records(rows)
    }

    async fn revoke_token(
        &self,
        tenant: TenantId,
        id: TokenId,
        now: OffsetDateTime,
        actor: Actor,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let mut tx = self.begin(tenant).await?;
        let changed = tx
            .conn()
            .execute(
                "UPDATE enrollment_tokens SET revoked_at = $3 \
                 WHERE tenant_id = $1 AND id = $2 AND revoked_at IS NULL",
                &[tenant.into(), id.into(), now.into()],
            )
            .await?;
        let Some(record) = fetch_token_in(&mut tx, tenant, id).await? else {
            return Ok(None);
        };
        if changed == 1 {
            let event = Event::new(
                tenant,
                actor,
                now,
                Payload::TokenRevoked {
                    token_id: id,
                    uses: record.uses,
                },
            );
            insert_event(&mut tx, &event).await?;
        }
        tx.commit().await?;
        Ok(Some(record))
    }

    async fn fetch_token_by_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<(TokenRecord, Option<Tenant>)>, StoreError> {
        let row: Option<TokenAndTenantRow> = self
            .pooled()
            .await?
            .conn()
            .fetch_optional(self.dialect().token_by_hash, &[hash.into()])
            .await?;
        row.map(TryInto::try_into).transpose()
    }

    async fn enroll(&self, e: &Enrollment) -> Result<EnrollOutcome, StoreError> {
        text_rule::enrollment(e)?;
        let a = &e.agent;
        let consumed = if self.dialect().enroll_many.is_some() {
            self.groups.submit(self, e.clone()).await?
        } else {
            let mut tx = self.begin(a.tenant_id).await?;
            let consumed = enroll_in_steps(&mut tx, e).await?;
            if consumed {
                tx.commit().await?;
            } else {
                tx.rollback().await?;
            }
            consumed
        };
        if consumed {
            return Ok(EnrollOutcome::Enrolled);
        }
        // Why not, read after the fact: an active token here means the hash
        // did not match the id.
        let t = self.fetch_token(a.tenant_id, e.token_id).await?;
        let r = TokenRefusal::of(t.as_ref(), e.now).unwrap_or(TokenRefusal::Unknown);
        Ok(EnrollOutcome::Refused(r))
    }

    async fn create_event(&self, event: &Event) -> Result<(), StoreError> {
        let mut tx = self.begin(event.tenant_id).await?;
        insert_event(&mut tx, event).await?;
        tx.commit().await
    }

    async fn record_superseded_use(
        &self,
        u: &SupersededUseRecord,
        window: std::time::Duration,
    ) -> Result<ReuseOutcome, StoreError> {
        // A write transaction: the claim below must not race another
        // replica's between the read and the insert (on PostgreSQL the
        // primary key decides; SQLite takes the write lock up front).
        let mut tx = self.begin_write(u.tenant).await?;
        let row: Option<(CertStatus, SerialNumber)> = tx
            .conn()
            .fetch_optional(
                "SELECT c.status, a.current_serial FROM certificates c \
                 JOIN agents a ON a.tenant_id = c.tenant_id AND a.id = c.agent_id \
                 WHERE c.tenant_id = $1 AND c.agent_id = $2 AND c.serial = $3",
                &[u.tenant.into(), u.agent.into(), u.serial.into()],
            )
            .await?;
        let Some((CertStatus::Superseded, current)) = row else {
            return Ok(ReuseOutcome::NotSuperseded);
        };
        let claimed = tx
            .conn()
            .execute(
                "INSERT INTO reuse_windows (serial, window_start, tenant_id, first_seen) \
                 VALUES ($1, $2, $3, $4) ON CONFLICT (serial, window_start) DO NOTHING",
                &[
                    u.serial.into(),
                    window_start(u.seen_at, window).into(),
                    u.tenant.into(),
                    u.seen_at.into(),
                ],
            )
            .await?;
        if claimed == 0 {
            return Ok(ReuseOutcome::Duplicate);
        }
        let event = Event::new(
            u.tenant,
            Actor::Agent(u.agent),
            u.seen_at,
            Payload::CertificateReuseDetected {
                agent_id: u.agent,
                serial: u.serial,
                current_serial: current,
                operation: u.operation,
                route: u.route.clone(),
                source_ip: u.source_ip,
            },
        );
        insert_event(&mut tx, &event).await?;
        tx.commit().await?;
        Ok(ReuseOutcome::Recorded)
    }

    async fn list_events(
        &self,
        tenant: TenantId,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        self.list_outbox(tenant, None, limit).await
    }

    async fn list_agent_events(
        &self,
        tenant: TenantId,
        agent: AgentId,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        // The body is serde's compact JSON, so the payload's id is spelled
        // exactly so; no other field holds that UUID. (An indexed `agent_id`
        // column is the scalable form; this keeps the outbox schema.)
        let pattern = format!("%\"agent_id\":\"{agent}\"%");
        self.list_outbox(tenant, Some(pattern), limit).await
    }

    async fn list_revoked_certificates(
        &self,
        tenant: TenantId,
        now: OffsetDateTime,
    ) -> Result<Vec<(SerialNumber, OffsetDateTime)>, StoreError> {
        let rows: Vec<(SerialNumber, Option<i64>)> = self
            .read_all(
                tenant,
                "SELECT serial, revoked_at FROM certificates \
                 WHERE tenant_id = $1 AND status = 'revoked' AND not_after > $2 ORDER BY serial",
                &[tenant.into(), now.into()],
            )
            .await?;
        rows.into_iter()
            .map(|(serial, at)| Ok((serial, ts(at.unwrap_or_default())?)))
            .collect()
    }

    async fn list_pending_events(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows: Vec<OutboxRow> = self
            .pooled()
            .await?
            .conn()
            .fetch_all(self.dialect().outbox_pending, &[i64::from(limit).into()])
            .await?;
        records(rows)
    }

    async fn mark_events_sent(&self, seqs: &[i64], now: OffsetDateTime) -> Result<(), StoreError> {
        if seqs.is_empty() {
            return Ok(());
        }
        let sql = (self.dialect().outbox_mark_sent_many)(seqs.len());
        let mut args: Vec<Arg<'_>> = Vec::with_capacity(seqs.len() + 1);
        args.push(now.into());
        args.extend(seqs.iter().map(|s| Arg::from(*s)));
        self.pooled().await?.conn().execute(&sql, &args).await?;
        Ok(())
    }

    async fn list_tenant_ids(&self) -> Result<Vec<TenantId>, StoreError> {
        let ids: Vec<(TenantId,)> = self
            .pooled()
            .await?
            .conn()
            .fetch_all(self.dialect().tenant_ids, &[])
            .await?;
        Ok(ids.into_iter().map(|(id,)| id).collect())
    }

    async fn list_agent_certificates(
        &self,
        tenant: TenantId,
        agent: AgentId,
    ) -> Result<Vec<CertificateState>, StoreError> {
        let rows: Vec<CertificateRow> = self
            .read_all(
                tenant,
                SELECT_AGENT_CERTIFICATES,
                &[tenant.into(), agent.into()],
            )
            .await?;
        records(rows)
    }

    async fn fetch_agent_projection(
        &self,
        tenant: TenantId,
        id: AgentId,
    ) -> Result<Option<(AgentRecord, Vec<CertificateState>)>, StoreError> {
        let mut tx = self.begin(tenant).await?;
        let Some(agent) = fetch_agent_in(&mut tx, tenant, id).await? else {
            tx.commit().await?;
            return Ok(None);
        };
        let rows: Vec<CertificateRow> = tx
            .conn()
            .fetch_all(SELECT_AGENT_CERTIFICATES, &[tenant.into(), id.into()])
            .await?;
        tx.commit().await?;
        Ok(Some((agent, records(rows)?)))
    }

    async fn fetch_agent(
        &self,
        tenant: TenantId,
        id: AgentId,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let mut tx = self.begin(tenant).await?;
        let a = fetch_agent_in(&mut tx, tenant, id).await?;
        tx.commit().await?;
        Ok(a)
    }

    async fn list_agents(
        &self,
        tenant: TenantId,
        status: Option<AgentStatus>,
        page: Page,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        let rows: Vec<AgentRow> = self
            .list_page(tenant, SELECT_AGENT, page, |q| {
                if let Some(status) = status {
                    q.push(" AND status = ").bind(status);
                }
            })
            .await?;
        records(rows)
    }

    async fn revoke_agent(
        &self,
        tenant: TenantId,
        id: AgentId,
        reason: &str,
        now: OffsetDateTime,
        actor: Actor,
    ) -> Result<Option<AgentRecord>, StoreError> {
        text_rule::reason(reason)?;
        let mut tx = self.begin(tenant).await?;
        let changed = tx
            .conn()
            .execute(
                "UPDATE agents SET status = 'revoked', revoked_at = $3, revocation_reason = $4, \
                 previous_serial = NULL, previous_valid_until = NULL \
                 WHERE tenant_id = $1 AND id = $2 AND status = 'active'",
                &[tenant.into(), id.into(), now.into(), reason.into()],
            )
            .await?;
        if changed == 1 {
            let serials: Vec<(SerialNumber,)> = tx
                .conn()
                .fetch_all(
                    "UPDATE certificates SET status = 'revoked', revoked_at = $3 \
                     WHERE tenant_id = $1 AND agent_id = $2 AND status != 'revoked' \
                     RETURNING serial",
                    &[tenant.into(), id.into(), now.into()],
                )
                .await?;
            let mut revoked_serials: Vec<SerialNumber> =
                serials.into_iter().map(|(s,)| s).collect();
            revoked_serials.sort();
            let event = Event::new(
                tenant,
                actor,
                now,
                Payload::Revoked {
                    agent_id: id,
                    reason: reason.to_owned(),
                    revoked_serials,
                },
            );
            insert_event(&mut tx, &event).await?;
        }
        let agent = fetch_agent_in(&mut tx, tenant, id).await?;
        tx.commit().await?;
        Ok(agent)
    }

    async fn rotate(&self, r: &Rotation) -> Result<RotateOutcome, StoreError> {
        let mut tx = self.begin_write(r.tenant).await?;
        let Some(st) = rotation_state(&mut tx, r.tenant, r.agent, Some(r.presented)).await? else {
            return Ok(RotateOutcome::Refused(RotationRefusal::UnknownAgent));
        };
        let plan = match plan_rotation(&st, r.presented, r.certificate.serial) {
            Ok(plan) => plan,
            Err(refusal) => return Ok(RotateOutcome::Refused(refusal)),
        };
        let actor = Actor::Agent(r.agent);
        for s in &plan.supersede {
            apply_supersede(&mut tx, r.tenant, r.agent, s, actor.clone(), r.now).await?;
        }
        let c = &r.certificate;
        tx.conn()
            .execute(
                "INSERT INTO certificates (serial, tenant_id, agent_id, status, fingerprint, \
                 not_before, not_after, cert_pem, issued_at, predecessor_serial) \
                 VALUES ($1, $2, $3, 'active', $4, $5, $6, $7, $8, $9)",
                &[
                    c.serial.into(),
                    r.tenant.into(),
                    r.agent.into(),
                    c.fingerprint.as_str().into(),
                    c.not_before.into(),
                    c.not_after.into(),
                    c.cert_pem.as_str().into(),
                    r.now.into(),
                    r.presented.into(),
                ],
            )
            .await?;
        tx.conn()
            .execute(
                "UPDATE agents SET current_serial = $3, certificate_not_after = $4, \
                 previous_serial = $5, previous_valid_until = $6 WHERE tenant_id = $1 AND id = $2",
                &[
                    r.tenant.into(),
                    r.agent.into(),
                    c.serial.into(),
                    c.not_after.into(),
                    plan.previous.into(),
                    r.previous_valid_until.into(),
                ],
            )
            .await?;
        insert_event(&mut tx, &rotated_event(r)).await?;
        tx.commit().await?;
        Ok(RotateOutcome::Rotated(plan))
    }

    async fn confirm_certificate(
        &self,
        tenant: TenantId,
        agent: AgentId,
        presented: SerialNumber,
        now: OffsetDateTime,
    ) -> Result<ConfirmOutcome, StoreError> {
        let mut tx = self.begin_write(tenant).await?;
        let Some(st) = rotation_state(&mut tx, tenant, agent, Some(presented)).await? else {
            return Ok(ConfirmOutcome::Refused(RotationRefusal::UnknownAgent));
        };
        let supersede = match plan_confirmation(&st, presented) {
            Ok(s) => s,
            Err(refusal) => return Ok(ConfirmOutcome::Refused(refusal)),
        };
        if let Some(s) = &supersede {
            apply_supersede(&mut tx, tenant, agent, s, Actor::Agent(agent), now).await?;
            clear_previous(&mut tx, tenant, agent).await?;
        }
        tx.commit().await?;
        Ok(ConfirmOutcome::Confirmed(supersede))
    }

    async fn list_rotations_due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(TenantId, AgentId)>, StoreError> {
        self.pooled()
            .await?
            .conn()
            .fetch_all(
                self.dialect().rotations_due,
                &[now.into(), i64::from(limit).into()],
            )
            .await
    }

    async fn expire_rotation(
        &self,
        tenant: TenantId,
        agent: AgentId,
        now: OffsetDateTime,
    ) -> Result<Option<Supersede>, StoreError> {
        let mut tx = self.begin_write(tenant).await?;
        let Some(st) = rotation_state(&mut tx, tenant, agent, None).await? else {
            return Ok(None);
        };
        let Some(s) = plan_expiry(&st, now) else {
            return Ok(None);
        };
        apply_supersede(&mut tx, tenant, agent, &s, Actor::System, now).await?;
        clear_previous(&mut tx, tenant, agent).await?;
        tx.commit().await?;
        Ok(Some(s))
    }
}
