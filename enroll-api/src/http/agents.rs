//! Agents: list, get, revoke, audit history. A revocation answers 200 once the store has
//! committed it and (unless `?wait=false`) every live gateway has applied it or the
//! enforcement deadline passed (ADR-0022, [`crate::enforce`]).

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use oneprotect_identity::events::Actor;
use oneprotect_identity::problem;
use oneprotect_identity::{AgentId, AgentStatus, SerialNumber, TenantId};

use super::{next_cursor, path_id, AdminAuth, ApiError, ApiJson, AppState, ListQuery, WaitQuery};
use crate::enforce::Enforcement;
use crate::store::{AgentRecord, Store};

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/agents", get(list))
        .route("/api/v1/agents/{agent_id}", get(fetch))
        .route("/api/v1/agents/{agent_id}/revoke", post(revoke))
        .route("/api/v1/agents/{agent_id}/events", get(events))
}

/// `Agent`.
#[derive(Debug, Serialize)]
pub(crate) struct AgentView {
    agent_id: AgentId,
    tenant_id: TenantId,
    spiffe_id: String,
    status: AgentStatus,
    hostname: String,
    os: String,
    agent_version: String,
    #[serde(with = "time::serde::rfc3339")]
    enrolled_at: OffsetDateTime,
    current_serial: SerialNumber,
    #[serde(with = "time::serde::rfc3339")]
    certificate_not_after: OffsetDateTime,
    previous_serial: Option<SerialNumber>,
    #[serde(with = "time::serde::rfc3339::option")]
    previous_valid_until: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339::option")]
    revoked_at: Option<OffsetDateTime>,
    revocation_reason: Option<String>,
}

impl From<AgentRecord> for AgentView {
    fn from(a: AgentRecord) -> Self {
        Self {
            agent_id: a.id,
            tenant_id: a.tenant_id,
            spiffe_id: a.spiffe_id,
            status: a.status,
            hostname: a.hostname,
            os: a.os,
            agent_version: a.agent_version,
            enrolled_at: a.enrolled_at,
            current_serial: a.current_serial,
            certificate_not_after: a.certificate_not_after,
            previous_serial: a.previous_serial,
            previous_valid_until: a.previous_valid_until,
            revoked_at: a.revoked_at,
            revocation_reason: a.revocation_reason,
        }
    }
}

#[derive(Serialize)]
struct AgentList {
    items: Vec<AgentView>,
    next_cursor: Option<String>,
}

/// `RevokedAgent`: the agent and what the gateways confirmed.
#[derive(Debug, Serialize)]
pub(crate) struct RevokedAgent {
    #[serde(flatten)]
    agent: AgentView,
    enforcement: Enforcement,
}

/// `RevokeAgentRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeRequest {
    reason: String,
}

async fn list(
    State(state): State<AppState>,
    auth: AdminAuth,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = ListQuery::from_rejection(q)?;
    let status = match q.status.as_deref() {
        None => None,
        Some("active") => Some(AgentStatus::Active),
        Some("revoked") => Some(AgentStatus::Revoked),
        Some(_) => return Err(ApiError::invalid("status must be active or revoked")),
    };
    let page = q.page()?;
    let items = state.store.list_agents(auth.tenant, status, page).await?;
    let ids: Vec<_> = items.iter().map(|a| *a.id.as_uuid()).collect();
    let body = AgentList {
        next_cursor: next_cursor(&ids, page.limit),
        items: items.into_iter().map(AgentView::from).collect(),
    };
    serde_json::to_value(&body)
        .map(Json)
        .map_err(ApiError::from)
}

async fn fetch(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> Result<Json<AgentView>, ApiError> {
    let id: AgentId = path_id(&id)?;
    let a = state
        .store
        .fetch_agent(auth.tenant, id)
        .await?
        .ok_or(ApiError::new(problem::NOT_FOUND))?;
    Ok(Json(a.into()))
}

/// The most events one agent's history returns.
const MAX_AGENT_EVENTS: u32 = 1000;

/// `EventList`: the agent's events as stored (and streamed), oldest first.
async fn events(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: AgentId = path_id(&id)?;
    // 404 for another tenant's (or no) agent, before any event read.
    state
        .store
        .fetch_agent(auth.tenant, id)
        .await?
        .ok_or(ApiError::new(problem::NOT_FOUND))?;
    let items: Vec<_> = state
        .store
        .list_agent_events(auth.tenant, id, MAX_AGENT_EVENTS)
        .await?
        .into_iter()
        .map(|e| e.event)
        .collect();
    Ok(Json(serde_json::json!({ "items": items })))
}

async fn revoke(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
    q: Result<Query<WaitQuery>, QueryRejection>,
    ApiJson(req): ApiJson<RevokeRequest>,
) -> Result<Json<RevokedAgent>, ApiError> {
    let id: AgentId = path_id(&id)?;
    let wait = WaitQuery::wait(q)?;
    crate::text::check("reason", &req.reason, 1, 256)?;
    let a = state
        .store
        .revoke_agent(
            auth.tenant,
            id,
            &req.reason,
            state.clock.now(),
            Actor::AdminKey(auth.key_id),
        )
        .await?
        .ok_or(ApiError::new(problem::NOT_FOUND))?;
    // Committed: the store woke the relay, which pushes the revocation to
    // Redis (and retries from the outbox if Redis is down); the enforcer
    // writes it at once and waits for the gateways.
    let enforcement = state.enforce(auth.tenant, id, wait).await;
    tracing::info!(
        tenant = %auth.tenant,
        agent = %id,
        outcome = enforcement.outcome.as_str(),
        gateways_live = enforcement.gateways_live,
        gateways_confirmed = enforcement.gateways_confirmed,
        elapsed_ms = enforcement.elapsed_ms,
        "agent revoked"
    );
    Ok(Json(RevokedAgent {
        agent: a.into(),
        enforcement,
    }))
}
