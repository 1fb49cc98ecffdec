//! The SQLite backend: the embedded default, one file.
//!
//! SQLite has no row-level security, so every query here carries its
//! `tenant_id` filter. WAL mode with a busy timeout lets readers run beside
//! the single writer; the token consume is the first statement of its
//! transaction, so the write lock is taken up front and concurrent exchanges
//! queue on the busy timeout instead of failing on a lock upgrade.

use std::path::Path;
use std::str::FromStr;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow, SqliteSynchronous,
};
use sqlx::{Row, SqlitePool};
use time::OffsetDateTime;

use oneprotect_identity::events::{Actor, Event, Payload};
use oneprotect_identity::{AgentId, AgentStatus, SerialNumber, TenantId, TokenId};

use super::rotation::{
    plan_confirmation, plan_expiry, plan_rotation, rotated_event, superseded_event,
};
use super::{
    agent_event_pattern, event_json, labels_json, parse_cert_status, parse_event, parse_id,
    parse_labels, refusal, token_status_sql, ts, u32_of, AdminKeyRef, AgentRecord,
    CertificateState, ConfirmOutcome, EnrollOutcome, Enrollment, NewAdminKey, NewToken,
    OutboxEvent, Page, RotateOutcome, Rotation, RotationRefusal, RotationState, Store, StoreError,
    Supersede, Tenant, TokenRecord, TokenStatus,
};

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("migrations/sqlite");

/// The SQLite store.
#[derive(Debug, Clone)]
pub struct SqliteStore {
    pool: SqlitePool,
}

const TOKEN_COLS: &str =
    "id, tenant_id, max_uses, uses, expires_at, created_at, revoked_at, description, labels";
const AGENT_COLS: &str = "id, tenant_id, spiffe_id, status, hostname, os, agent_version, token_id, enrolled_at, current_serial, certificate_not_after, revoked_at, revocation_reason, previous_serial, previous_valid_until";

fn opt_ts(v: Option<i64>) -> Result<Option<OffsetDateTime>, StoreError> {
    v.map(ts).transpose()
}

fn token_from_row(r: &SqliteRow) -> Result<TokenRecord, StoreError> {
    Ok(TokenRecord {
        id: parse_id(r.try_get::<&str, _>("id")?)?,
        tenant_id: parse_id(r.try_get::<&str, _>("tenant_id")?)?,
        max_uses: u32_of(r.try_get("max_uses")?)?,
        uses: u32_of(r.try_get("uses")?)?,
        expires_at: ts(r.try_get("expires_at")?)?,
        created_at: ts(r.try_get("created_at")?)?,
        revoked_at: opt_ts(r.try_get("revoked_at")?)?,
        description: r.try_get("description")?,
        labels: parse_labels(r.try_get("labels")?)?,
    })
}

fn agent_from_row(r: &SqliteRow) -> Result<AgentRecord, StoreError> {
    Ok(AgentRecord {
        id: parse_id(r.try_get::<&str, _>("id")?)?,
        tenant_id: parse_id(r.try_get::<&str, _>("tenant_id")?)?,
        spiffe_id: r.try_get("spiffe_id")?,
        status: AgentStatus::from_str(r.try_get("status")?)
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        hostname: r.try_get("hostname")?,
        os: r.try_get("os")?,
        agent_version: r.try_get("agent_version")?,
        token_id: parse_id(r.try_get::<&str, _>("token_id")?)?,
        enrolled_at: ts(r.try_get("enrolled_at")?)?,
        current_serial: parse_id(r.try_get::<&str, _>("current_serial")?)?,
        certificate_not_after: ts(r.try_get("certificate_not_after")?)?,
        revoked_at: opt_ts(r.try_get("revoked_at")?)?,
        revocation_reason: r.try_get("revocation_reason")?,
        previous_serial: r
            .try_get::<Option<&str>, _>("previous_serial")?
            .map(parse_id)
            .transpose()?,
        previous_valid_until: opt_ts(r.try_get("previous_valid_until")?)?,
    })
}

impl SqliteStore {
    /// Opens (creating if missing) the database file at `path` and applies
    /// the embedded migrations. `max_connections` bounds the pool.
    pub async fn open(path: &Path, max_connections: u32) -> Result<Self, StoreError> {
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
        Ok(Self { pool })
    }

    /// Closes the pool; later operations fail as unavailable.
    pub async fn close(&self) {
        self.pool.close().await;
    }

    async fn insert_event(
        conn: &mut sqlx::SqliteConnection,
        event: &Event,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "INSERT INTO events_outbox (event_id, tenant_id, event_type, occurred_at, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        )
        .bind(event.event_id.to_string())
        .bind(event.tenant_id.to_string())
        .bind(event.payload.event_type())
        .bind(event.occurred_at.unix_timestamp())
        .bind(event_json(event)?)
        .execute(conn)
        .await?;
        Ok(())
    }
}

impl SqliteStore {
    /// A transaction holding SQLite's write lock from its first statement,
    /// so a read-decide-write sequence cannot fail on a lock upgrade.
    async fn begin_write(&self) -> Result<sqlx::Transaction<'static, sqlx::Sqlite>, StoreError> {
        Ok(self.pool.begin_with("BEGIN IMMEDIATE").await?)
    }

    async fn rotation_state(
        conn: &mut sqlx::SqliteConnection,
        tenant: TenantId,
        agent: AgentId,
        presented: Option<SerialNumber>,
    ) -> Result<Option<RotationState>, StoreError> {
        let Some(row) = sqlx::query(
            "SELECT status, current_serial, previous_serial, previous_valid_until FROM agents \
             WHERE tenant_id = ?1 AND id = ?2",
        )
        .bind(tenant.to_string())
        .bind(agent.to_string())
        .fetch_optional(&mut *conn)
        .await?
        else {
            return Ok(None);
        };
        let presented = match presented {
            None => None,
            Some(serial) => sqlx::query_scalar::<_, String>(
                "SELECT status FROM certificates WHERE tenant_id = ?1 AND agent_id = ?2 AND serial = ?3",
            )
            .bind(tenant.to_string())
            .bind(agent.to_string())
            .bind(serial.to_string())
            .fetch_optional(&mut *conn)
            .await?,
        };
        Ok(Some(RotationState::from_columns(
            row.try_get("status")?,
            row.try_get("current_serial")?,
            row.try_get("previous_serial")?,
            row.try_get("previous_valid_until")?,
            presented.as_deref(),
        )?))
    }

    /// Ends the agent's pending rotation (no previous certificate).
    async fn clear_previous(
        conn: &mut sqlx::SqliteConnection,
        tenant: TenantId,
        agent: AgentId,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE agents SET previous_serial = NULL, previous_valid_until = NULL \
             WHERE tenant_id = ?1 AND id = ?2",
        )
        .bind(tenant.to_string())
        .bind(agent.to_string())
        .execute(conn)
        .await?;
        Ok(())
    }

    /// Marks `s.serial` superseded (only if active) and writes its event.
    async fn apply_supersede(
        conn: &mut sqlx::SqliteConnection,
        tenant: TenantId,
        agent: AgentId,
        s: &Supersede,
        actor: Actor,
        now: OffsetDateTime,
    ) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE certificates SET status = 'superseded', superseded_at = ?4 \
             WHERE tenant_id = ?1 AND agent_id = ?2 AND serial = ?3 AND status = 'active'",
        )
        .bind(tenant.to_string())
        .bind(agent.to_string())
        .bind(s.serial.to_string())
        .bind(now.unix_timestamp())
        .execute(&mut *conn)
        .await?;
        Self::insert_event(conn, &superseded_event(tenant, agent, s, actor, now)).await
    }
}

impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    async fn create_tenant(&self, t: &Tenant) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO tenants (id, name, leaf_lifetime_secs, created_at) VALUES (?1, ?2, ?3, ?4)")
            .bind(t.id.to_string())
            .bind(&t.name)
            .bind(t.leaf_lifetime_secs)
            .bind(t.created_at.unix_timestamp())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn fetch_tenant(&self, id: TenantId) -> Result<Option<Tenant>, StoreError> {
        let row = sqlx::query(
            "SELECT id, name, leaf_lifetime_secs, created_at FROM tenants WHERE id = ?1",
        )
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(Tenant {
                id: parse_id(r.try_get::<&str, _>("id")?)?,
                name: r.try_get("name")?,
                leaf_lifetime_secs: r.try_get("leaf_lifetime_secs")?,
                created_at: ts(r.try_get("created_at")?)?,
            })
        })
        .transpose()
    }

    async fn create_admin_key(&self, k: &NewAdminKey) -> Result<(), StoreError> {
        sqlx::query("INSERT INTO admin_keys (id, tenant_id, name, key_hash, created_at) VALUES (?1, ?2, ?3, ?4, ?5)")
            .bind(k.id.to_string())
            .bind(k.tenant_id.to_string())
            .bind(&k.name)
            .bind(&k.key_hash)
            .bind(k.created_at.unix_timestamp())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn fetch_admin_key_by_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<AdminKeyRef>, StoreError> {
        let row = sqlx::query(
            "SELECT id, tenant_id FROM admin_keys WHERE key_hash = ?1 AND revoked_at IS NULL",
        )
        .bind(hash)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| {
            Ok(AdminKeyRef {
                id: parse_id(r.try_get::<&str, _>("id")?)?,
                tenant_id: parse_id(r.try_get::<&str, _>("tenant_id")?)?,
            })
        })
        .transpose()
    }

    async fn create_token(&self, t: &NewToken, event: &Event) -> Result<(), StoreError> {
        super::text_rule::token(t)?;
        let r = &t.record;
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "INSERT INTO enrollment_tokens (id, tenant_id, token_hash, max_uses, uses, expires_at, created_at, description, labels, created_by) \
             VALUES (?1, ?2, ?3, ?4, 0, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(r.id.to_string())
        .bind(r.tenant_id.to_string())
        .bind(&t.token_hash)
        .bind(i64::from(r.max_uses))
        .bind(r.expires_at.unix_timestamp())
        .bind(r.created_at.unix_timestamp())
        .bind(&r.description)
        .bind(labels_json(&r.labels))
        .bind(t.created_by.to_string())
        .execute(&mut *tx)
        .await?;
        Self::insert_event(&mut tx, event).await?;
        tx.commit().await?;
        Ok(())
    }

    async fn fetch_token(
        &self,
        tenant: TenantId,
        id: TokenId,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLS} FROM enrollment_tokens WHERE tenant_id = ?1 AND id = ?2"
        ))
        .bind(tenant.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(token_from_row).transpose()
    }

    async fn list_tokens(
        &self,
        tenant: TenantId,
        status: Option<TokenStatus>,
        now: OffsetDateTime,
        page: Page,
    ) -> Result<Vec<TokenRecord>, StoreError> {
        let status_sql = status
            .map(|s| format!(" AND {}", token_status_sql(s, "?3")))
            .unwrap_or_default();
        let rows = sqlx::query(&format!(
            "SELECT {TOKEN_COLS} FROM enrollment_tokens WHERE tenant_id = ?1 AND id > ?2{status_sql} ORDER BY id LIMIT ?4"
        ))
        .bind(tenant.to_string())
        .bind(page.after.map(|u| u.to_string()).unwrap_or_default())
        .bind(now.unix_timestamp())
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(token_from_row).collect()
    }

    async fn revoke_token(
        &self,
        tenant: TenantId,
        id: TokenId,
        now: OffsetDateTime,
        actor: Actor,
    ) -> Result<Option<TokenRecord>, StoreError> {
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE enrollment_tokens SET revoked_at = ?3 WHERE tenant_id = ?1 AND id = ?2 AND revoked_at IS NULL",
        )
        .bind(tenant.to_string())
        .bind(id.to_string())
        .bind(now.unix_timestamp())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        let row = sqlx::query(&format!(
            "SELECT {TOKEN_COLS} FROM enrollment_tokens WHERE tenant_id = ?1 AND id = ?2"
        ))
        .bind(tenant.to_string())
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let Some(record) = row.as_ref().map(token_from_row).transpose()? else {
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
            Self::insert_event(&mut tx, &event).await?;
        }
        tx.commit().await?;
        Ok(Some(record))
    }

    async fn fetch_token_ref_by_hash(
        &self,
        hash: &[u8],
    ) -> Result<Option<(TokenId, TenantId)>, StoreError> {
        let row = sqlx::query("SELECT id, tenant_id FROM enrollment_tokens WHERE token_hash = ?1")
            .bind(hash)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| {
            Ok((
                parse_id(r.try_get::<&str, _>("id")?)?,
                parse_id(r.try_get::<&str, _>("tenant_id")?)?,
            ))
        })
        .transpose()
    }

    async fn enroll(&self, e: &Enrollment) -> Result<EnrollOutcome, StoreError> {
        super::text_rule::enrollment(e)?;
        let a = &e.agent;
        let mut tx = self.pool.begin().await?;
        // The consume comes first: it takes the write lock, and its row count
        // decides which of several concurrent exchanges wins the last use.
        let consumed = sqlx::query(
            "UPDATE enrollment_tokens SET uses = uses + 1 \
             WHERE id = ?1 AND tenant_id = ?2 AND token_hash = ?3 \
             AND revoked_at IS NULL AND uses < max_uses AND expires_at > ?4",
        )
        .bind(e.token_id.to_string())
        .bind(a.tenant_id.to_string())
        .bind(&e.token_hash)
        .bind(e.now.unix_timestamp())
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if consumed != 1 {
            tx.rollback().await?;
            let t = self.fetch_token(a.tenant_id, e.token_id).await?;
            return Ok(EnrollOutcome::Refused(refusal(t.as_ref(), e.now)));
        }
        sqlx::query(&format!(
            "INSERT INTO agents ({AGENT_COLS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL, NULL, NULL, NULL)"
        ))
        .bind(a.id.to_string())
        .bind(a.tenant_id.to_string())
        .bind(&a.spiffe_id)
        .bind(a.status.as_str())
        .bind(&a.hostname)
        .bind(&a.os)
        .bind(&a.agent_version)
        .bind(a.token_id.to_string())
        .bind(a.enrolled_at.unix_timestamp())
        .bind(a.current_serial.to_string())
        .bind(a.certificate_not_after.unix_timestamp())
        .execute(&mut *tx)
        .await?;
        let c = &e.certificate;
        sqlx::query(
            "INSERT INTO certificates (serial, tenant_id, agent_id, status, fingerprint, not_before, not_after, cert_pem, issued_at) \
             VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?6, ?7, ?8)",
        )
        .bind(c.serial.to_string())
        .bind(a.tenant_id.to_string())
        .bind(a.id.to_string())
        .bind(&c.fingerprint)
        .bind(c.not_before.unix_timestamp())
        .bind(c.not_after.unix_timestamp())
        .bind(&c.cert_pem)
        .bind(e.now.unix_timestamp())
        .execute(&mut *tx)
        .await?;
        Self::insert_event(&mut tx, &e.event).await?;
        tx.commit().await?;
        Ok(EnrollOutcome::Enrolled)
    }

    async fn create_event(&self, event: &Event) -> Result<(), StoreError> {
        let mut conn = self.pool.acquire().await?;
        Self::insert_event(&mut conn, event).await
    }

    async fn list_events(
        &self,
        tenant: TenantId,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, body FROM events_outbox WHERE tenant_id = ?1 ORDER BY seq LIMIT ?2",
        )
        .bind(tenant.to_string())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxEvent {
                    seq: r.try_get("seq")?,
                    event: parse_event(r.try_get("body")?)?,
                })
            })
            .collect()
    }

    async fn fetch_agent(
        &self,
        tenant: TenantId,
        id: AgentId,
    ) -> Result<Option<AgentRecord>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLS} FROM agents WHERE tenant_id = ?1 AND id = ?2"
        ))
        .bind(tenant.to_string())
        .bind(id.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.as_ref().map(agent_from_row).transpose()
    }

    async fn list_agents(
        &self,
        tenant: TenantId,
        status: Option<AgentStatus>,
        page: Page,
    ) -> Result<Vec<AgentRecord>, StoreError> {
        let status_sql = if status.is_some() {
            " AND status = ?3"
        } else {
            ""
        };
        let rows = sqlx::query(&format!(
            "SELECT {AGENT_COLS} FROM agents WHERE tenant_id = ?1 AND id > ?2{status_sql} ORDER BY id LIMIT ?4"
        ))
        .bind(tenant.to_string())
        .bind(page.after.map(|u| u.to_string()).unwrap_or_default())
        .bind(status.map(|s| s.as_str()).unwrap_or_default())
        .bind(i64::from(page.limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(agent_from_row).collect()
    }

    async fn list_agent_events(
        &self,
        tenant: TenantId,
        agent: AgentId,
        limit: u32,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, body FROM events_outbox WHERE tenant_id = ?1 AND body LIKE ?2 ORDER BY seq LIMIT ?3",
        )
        .bind(tenant.to_string())
        .bind(agent_event_pattern(agent))
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxEvent {
                    seq: r.try_get("seq")?,
                    event: parse_event(r.try_get("body")?)?,
                })
            })
            .collect()
    }

    async fn list_revoked_certificates(
        &self,
        tenant: TenantId,
        now: OffsetDateTime,
    ) -> Result<Vec<(SerialNumber, OffsetDateTime)>, StoreError> {
        let rows = sqlx::query(
            "SELECT serial, revoked_at FROM certificates \
             WHERE tenant_id = ?1 AND status = 'revoked' AND not_after > ?2 ORDER BY serial",
        )
        .bind(tenant.to_string())
        .bind(now.unix_timestamp())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                let at: Option<i64> = r.try_get("revoked_at")?;
                Ok((
                    parse_id(r.try_get::<&str, _>("serial")?)?,
                    ts(at.unwrap_or_default())?,
                ))
            })
            .collect()
    }

    async fn list_pending_events(&self, limit: u32) -> Result<Vec<OutboxEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, body FROM events_outbox WHERE published_at IS NULL ORDER BY seq LIMIT ?1",
        )
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(OutboxEvent {
                    seq: r.try_get("seq")?,
                    event: parse_event(r.try_get("body")?)?,
                })
            })
            .collect()
    }

    async fn mark_event_sent(&self, seq: i64, now: OffsetDateTime) -> Result<(), StoreError> {
        sqlx::query(
            "UPDATE events_outbox SET published_at = ?2 WHERE seq = ?1 AND published_at IS NULL",
        )
        .bind(seq)
        .bind(now.unix_timestamp())
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    async fn list_tenant_ids(&self) -> Result<Vec<TenantId>, StoreError> {
        let ids: Vec<String> = sqlx::query_scalar("SELECT id FROM tenants ORDER BY id")
            .fetch_all(&self.pool)
            .await?;
        ids.iter().map(|s| parse_id(s)).collect()
    }

    async fn list_agent_certificates(
        &self,
        tenant: TenantId,
        agent: AgentId,
    ) -> Result<Vec<CertificateState>, StoreError> {
        let rows = sqlx::query(
            "SELECT serial, agent_id, status, not_after FROM certificates \
             WHERE tenant_id = ?1 AND agent_id = ?2 ORDER BY serial",
        )
        .bind(tenant.to_string())
        .bind(agent.to_string())
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok(CertificateState {
                    serial: parse_id(r.try_get::<&str, _>("serial")?)?,
                    agent_id: parse_id(r.try_get::<&str, _>("agent_id")?)?,
                    status: parse_cert_status(r.try_get("status")?)?,
                    not_after: ts(r.try_get("not_after")?)?,
                })
            })
            .collect()
    }

    async fn revoke_agent(
        &self,
        tenant: TenantId,
        id: AgentId,
        reason: &str,
        now: OffsetDateTime,
        actor: Actor,
    ) -> Result<Option<AgentRecord>, StoreError> {
        super::text_rule::reason(reason)?;
        let mut tx = self.pool.begin().await?;
        let changed = sqlx::query(
            "UPDATE agents SET status = 'revoked', revoked_at = ?3, revocation_reason = ?4, \
             previous_serial = NULL, previous_valid_until = NULL \
             WHERE tenant_id = ?1 AND id = ?2 AND status = 'active'",
        )
        .bind(tenant.to_string())
        .bind(id.to_string())
        .bind(now.unix_timestamp())
        .bind(reason)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if changed == 1 {
            let serials: Vec<String> = sqlx::query_scalar(
                "UPDATE certificates SET status = 'revoked', revoked_at = ?3 \
                 WHERE tenant_id = ?1 AND agent_id = ?2 AND status != 'revoked' RETURNING serial",
            )
            .bind(tenant.to_string())
            .bind(id.to_string())
            .bind(now.unix_timestamp())
            .fetch_all(&mut *tx)
            .await?;
            let mut revoked_serials = serials
                .iter()
                .map(|s| parse_id(s))
                .collect::<Result<Vec<_>, _>>()?;
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
            Self::insert_event(&mut tx, &event).await?;
        }
        let row = sqlx::query(&format!(
            "SELECT {AGENT_COLS} FROM agents WHERE tenant_id = ?1 AND id = ?2"
        ))
        .bind(tenant.to_string())
        .bind(id.to_string())
        .fetch_optional(&mut *tx)
        .await?;
        let agent = row.as_ref().map(agent_from_row).transpose()?;
        tx.commit().await?;
        Ok(agent)
    }

    async fn rotate(&self, r: &Rotation) -> Result<RotateOutcome, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(st) = Self::rotation_state(&mut tx, r.tenant, r.agent, Some(r.presented)).await?
        else {
            return Ok(RotateOutcome::Refused(RotationRefusal::UnknownAgent));
        };
        let plan = match plan_rotation(&st, r.presented, r.certificate.serial) {
            Ok(plan) => plan,
            Err(refusal) => return Ok(RotateOutcome::Refused(refusal)),
        };
        let actor = Actor::Agent(r.agent);
        for s in &plan.supersede {
            Self::apply_supersede(&mut tx, r.tenant, r.agent, s, actor.clone(), r.now).await?;
        }
        let c = &r.certificate;
        sqlx::query(
            "INSERT INTO certificates (serial, tenant_id, agent_id, status, fingerprint, not_before, not_after, cert_pem, issued_at, predecessor_serial) \
             VALUES (?1, ?2, ?3, 'active', ?4, ?5, ?6, ?7, ?8, ?9)",
        )
        .bind(c.serial.to_string())
        .bind(r.tenant.to_string())
        .bind(r.agent.to_string())
        .bind(&c.fingerprint)
        .bind(c.not_before.unix_timestamp())
        .bind(c.not_after.unix_timestamp())
        .bind(&c.cert_pem)
        .bind(r.now.unix_timestamp())
        .bind(r.presented.to_string())
        .execute(&mut *tx)
        .await?;
        sqlx::query(
            "UPDATE agents SET current_serial = ?3, certificate_not_after = ?4, \
             previous_serial = ?5, previous_valid_until = ?6 WHERE tenant_id = ?1 AND id = ?2",
        )
        .bind(r.tenant.to_string())
        .bind(r.agent.to_string())
        .bind(c.serial.to_string())
        .bind(c.not_after.unix_timestamp())
        .bind(plan.previous.to_string())
        .bind(r.previous_valid_until.unix_timestamp())
        .execute(&mut *tx)
        .await?;
        Self::insert_event(&mut tx, &rotated_event(r)).await?;
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
        let mut tx = self.begin_write().await?;
        let Some(st) = Self::rotation_state(&mut tx, tenant, agent, Some(presented)).await? else {
            return Ok(ConfirmOutcome::Refused(RotationRefusal::UnknownAgent));
        };
        let supersede = match plan_confirmation(&st, presented) {
            Ok(s) => s,
            Err(refusal) => return Ok(ConfirmOutcome::Refused(refusal)),
        };
        if let Some(s) = &supersede {
            Self::apply_supersede(&mut tx, tenant, agent, s, Actor::Agent(agent), now).await?;
            Self::clear_previous(&mut tx, tenant, agent).await?;
        }
        tx.commit().await?;
        Ok(ConfirmOutcome::Confirmed(supersede))
    }

    async fn list_rotations_due(
        &self,
        now: OffsetDateTime,
        limit: u32,
    ) -> Result<Vec<(TenantId, AgentId)>, StoreError> {
        let rows = sqlx::query(
            "SELECT tenant_id, id FROM agents \
             WHERE previous_valid_until IS NOT NULL AND previous_valid_until <= ?1 \
             ORDER BY previous_valid_until LIMIT ?2",
        )
        .bind(now.unix_timestamp())
        .bind(i64::from(limit))
        .fetch_all(&self.pool)
        .await?;
        rows.iter()
            .map(|r| {
                Ok((
                    parse_id(r.try_get::<&str, _>("tenant_id")?)?,
                    parse_id(r.try_get::<&str, _>("id")?)?,
                ))
            })
            .collect()
    }

    async fn expire_rotation(
        &self,
        tenant: TenantId,
        agent: AgentId,
        now: OffsetDateTime,
    ) -> Result<Option<Supersede>, StoreError> {
        let mut tx = self.begin_write().await?;
        let Some(st) = Self::rotation_state(&mut tx, tenant, agent, None).await? else {
            return Ok(None);
        };
        let Some(s) = plan_expiry(&st, now) else {
            return Ok(None);
        };
        Self::apply_supersede(&mut tx, tenant, agent, &s, Actor::System, now).await?;
        Self::clear_previous(&mut tx, tenant, agent).await?;
        tx.commit().await?;
        Ok(Some(s))
    }
}
