//! Storage: one trait ([`Store`]) and two sqlx backends with embedded
//! migrations — [`sqlite::SqliteStore`] (the embedded default) and
//! [`postgres::PgStore`] (production, with row-level security).
//!
//! Every tenant-scoped operation takes the tenant explicitly. On PostgreSQL
//! it runs in a transaction that first sets `oneprotect.tenant_id`
//! (transaction-local), and the RLS policies filter on it; a query that
//! forgot its tenant filter would see nothing. Only two look-ups run before
//! the tenant is known — a token or admin key by its keyed hash — and both go
//! through one narrow `SECURITY DEFINER` function each that returns ids only.
//!
//! Verbs follow `create_/fetch_/list_/update_/revoke_`. A token is consumed by
//! one conditional `UPDATE` whose row count decides the race, in the same
//! transaction that writes the agent, its certificate and the outbox event.

pub mod postgres;
pub mod rotation;
pub mod sqlite;

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;

use std::collections::BTreeMap;
use std::future::Future;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;
use uuid::Uuid;

use oneprotect_identity::events::{Actor, Event};
use oneprotect_identity::{AgentId, AgentStatus, CertStatus, SerialNumber, TenantId, TokenId};

pub use rotation::{
    ConfirmOutcome, RotateOutcome, Rotation, RotationPlan, RotationRefusal, RotationState,
    Supersede,
};

/// Why a storage operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or the pool is exhausted; retryable.
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    /// A uniqueness or consistency constraint refused the write.
    #[error("storage conflict: {0}")]
    Conflict(#[source] sqlx::Error),
    /// Any other database error.
    #[error("storage error: {0}")]
    Database(#[source] sqlx::Error),
    /// A stored value does not decode (corruption or a bug).
    #[error("stored value does not decode: {0}")]
    Corrupt(String),
    /// Applying the embedded migrations failed.
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// A free-text value breaks [`crate::text`]'s rule (a control character);
    /// refused before any write, the same on every backend.
    #[error("refused text: {0}")]
    InvalidText(#[from] crate::text::TextError),
    /// The PostgreSQL role the service runs as can bypass row-level security.
    #[error("the database role {0:?} is a superuser or has BYPASSRLS; refusing to run")]
    RoleBypassesRls(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        match &e {
            sqlx::Error::Io(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(e),
            sqlx::Error::Database(db) => {
                // SQLite "database is locked"/"busy" are transient too.
                let code = db.code().unwrap_or_default();
                if db.is_unique_violation() || db.is_foreign_key_violation() {
                    StoreError::Conflict(e)
                } else if matches!(
                    code.as_ref(),
                    "5" | "6" | "517" | "57P01" | "57P03" | "53300"
                ) {
                    StoreError::Unavailable(e)
                } else {
                    StoreError::Database(e)
                }
            }
            _ => StoreError::Database(e),
        }
    }
}

fn corrupt(what: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(what.to_string())
}

pub(crate) fn ts(secs: i64) -> Result<OffsetDateTime, StoreError> {
    OffsetDateTime::from_unix_timestamp(secs).map_err(corrupt)
}

/// A tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    /// Its id.
    pub id: TenantId,
    /// Display name.
    pub name: String,
    /// Lifetime of the leaves issued to its agents, in seconds.
    pub leaf_lifetime_secs: i64,
    /// Creation time.
    pub created_at: OffsetDateTime,
}

/// A tenant-admin API key as stored: never the key, only its keyed hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewAdminKey {
    /// Public id of the key.
    pub id: Uuid,
    /// The tenant it administers.
    pub tenant_id: TenantId,
    /// Display name.
    pub name: String,
    /// HMAC-SHA256 of the key with the server pepper.
    pub key_hash: Vec<u8>,
    /// Creation time.
    pub created_at: OffsetDateTime,
}

/// The identity behind an admin key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminKeyRef {
    /// Public id of the key.
    pub id: Uuid,
    /// The tenant it administers.
    pub tenant_id: TenantId,
}

/// Where a token stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenStatus {
    /// Usable.
    Active,
    /// Revoked by an admin.
    Revoked,
    /// Past its expiry time.
    Expired,
    /// Every use consumed.
    UsedUp,
}

/// An enrollment token (never the secret; the hash stays in the store).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenRecord {
    /// Public id.
    pub id: TokenId,
    /// Owning tenant.
    pub tenant_id: TenantId,
    /// Allowed enrollments.
    pub max_uses: u32,
    /// Enrollments so far.
    pub uses: u32,
    /// Expiry.
    pub expires_at: OffsetDateTime,
    /// Creation.
    pub created_at: OffsetDateTime,
    /// Revocation, if revoked.
    pub revoked_at: Option<OffsetDateTime>,
    /// Admin's description.
    pub description: Option<String>,
    /// Admin's labels.
    pub labels: BTreeMap<String, String>,
}

impl TokenRecord {
    /// The status at `now`: revoked, then used up, then expired, else active.
    pub fn status(&self, now: OffsetDateTime) -> TokenStatus {
        if self.revoked_at.is_some() {
            TokenStatus::Revoked
        } else if self.uses >= self.max_uses {
            TokenStatus::UsedUp
        } else if self.expires_at <= now {
            TokenStatus::Expired
        } else {
            TokenStatus::Active
        }
    }
}

/// A token to create.
#[derive(Debug, Clone)]
pub struct NewToken {
    /// The record (with `uses` 0 and no revocation).
    pub record: TokenRecord,
    /// HMAC-SHA256 of the secret with the server pepper.
    pub token_hash: Vec<u8>,
    /// The admin key that created it.
    pub created_by: Uuid,
}

/// An agent as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRecord {
    /// Its id.
    pub id: AgentId,
    /// Its tenant.
    pub tenant_id: TenantId,
    /// The identity URI in its certificates.
    pub spiffe_id: String,
    /// Active or revoked.
    pub status: AgentStatus,
    /// Reported hostname.
    pub hostname: String,
    /// Reported operating system.
    pub os: String,
    /// Reported agent version.
    pub agent_version: String,
    /// The token it enrolled with.
    pub token_id: TokenId,
    /// Enrollment time.
    pub enrolled_at: OffsetDateTime,
    /// Serial of its current certificate.
    pub current_serial: SerialNumber,
    /// NotAfter of its current certificate.
    pub certificate_not_after: OffsetDateTime,
    /// During a rotation's second phase, the certificate rotated away from.
    pub previous_serial: Option<SerialNumber>,
    /// When `previous_serial` stops being accepted at the latest.
    pub previous_valid_until: Option<OffsetDateTime>,
    /// Revocation time.
    pub revoked_at: Option<OffsetDateTime>,
    /// Revocation reason.
    pub revocation_reason: Option<String>,
}

/// A certificate to record.
#[derive(Debug, Clone)]
pub struct NewCertificate {
    /// Serial.
    pub serial: SerialNumber,
    /// SHA-256 of the DER, hex.
    pub fingerprint: String,
    /// NotBefore.
    pub not_before: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
    /// The leaf, PEM.
    pub cert_pem: String,
}

/// Everything one exchange writes, applied atomically by [`Store::enroll`].
#[derive(Debug, Clone)]
pub struct Enrollment {
    /// The token being consumed.
    pub token_id: TokenId,
    /// Its keyed hash (checked again in the conditional update).
    pub token_hash: Vec<u8>,
    /// The new agent (status active, no revocation).
    pub agent: AgentRecord,
    /// Its first certificate.
    pub certificate: NewCertificate,
    /// The `agent.enrolled` event for the outbox.
    pub event: Event,
    /// The time of the exchange.
    pub now: OffsetDateTime,
}

/// The free-text rule ([`crate::text`]) for what the stores write from
/// clients, checked by both backends before they open a transaction, so
/// neither can hold what the other would refuse.
pub(crate) mod text_rule {
    use super::{Enrollment, NewToken, StoreError};
    use crate::text::check_no_control;

    pub(crate) fn token(t: &NewToken) -> Result<(), StoreError> {
        if let Some(d) = &t.record.description {
            check_no_control("description", d)?;
        }
        for (k, v) in &t.record.labels {
            check_no_control("labels", k)?;
            check_no_control("labels", v)?;
        }
        Ok(())
    }

    pub(crate) fn enrollment(e: &Enrollment) -> Result<(), StoreError> {
        check_no_control("agent.hostname", &e.agent.hostname)?;
        check_no_control("agent.os", &e.agent.os)?;
        check_no_control("agent.agent_version", &e.agent.agent_version)?;
        Ok(())
    }

    pub(crate) fn reason(reason: &str) -> Result<(), StoreError> {
        Ok(check_no_control("reason", reason)?)
    }
}

/// Why a token was not consumed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    /// No such token (or the hash does not match).
    Unknown,
    /// Expired.
    Expired,
    /// No uses left.
    UsedUp,
    /// Revoked.
    Revoked,
}

/// The result of [`Store::enroll`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnrollOutcome {
    /// The token was consumed and the agent written.
    Enrolled,
    /// Nothing was written.
    Refused(TokenRefusal),
}

/// One page request: up to `limit` items with an id after `after`.
#[derive(Debug, Clone, Copy)]
pub struct Page {
    /// Maximum items (1..=500).
    pub limit: u32,
    /// Continue after this id (the previous page's last).
    pub after: Option<Uuid>,
}

/// A stored outbox event.
#[derive(Debug, Clone)]
pub struct OutboxEvent {
    /// Position in the outbox.
    pub seq: i64,
    /// The event.
    pub event: Event,
}

/// A certificate's lifecycle state, as the Redis projection needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertificateState {
    /// Serial.
    pub serial: SerialNumber,
    /// The agent it belongs to.
    pub agent_id: AgentId,
    /// Active, superseded or revoked.
    pub status: CertStatus,
    /// NotAfter (the projection key expires then).
    pub not_after: OffsetDateTime,
}

/// The storage operations the service needs. Implemented by both backends;
/// [`conformance`] checks that they behave the same.
pub trait Store: Send + Sync + Clone + 'static {
    /// Checks that the database answers.
    fn ping(&self) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Creates a tenant.
    fn create_tenant(&self, t: &Tenant) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Fetches a tenant.
    fn fetch_tenant(
        &self,
        id: TenantId,
    ) -> impl Future<Output = Result<Option<Tenant>, StoreError>> + Send;
    /// Stores an admin key's hash.
    fn create_admin_key(
        &self,
        k: &NewAdminKey,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Finds an admin key by its keyed hash (the pre-tenant narrow path).
    fn fetch_admin_key_by_hash(
        &self,
        hash: &[u8],
    ) -> impl Future<Output = Result<Option<AdminKeyRef>, StoreError>> + Send;
    /// Creates a token and writes its event to the outbox, atomically.
    fn create_token(
        &self,
        t: &NewToken,
        event: &Event,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Fetches a token of `tenant`.
    fn fetch_token(
        &self,
        tenant: TenantId,
        id: TokenId,
    ) -> impl Future<Output = Result<Option<TokenRecord>, StoreError>> + Send;
    /// Lists `tenant`'s tokens by id, optionally only those with `status` at `now`.
    fn list_tokens(
        &self,
        tenant: TenantId,
        status: Option<TokenStatus>,
        now: OffsetDateTime,
        page: Page,
    ) -> impl Future<Output = Result<Vec<TokenRecord>, StoreError>> + Send;
    /// Revokes a token (idempotent); writes `agent.enrollment_token.revoked`
    /// when it was not yet revoked. `None` when not found in `tenant`.
    fn revoke_token(
        &self,
        tenant: TenantId,
        id: TokenId,
        now: OffsetDateTime,
        actor: Actor,
    ) -> impl Future<Output = Result<Option<TokenRecord>, StoreError>> + Send;
    /// Finds a token's id and tenant by its keyed hash (the pre-tenant
    /// narrow path of the exchange).
    fn fetch_token_ref_by_hash(
        &self,
        hash: &[u8],
    ) -> impl Future<Output = Result<Option<(TokenId, TenantId)>, StoreError>> + Send;
    /// Consumes one use of the token and writes the agent, its certificate
    /// and the event in one transaction.
    fn enroll(
        &self,
        e: &Enrollment,
    ) -> impl Future<Output = Result<EnrollOutcome, StoreError>> + Send;
    /// Writes one event to the outbox on its own (e.g. a failed enrollment).
    fn create_event(&self, event: &Event) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Lists `tenant`'s outbox events in order.
    fn list_events(
        &self,
        tenant: TenantId,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, StoreError>> + Send;
    /// Lists `tenant`'s events about `agent` (whose payload names it as
    /// `agent_id`), oldest first, at most `limit`.
    fn list_agent_events(
        &self,
        tenant: TenantId,
        agent: AgentId,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, StoreError>> + Send;
    /// `tenant`'s revoked certificates that have not expired at `now`:
    /// (serial, revocation time), by serial (for the CRL).
    fn list_revoked_certificates(
        &self,
        tenant: TenantId,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Vec<(SerialNumber, OffsetDateTime)>, StoreError>> + Send;
    /// Lists up to `limit` outbox events of every tenant not yet marked
    /// sent, oldest first (the relay's cross-tenant read; on PostgreSQL a
    /// narrow `SECURITY DEFINER` function).
    fn list_pending_events(
        &self,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<OutboxEvent>, StoreError>> + Send;
    /// Marks outbox event `seq` sent at `now` (idempotent).
    fn mark_event_sent(
        &self,
        seq: i64,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Every tenant id (for a full projection rebuild), in id order.
    fn list_tenant_ids(&self) -> impl Future<Output = Result<Vec<TenantId>, StoreError>> + Send;
    /// Every certificate of one agent of `tenant`, by serial.
    fn list_agent_certificates(
        &self,
        tenant: TenantId,
        agent: AgentId,
    ) -> impl Future<Output = Result<Vec<CertificateState>, StoreError>> + Send;
    /// Fetches an agent of `tenant`.
    fn fetch_agent(
        &self,
        tenant: TenantId,
        id: AgentId,
    ) -> impl Future<Output = Result<Option<AgentRecord>, StoreError>> + Send;
    /// Lists `tenant`'s agents by id, optionally only those with `status`.
    fn list_agents(
        &self,
        tenant: TenantId,
        status: Option<AgentStatus>,
        page: Page,
    ) -> impl Future<Output = Result<Vec<AgentRecord>, StoreError>> + Send;
    /// Revokes an agent and all its certificates (idempotent); writes
    /// `agent.revoked` when it was active. `None` when not found in `tenant`.
    fn revoke_agent(
        &self,
        tenant: TenantId,
        id: AgentId,
        reason: &str,
        now: OffsetDateTime,
        actor: Actor,
    ) -> impl Future<Output = Result<Option<AgentRecord>, StoreError>> + Send;
    /// Applies a rotation in one transaction (supersedes per the plan,
    /// inserts the new certificate, updates the agent, writes
    /// `agent.certificate.superseded` and `agent.certificate.rotated`), or
    /// writes nothing and says why.
    fn rotate(
        &self,
        r: &Rotation,
    ) -> impl Future<Output = Result<RotateOutcome, StoreError>> + Send;
    /// Records that `agent` authenticated with `presented`: completes a
    /// pending rotation when it is the newest certificate.
    fn confirm_certificate(
        &self,
        tenant: TenantId,
        agent: AgentId,
        presented: SerialNumber,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<ConfirmOutcome, StoreError>> + Send;
    /// Agents of every tenant whose rotation grace ended at or before `now`
    /// (on PostgreSQL a narrow `SECURITY DEFINER` function), at most `limit`.
    fn list_rotations_due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<(TenantId, AgentId)>, StoreError>> + Send;
    /// Supersedes `agent`'s previous certificate if its grace ended at or
    /// before `now` (re-checked under the row lock); `Some` when it did.
    fn expire_rotation(
        &self,
        tenant: TenantId,
        agent: AgentId,
        now: OffsetDateTime,
    ) -> impl Future<Output = Result<Option<Supersede>, StoreError>> + Send;
}

/// Either backend, chosen by configuration.
#[derive(Debug, Clone)]
pub enum AnyStore {
    /// SQLite.
    Sqlite(sqlite::SqliteStore),
    /// PostgreSQL.
    Postgres(postgres::PgStore),
}

macro_rules! dispatch {
    ($self:ident, $s:ident => $e:expr) => {
        match $self {
            AnyStore::Sqlite($s) => $e.await,
            AnyStore::Postgres($s) => $e.await,
        }
    };
}

impl Store for AnyStore {
    async fn ping(&self) -> Result<(), StoreError> {
        dispatch!(self, s => s.ping())
    }
    async fn create_tenant(&self, t: &Tenant) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_tenant(t))
    }
    async fn fetch_tenant(&self, id: TenantId) -> Result<Option<Tenant>, StoreError> {
        dispatch!(self, s => s.fetch_tenant(id))
    }
    async fn create_admin_key(&self, k: &NewAdminKey) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_admin_key(k))
    }
    async fn fetch_admin_key_by_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<AdminKeyRef>, StoreError> {
        dispatch!(self, s => s.fetch_admin_key_by_hash(hash))
    }
    async fn create_token(&self, t: &NewToken, event: &Event) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_token(t, event))
    }
    async fn fetch_token(
        &self,
        tenant: TenantId,
        id: TokenId,
    ) -> Result<Option<TokenRecord>, StoreError> {
        dispatch!(self, s => s.fetch_token(tenant, id))
    }
    async fn list_tokens(
        &self,
        tenant: TenantId,
        status: Option<TokenStatus>,
        now: OffsetDateTime,
        page: Page,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        dispatch!(self, s => s.list_tokens(tenant, status, now, page))
    }
    async fn revoke_token(
        &self,
        tenant: TenantId,
        id: TokenId,
        now: OffsetDateTime,
        actor: Actor,
    ) -> Result<Option<TokenRecord>, StoreError> {
        dispatch!(self, s => s.revoke_token(tenant, id, now, actor))
    }
    async fn fetch_token_ref_by_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<(TokenId, TenantId)>, StoreError> {
        dispatch!(self, s => s.fetch_token_ref_by_hash(hash))
    }
    async fn enroll(&self, e: &Enrollment) -> Result<EnrollOutcome, StoreError> {
        dispatch!(self, s => s.enroll(e))
    }
    async fn create_event(&self, event: &Event) -> Result<(), StoreError> {
        dispatch!(self, s => s.create_event(event))
    }
    async fn list_events(
        &self,
        tenant: TenantId,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        dispatch!(self, s => s.list_events(tenant, limit))
    }
    async fn list_agent_events(
        &self,
        tenant: TenantId,
        agent: AgentId,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        dispatch!(self, s => s.list_agent_events(tenant, agent, limit))
    }
    async fn list_revoked_certificates(
        &self,
        tenant: TenantId,
        now: OffsetDateTime,
    ) -> Result<Vec<(SerialNumber, OffsetDateTime)>, StoreError> {
        dispatch!(self, s => s.list_revoked_certificates(tenant, now))
    }
    async fn list_pending_events(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        dispatch!(self, s => s.list_pending_events(limit))
    }
    async fn mark_event_sent(&self, seq: i64, now: OffsetDateTime) -> Result<(), StoreError> {
        dispatch!(self, s => s.mark_event_sent(seq, now))
    }
    async fn list_tenant_ids(&self) -> Result<Vec<TenantId>, StoreError> {
        dispatch!(self, s => s.list_tenant_ids())
    }
    async fn list_agent_certificates(
        &self,
        tenant: TenantId,
        agent: AgentId,
    ) -> Result<Vec<CertificateState>, StoreError> {
        dispatch!(self, s => s.list_agent_certificates(tenant, agent))
    }
    async fn fetch_agent(
        &self,
        tenant: TenantId,
        id: AgentId,
    ) -> Result<Option<AgentRecord>, StoreError> {
        dispatch!(self, s => s.fetch_agent(tenant, id))
    }
    async fn list_agents(
        &self,
        tenant: TenantId,
        status: Option<AgentStatus>,
        page: Page,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        dispatch!(self, s => s.list_agents(tenant, status, page))
    }
    async fn revoke_agent(
        &self,
        tenant: TenantId,
        id: AgentId,
        reason: &str,
        now: OffsetDateTime,
        actor: Actor,
    ) -> Result<Option<AgentRecord>, StoreError> {
        dispatch!(self, s => s.revoke_agent(tenant, id, reason, now, actor))
    }
    async fn rotate(&self, r: &Rotation) -> Result<RotateOutcome, StoreError> {
        dispatch!(self, s => s.rotate(r))
    }
    async fn confirm_certificate(
        &self,
        tenant: TenantId,
        agent: AgentId,
        presented: SerialNumber,
        now: OffsetDateTime,
    ) -> Result<ConfirmOutcome, StoreError> {
        dispatch!(self, s => s.confirm_certificate(tenant, agent, presented, now))
    }
    async fn list_rotations_due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(TenantId, AgentId)>, StoreError> {
        dispatch!(self, s => s.list_rotations_due(now, limit))
    }
    async fn expire_rotation(
        &self,
        tenant: TenantId,
        agent: AgentId,
        now: OffsetDateTime,
    ) -> Result<Option<Supersede>, StoreError> {
        dispatch!(self, s => s.expire_rotation(tenant, agent, now))
    }
}

/// The SQL condition (over columns `revoked_at`, `uses`, `max_uses`,
/// `expires_at`) that selects tokens with `status`; `now` is placeholder `p`.
pub(crate) fn token_status_sql(status: TokenStatus, p: &str) -> String {
    match status {
        TokenStatus::Revoked => "revoked_at IS NOT NULL".into(),
        TokenStatus::UsedUp => "revoked_at IS NULL AND uses >= max_uses".into(),
        TokenStatus::Expired => {
            format!("revoked_at IS NULL AND uses < max_uses AND expires_at <= {p}")
        }
        TokenStatus::Active => {
            format!("revoked_at IS NULL AND uses < max_uses AND expires_at > {p}")
        }
    }
}

/// Why a token was refused, decided from its current row.
pub(crate) fn refusal(t: Option<&TokenRecord>, now: OffsetDateTime) -> TokenRefusal {
    match t.map(|t| t.status(now)) {
        None => TokenRefusal::Unknown,
        Some(TokenStatus::Revoked) => TokenRefusal::Revoked,
        Some(TokenStatus::UsedUp) => TokenRefusal::UsedUp,
        Some(TokenStatus::Expired) => TokenRefusal::Expired,
        // Only reachable if the hash did not match the id.
        Some(TokenStatus::Active) => TokenRefusal::Unknown,
    }
}

pub(crate) fn labels_json(l: &BTreeMap<String, String>) -> String {
    serde_json::to_string(l).unwrap_or_else(|_| "{}".into())
}

pub(crate) fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, StoreError> {
    serde_json::from_str(s).map_err(corrupt)
}

pub(crate) fn event_json(e: &Event) -> Result<String, StoreError> {
    serde_json::to_string(e).map_err(corrupt)
}

pub(crate) fn parse_event(s: &str) -> Result<Event, StoreError> {
    serde_json::from_str(s).map_err(corrupt)
}

/// The `LIKE` pattern that finds an agent's events in the stored JSON. The
/// body is serde's compact JSON, so the payload's id is spelled exactly so;
/// no other field holds that UUID. (An indexed `agent_id` column is the
/// scalable form; this keeps the outbox schema unchanged.)
pub(crate) fn agent_event_pattern(agent: AgentId) -> String {
    format!("%\"agent_id\":\"{agent}\"%")
}

pub(crate) fn parse_cert_status(s: &str) -> Result<CertStatus, StoreError> {
    s.parse().map_err(corrupt)
}

pub(crate) fn parse_id<T: std::str::FromStr>(s: &str) -> Result<T, StoreError> {
    s.parse().map_err(|_| corrupt(format!("bad id {s:?}")))
}

pub(crate) fn u32_of(v: i64) -> Result<u32, StoreError> {
    u32::try_from(v).map_err(corrupt)
}

#[cfg(test)]
mod tests;
