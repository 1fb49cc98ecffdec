//! The HTTP API (see `docs/architecture/api-outline.md` and
//! `specs/openapi.yaml`): one module per resource, each with
//! `fn router() -> Router<AppState>`, merged by [`router`].
//!
//! Every error is an RFC 9457 problem document with a stable code from
//! [`oneprotect_identity::problem`], produced by [`ApiError`]. 5xx bodies are
//! generic; the cause goes to the log. Secrets never reach a log line: the
//! request types hold them in redacting newtypes, and the trace layer logs
//! method, path and status only.

mod agents;
mod ca;
mod exchange;
mod health;
mod rotation;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, Request};
use axum::http::header::{AUTHORIZATION, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Router;
use bytes::Bytes;
use serde::de::DeserializeOwned;
use uuid::Uuid;

use oneprotect_identity::problem::{self, Problem, ProblemKind};
use oneprotect_identity::TenantId;

use crate::ca::Ca;
use crate::clock::SharedClock;
use crate::ratelimit::RateLimiter;
use crate::secrets::{Pepper, ADMIN_KEY_PREFIX};
use crate::store::{AnyStore, Page, Store, StoreError};

/// What every handler shares.
#[derive(Clone, Debug)]
pub struct AppState(Arc<Inner>);

/// The parts of [`AppState`].
#[derive(Debug)]
pub struct Inner {
    /// Storage.
    pub store: AnyStore,
    /// The CA.
    pub ca: Arc<Ca>,
    /// The HMAC pepper for secret hashes.
    pub pepper: Pepper,
    /// The clock.
    pub clock: SharedClock,
    /// Exchange limiter per source address.
    pub per_address: RateLimiter,
    /// Exchange limiter per token id.
    pub per_token: RateLimiter,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// The Redis projection, when `redis.url` is configured.
    pub projection: Option<crate::projection::Projection>,
    /// Wakes the outbox relay after a commit.
    pub relay: crate::relay::RelayWaker,
    /// Verifies the gateway's identity assertions on the agent endpoints.
    pub assertions: oneprotect_identity::AssertionVerifier,
    /// How long a rotated-away-from certificate stays accepted when the new
    /// one is not seen earlier.
    pub rotation_grace: time::Duration,
    /// The metrics.
    pub metrics: crate::metrics::Metrics,
}

impl AppState {
    /// Wraps the parts.
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.0
    }
}

/// Every (method, path template) this service serves, in OpenAPI spelling.
/// The contract test compares it with `specs/openapi.yaml`, and a unit test
/// checks that the router answers each one.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/healthz"),
    ("GET", "/readyz"),
    ("GET", "/metrics"),
    ("POST", "/api/v1/agent-enrollment/tokens"),
    ("GET", "/api/v1/agent-enrollment/tokens"),
    ("GET", "/api/v1/agent-enrollment/tokens/{token_id}"),
    ("POST", "/api/v1/agent-enrollment/tokens/{token_id}/revoke"),
    ("POST", "/api/v1/agent-enrollment/exchange"),
    ("GET", "/api/v1/agents"),
    ("GET", "/api/v1/agents/{agent_id}"),
    ("POST", "/api/v1/agents/{agent_id}/revoke"),
    ("GET", "/api/v1/agents/{agent_id}/events"),
    ("POST", "/api/v1/agents/{agent_id}/certificate/rotate"),
    ("POST", "/api/v1/agents/{agent_id}/certificate/confirm"),
    ("GET", "/api/v1/ca"),
    ("GET", "/api/v1/trust-bundle"),
    ("GET", "/api/v1/tenants/{tenant_id}/crl"),
];

/// The whole API.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    Router::new()
        .merge(health::router())
        .merge(tokens::router())
        .merge(exchange::router())
        .merge(agents::router())
        .merge(rotation::router())
        .merge(ca::router())
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    // Path only: query strings are not logged.
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path())
                })
                .on_request(())
                .on_response(
                    tower_http::trace::DefaultOnResponse::new().level(tracing::Level::INFO),
                ),
        )
        .with_state(state)
}

async fn route_not_found() -> ApiError {
    ApiError::new(problem::ROUTE_NOT_FOUND)
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(problem::METHOD_NOT_ALLOWED)
}

/// An error answer.
#[derive(Debug)]
pub enum ApiError {
    /// A problem of a catalogue kind, with an optional safe detail.
    Problem(ProblemKind, Option<String>),
    /// 401 `unauthorized` with `WWW-Authenticate: Bearer`.
    Unauthorized,
    /// 429 `rate_limited` with `Retry-After`.
    RateLimited(Duration),
    /// A storage failure: 503 when retryable, else 500.
    Store(StoreError),
    /// Any other internal failure (logged, answered generically).
    Internal(String),
}

impl ApiError {
    /// A problem without detail.
    pub fn new(kind: ProblemKind) -> Self {
        ApiError::Problem(kind, None)
    }

    /// A problem with a detail (never a secret or an internal cause).
    pub fn detail(kind: ProblemKind, detail: impl Into<String>) -> Self {
        ApiError::Problem(kind, Some(detail.into()))
    }

    /// 422 `invalid_request` with a detail.
    pub fn invalid(detail: impl Into<String>) -> Self {
        Self::detail(problem::INVALID_REQUEST, detail)
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

const STORAGE_RETRY_AFTER_SECS: u64 = 5;

fn problem_response(kind: ProblemKind, detail: Option<String>) -> Response {
    let p = Problem::new(kind, detail);
    let status = StatusCode::from_u16(kind.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(
            CONTENT_TYPE,
            HeaderValue::from_static(problem::CONTENT_TYPE),
        )],
        p.to_json(),
    )
        .into_response()
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        match self {
            ApiError::Problem(kind, detail) => problem_response(kind, detail),
            ApiError::Unauthorized => {
                let mut r = problem_response(problem::UNAUTHORIZED, None);
                r.headers_mut()
                    .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
                r
            }
            ApiError::RateLimited(wait) => {
                let mut r = problem_response(problem::RATE_LIMITED, None);
                r.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(wait.as_secs().max(1)));
                r
            }
            ApiError::Store(StoreError::Unavailable(e)) => {
                tracing::warn!(error = %e, "storage unavailable");
                let mut r = problem_response(problem::STORAGE_UNAVAILABLE, None);
                r.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from(STORAGE_RETRY_AFTER_SECS));
                r
            }
            ApiError::Store(e) => {
                tracing::error!(error = %e, "storage error");
                problem_response(problem::INTERNAL, None)
            }
            ApiError::Internal(e) => {
                tracing::error!(error = %e, "internal error");
                problem_response(problem::INTERNAL, None)
            }
        }
    }
}

/// A JSON body with the API's error mapping: wrong media type 415,
/// too large 413, not JSON 400 `invalid_json`, wrong shape 422
/// `invalid_request`.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::new(problem::UNSUPPORTED_MEDIA_TYPE));
        }
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(problem::PAYLOAD_TOO_LARGE)
                } else {
                    ApiError::invalid("the request body could not be read")
                }
            })?;
        match serde_json::from_slice(&bytes) {
            Ok(v) => Ok(ApiJson(v)),
            Err(e) => match e.classify() {
                serde_json::error::Category::Data => {
                    // serde's message names the field and the expectation,
                    // never the value.
                    Err(ApiError::invalid(e.to_string()))
                }
                _ => Err(ApiError::new(problem::INVALID_JSON)),
            },
        }
    }
}

/// An authenticated tenant admin (bearer `opak_…` key).
#[derive(Debug, Clone, Copy)]
pub struct AdminAuth {
    /// The key's public id.
    pub key_id: Uuid,
    /// The tenant it administers: every query is scoped to it.
    pub tenant: TenantId,
}

impl FromRequestParts<AppState> for AdminAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let key = parts
            .headers
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or(ApiError::Unauthorized)?;
        if !crate::secrets::well_formed(key, ADMIN_KEY_PREFIX) {
            return Err(ApiError::Unauthorized);
        }
        let hash = state.pepper.hash(key);
        let found = state
            .store
            .fetch_admin_key_by_hash(&hash)
            .await?
            .ok_or(ApiError::Unauthorized)?;
        Ok(AdminAuth {
            key_id: found.id,
            tenant: found.tenant_id,
        })
    }
}

/// The peer address of the connection, when served over a socket.
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub Option<SocketAddr>);

impl<S: Send + Sync> FromRequestParts<S> for PeerAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(PeerAddr(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| c.0),
        ))
    }
}

/// `?status=&limit=&cursor=` of the list endpoints.
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ListQuery {
    pub(crate) status: Option<String>,
    pub(crate) limit: Option<u32>,
    pub(crate) cursor: Option<String>,
}

pub(crate) const DEFAULT_PAGE: u32 = 100;
pub(crate) const MAX_PAGE: u32 = 500;

impl ListQuery {
    pub(crate) fn from_rejection(
        q: Result<axum::extract::Query<ListQuery>, QueryRejection>,
    ) -> Result<ListQuery, ApiError> {
        q.map(|q| q.0)
            .map_err(|_| ApiError::invalid("query parameters are invalid"))
    }

    pub(crate) fn page(&self) -> Result<Page, ApiError> {
        let limit = self.limit.unwrap_or(DEFAULT_PAGE);
        if !(1..=MAX_PAGE).contains(&limit) {
            return Err(ApiError::invalid("limit must be 1..=500"));
        }
        let after = self
            .cursor
            .as_deref()
            .map(|c| {
                oneprotect_identity::TokenId::from_str_canonical(c)
                    .ok_or_else(|| ApiError::invalid("cursor is not valid"))
            })
            .transpose()?;
        Ok(Page { limit, after })
    }
}

/// The cursor for the next page: the last id when the page was full.
pub(crate) fn next_cursor(ids: &[Uuid], limit: u32) -> Option<String> {
    (ids.len() == limit as usize)
        .then(|| ids.last().map(|u| u.hyphenated().to_string()))
        .flatten()
}

/// Parses a path id; anything but a canonical UUID is 404 (never 400), so
/// the path space reveals nothing.
pub(crate) fn path_id<T: std::str::FromStr>(s: &str) -> Result<T, ApiError> {
    s.parse().map_err(|_| ApiError::new(problem::NOT_FOUND))
}

trait CanonicalUuid {
    fn from_str_canonical(s: &str) -> Option<Uuid>;
}

impl CanonicalUuid for oneprotect_identity::TokenId {
    fn from_str_canonical(s: &str) -> Option<Uuid> {
        s.parse::<oneprotect_identity::TokenId>()
            .ok()
            .map(|t| *t.as_uuid())
    }
}

#[cfg(test)]
mod tests;
