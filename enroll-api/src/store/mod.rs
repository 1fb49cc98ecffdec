//! Storage: one trait ([`Store`]) and one implementation of it,
//! [`AnyStore`], over either sqlx backend with embedded migrations — SQLite
//! (the embedded default, [`AnyStore::open_sqlite`]) or PostgreSQL
//! (production, with row-level security, [`AnyStore::open_postgres`]).
//!
//! As in SPIRE's `sqlstore.go`, every query is written once (`sql.rs`);
//! `db.rs` runs a statement on either backend, and each backend's file
//! (`sqlite.rs`, [`postgres`]) holds only its dialect: connecting and
//! migrating, the transaction set-up, the few statements whose text differs
//! (each with the reason), and how its columns hold UUIDs and use counts.
//! The ids, serials and statuses decode through their sqlx impls
//! (`oneprotect-identity`'s `sqlx` feature) on both.
//!
//! Every tenant-scoped operation takes the tenant explicitly. On PostgreSQL
//! it runs in a transaction that first sets `oneprotect.tenant_id`
//! (transaction-local), and the RLS policies filter on it; a query that
//! forgot its tenant filter would see nothing. Only two look-ups run before
//! the tenant is known — a token or admin key by its keyed hash — and both go
//! through one narrow `SECURITY DEFINER` function each that returns ids only.
//! SQLite has no RLS: there the `tenant_id` filter every statement carries is
//! the isolation.
//!
//! Verbs follow `create_/fetch_/list_/update_/revoke_`. A token is consumed by
//! one conditional `UPDATE` whose row count decides the race, in the same
//! transaction that writes the agent, its certificate and the outbox event.

mod batch;
mod db;
pub mod postgres;
pub mod rotation;
mod sql;
mod sqlite;

#[cfg(any(test, feature = "test-util"))]
pub mod conformance;

use std::collections::BTreeMap;
use std::future::Future;

use time::OffsetDateTime;
use uuid::Uuid;

use oneprotect_identity::events::{Actor, Event};
use oneprotect_identity::{AgentId, AgentStatus, CertStatus, SerialNumber, TenantId, TokenId};

pub use crate::token::{TokenRefusal, TokenStatus};
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
            // A column that does not decode into its type (the ids' strict
            // canonical form, a negative use count, …).
            sqlx::Error::ColumnDecode { .. } | sqlx::Error::Decode(_) => {
                StoreError::Corrupt(e.to_string())
            }
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

/// One use of a superseded certificate, as a gateway reported it or the
/// rotation endpoints saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SupersededUseRecord {
    /// The certificate's tenant.
    pub tenant: TenantId,
    /// The agent the presenter claimed (from the certificate).
    pub agent: AgentId,
    /// The certificate presented.
    pub serial: SerialNumber,
    /// What was attempted.
    pub operation: oneprotect_identity::events::AgentOperation,
    /// The gateway route, for `request`.
    pub route: Option<String>,
    /// The source address, when known.
    pub source_ip: Option<std::net::IpAddr>,
    /// When the use happened (picks the attempt window).
    pub seen_at: OffsetDateTime,
}

/// What [`Store::record_superseded_use`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReuseOutcome {
    /// The window's first use: `agent.certificate.reuse_detected` written.
    Recorded,
    /// The window already has its event: nothing written.
    Duplicate,
    /// The certificate is not this tenant's agent's, or not superseded
    /// (revoked since, say): nothing written.
    NotSuperseded,
}

/// The start of `at`'s attempt window of `window` (unix seconds, windows
/// aligned to the epoch).
pub fn window_start(at: OffsetDateTime, window: std::time::Duration) -> i64 {
    let w = i64::try_from(window.as_secs().max(1)).unwrap_or(i64::MAX);
    at.unix_timestamp().div_euclid(w) * w
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

/// The storage operations the service needs. Implemented once, by
/// [`AnyStore`], for both backends; [`conformance`] checks that they behave
/// the same on each.
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
    /// The token with keyed hash `hash` and its tenant (`None` if the
    /// tenant is missing: a broken store), in one read: the exchange's
    /// pre-checks, before the tenant is known. Only a holder of the token's
    /// secret can name the hash.
    fn fetch_token_by_hash(
        &self,
        hash: &[u8],
    ) -> impl Future<Output = Result<Option<(TokenRecord, Option<Tenant>)>, StoreError>> + Send;
    /// Consumes one use of the token and writes the agent, its certificate
    /// and the event in one transaction.
    fn enroll(
        &self,
        e: &Enrollment,
    ) -> impl Future<Output = Result<EnrollOutcome, StoreError>> + Send;
    /// Writes one event to the outbox on its own (e.g. a failed enrollment).
    fn create_event(&self, event: &Event) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Records a use of a superseded certificate: in one transaction, when
    /// the certificate is `u.tenant`'s, `u.agent`'s and superseded, claims
    /// its attempt window (`window`, from `u.seen_at`) and, when the window
    /// was unclaimed, writes `agent.certificate.reuse_detected` (with the
    /// agent's current certificate). Any number of replicas recording uses
    /// of one certificate in one window write one event.
    fn record_superseded_use(
        &self,
        u: &SupersededUseRecord,
        window: std::time::Duration,
    ) -> impl Future<Output = Result<ReuseOutcome, StoreError>> + Send;
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
    /// Marks the outbox events `seqs` sent at `now` in one statement
    /// (idempotent; an empty list does nothing).
    fn mark_events_sent(
        &self,
        seqs: &[i64],
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
    /// [`Store::fetch_agent`] and [`Store::list_agent_certificates`] in one
    /// read transaction (what the projection writes for one agent); `None`
    /// for an unknown agent.
    fn fetch_agent_projection(
        &self,
        tenant: TenantId,
        id: AgentId,
    ) -> impl Future<Output = Result<Option<(AgentRecord, Vec<CertificateState>)>, StoreError>> + Send;
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

/// The store over either backend, chosen by configuration: open it with
/// [`AnyStore::open_sqlite`] or [`AnyStore::open_postgres`]. Cloning is cheap
/// (the pool is shared).
#[derive(Debug, Clone)]
pub struct AnyStore {
    db: db::Db,
    /// Woken by every commit that wrote an outbox row (ADR-0019).
    outbox: crate::relay::RelayWaker,
    /// Exchanges waiting for their token's group write (PostgreSQL).
    groups: std::sync::Arc<batch::EnrollGroups>,
}

#[cfg(test)]
mod tests;
