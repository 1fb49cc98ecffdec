//! Enrollment tokens: create (secret shown once), list, get, revoke.

use std::collections::BTreeMap;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use oneprotect_identity::events::{Actor, Event, Payload};
use oneprotect_identity::problem;
use oneprotect_identity::{TenantId, TokenId};

use super::{next_cursor, path_id, AdminAuth, ApiError, ApiJson, AppState, ListQuery, Sensitive};
use crate::store::{NewToken, Store, TokenRecord, TokenStatus};
use crate::text;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/agent-enrollment/tokens", post(create).get(list))
        .route("/api/v1/agent-enrollment/tokens/{token_id}", get(fetch))
        .route(
            "/api/v1/agent-enrollment/tokens/{token_id}/revoke",
            post(revoke),
        )
}

const MIN_TTL: u64 = 60;
const MAX_TTL: u64 = 30 * 24 * 3600;
const DEFAULT_TTL: u64 = 3600;
const MAX_USES: u32 = 10_000;

/// `TokenCreateRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateRequest {
    ttl_seconds: Option<u64>,
    max_uses: Option<u32>,
    description: Option<String>,
    labels: Option<BTreeMap<String, String>>,
}

/// `Token`.
#[derive(Debug, Serialize)]
pub(crate) struct TokenView {
    token_id: TokenId,
    tenant_id: TenantId,
    status: TokenStatus,
    max_uses: u32,
    uses: u32,
    #[serde(with = "time::serde::rfc3339")]
    expires_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    revoked_at: Option<OffsetDateTime>,
    description: Option<String>,
    labels: BTreeMap<String, String>,
}

impl TokenView {
    fn of(t: TokenRecord, now: OffsetDateTime) -> Self {
        Self {
            token_id: t.id,
            tenant_id: t.tenant_id,
            status: t.status(now),
            max_uses: t.max_uses,
            uses: t.uses,
            expires_at: t.expires_at,
            created_at: t.created_at,
            revoked_at: t.revoked_at,
            description: t.description,
            labels: t.labels,
        }
    }
}

/// `TokenCreated`: the token and, this once, its secret.
#[derive(Serialize)]
pub(crate) struct Created {
    #[serde(flatten)]
    view: TokenView,
    token: String,
}

#[derive(Serialize)]
struct TokenList {
    items: Vec<TokenView>,
    next_cursor: Option<String>,
}

fn check(req: &CreateRequest) -> Result<(u64, u32), ApiError> {
    let ttl = req.ttl_seconds.unwrap_or(DEFAULT_TTL);
    if !(MIN_TTL..=MAX_TTL).contains(&ttl) {
        return Err(ApiError::invalid("ttl_seconds must be 60..=2592000"));
    }
    let max_uses = req.max_uses.unwrap_or(1);
    if !(1..=MAX_USES).contains(&max_uses) {
        return Err(ApiError::invalid("max_uses must be 1..=10000"));
    }
    if let Some(d) = &req.description {
        text::check("description", d, 0, 256)?;
    }
    if let Some(labels) = &req.labels {
        if labels.len() > 16 {
            return Err(ApiError::invalid("at most 16 labels"));
        }
        for (k, v) in labels {
            text::check("label keys", k, 1, 64)?;
            text::check("label values", v, 0, 256)?;
        }
    }
    Ok((ttl, max_uses))
}

async fn create(
    State(state): State<AppState>,
    auth: AdminAuth,
    ApiJson(req): ApiJson<CreateRequest>,
) -> Result<Sensitive<Created>, ApiError> {
    let (ttl, max_uses) = check(&req)?;
    let now = state.clock.now();
    let secret = crate::token::new_secret()?;
    let record = TokenRecord {
        id: TokenId::random(),
        tenant_id: auth.tenant,
        max_uses,
        uses: 0,
        expires_at: now + std::time::Duration::from_secs(ttl),
        created_at: now,
        revoked_at: None,
        description: req.description,
        labels: req.labels.unwrap_or_default(),
    };
    let event = Event::new(
        auth.tenant,
        Actor::AdminKey(auth.key_id),
        now,
        Payload::TokenIssued {
            token_id: record.id,
            expires_at: record.expires_at,
            max_uses,
            description: record.description.clone(),
            labels: record.labels.clone(),
        },
    );
    let new = NewToken {
        token_hash: state.pepper.hash(secret.expose_secret()),
        record,
        created_by: auth.key_id,
    };
    state.store.create_token(&new, &event).await?;
    tracing::info!(tenant = %auth.tenant, token_id = %new.record.id, max_uses, ttl, "enrollment token created");
    let location = format!("/api/v1/agent-enrollment/tokens/{}", new.record.id);
    let body = Created {
        view: TokenView::of(new.record, now),
        token: secret.expose_secret().to_owned(),
    };
    Ok(Sensitive::created(body, Some(location)))
}

async fn list(
    State(state): State<AppState>,
    auth: AdminAuth,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = ListQuery::from_rejection(q)?;
    let status = q
        .status
        .as_deref()
        .map(|s| {
            serde_json::from_value::<TokenStatus>(serde_json::Value::String(s.to_owned())).map_err(
                |_| ApiError::invalid("status must be active, revoked, expired or used_up"),
            )
        })
        .transpose()?;
    let page = q.page()?;
    let now = state.clock.now();
    let items = state
        .store
        .list_tokens(auth.tenant, status, now, page)
        .await?;
    let ids: Vec<_> = items.iter().map(|t| *t.id.as_uuid()).collect();
    let body = TokenList {
        next_cursor: next_cursor(&ids, page.limit),
        items: items.into_iter().map(|t| TokenView::of(t, now)).collect(),
    };
    serde_json::to_value(&body)
        .map(Json)
        .map_err(ApiError::from)
}

async fn fetch(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: TokenId = path_id(&id)?;
    let t = state
        .store
        .fetch_token(auth.tenant, id)
        .await?
        .ok_or(ApiError::new(problem::NOT_FOUND))?;
    serde_json::to_value(TokenView::of(t, state.clock.now()))
        .map(Json)
        .map_err(ApiError::from)
}

async fn revoke(
    State(state): State<AppState>,
    auth: AdminAuth,
    Path(id): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let id: TokenId = path_id(&id)?;
    let now = state.clock.now();
    let t = state
        .store
        .revoke_token(auth.tenant, id, now, Actor::AdminKey(auth.key_id))
        .await?
        .ok_or(ApiError::new(problem::NOT_FOUND))?;
    tracing::info!(tenant = %auth.tenant, token_id = %id, "enrollment token revoked");
    serde_json::to_value(TokenView::of(t, now))
        .map(Json)
        .map_err(ApiError::from)
}
