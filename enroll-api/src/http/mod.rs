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
pub mod keys;
mod projection;
mod rotation;
mod tokens;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{
    ConnectInfo, DefaultBodyLimit, FromRequest, FromRequestParts, MatchedPath, Request, State,
};
use axum::http::header::{
    AUTHORIZATION, CACHE_CONTROL, CONNECTION, CONTENT_TYPE, LOCATION, PRAGMA, RETRY_AFTER,
    WWW_AUTHENTICATE,
};
use axum::http::request::Parts;
use axum::http::{HeaderValue, StatusCode};
use axum::middleware::Next;
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
    /// The exchange's recent token reads.
    pub token_cache: crate::authority::exchange::TokenCache,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive, from the end of the
    /// head; then 408 `request_body_timeout`.
    pub body_read_timeout: Duration,
    /// The peers whose `X-Forwarded-For` names the client.
    pub trusted_proxies: crate::forwarded::TrustedProxies,
    /// The Redis projection, when `redis.url` is configured.
    pub projection: Option<crate::projection::Projection>,
    /// Verifies the gateway's identity assertions on the agent endpoints.
    pub assertions: oneprotect_identity::AssertionVerifier,
    /// The same gateway keys, published as a JWK Set for upstreams.
    pub jwks: keys::PublishedKeys,
    /// How long a rotated-away-from certificate stays accepted when the new
    /// one is not seen earlier.
    pub rotation_grace: time::Duration,
    /// The attempt window of `agent.certificate.reuse_detected`.
    pub reuse_window: std::time::Duration,
    /// The metrics.
    pub metrics: crate::metrics::Metrics,
    /// Waits for the gateways after revocations and supersessions.
    pub enforcer: crate::enforce::Enforcer,
}

impl AppState {
    /// Wraps the parts.
    pub fn new(inner: Inner) -> Self {
        Self(Arc::new(inner))
    }
}

impl AppState {
    /// After `agent`'s revocation or supersession committed: project it and,
    /// with `wait`, wait for the live gateways (ADR-0022).
    pub(crate) async fn enforce(
        &self,
        tenant: TenantId,
        agent: oneprotect_identity::AgentId,
        wait: bool,
    ) -> crate::enforce::Enforcement {
        self.enforcer
            .enforce(&self.store, &self.clock, &self.metrics, tenant, agent, wait)
            .await
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
    ("GET", "/api/v1/tenants/{tenant_id}/crl-chain"),
    ("GET", "/api/v1/crl"),
    ("GET", "/.well-known/jwks.json"),
    ("GET", "/api/v1/projection"),
];

/// The whole API.
pub fn router(state: AppState) -> Router {
    let limit = state.max_body_bytes;
    let trusted = state.trusted_proxies.clone();
    Router::new()
        .merge(health::router())
        .merge(tokens::router())
        .merge(exchange::router())
        .merge(agents::router())
        .merge(rotation::router())
        .merge(ca::router())
        .merge(keys::router())
        .merge(projection::router())
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(limit))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            count_request,
        ))
        .layer(
            tower_http::trace::TraceLayer::new_for_http()
                .make_span_with(move |req: &Request| {
                    // Path only: query strings are not logged. The client
                    // is the TCP peer, or what a trusted gateway forwarded.
                    let client = req
                        .extensions()
                        .get::<ConnectInfo<SocketAddr>>()
                        .map(|c| trusted.client_ip(c.0.ip(), req.headers()));
                    match client {
                        Some(client) => tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), %client),
                        None => tracing::info_span!("request", method = %req.method(), path = %req.uri().path()),
                    }
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

/// An error answer. The internal failures keep their cause as
/// [`std::error::Error::source`]; it is logged, and the answer is a generic
/// 500 `internal`.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// A problem of a catalogue kind, with an optional safe detail.
    #[error("problem {}", .0.code)]
    Problem(ProblemKind, Option<String>),
    /// 401 `unauthorized` with `WWW-Authenticate: Bearer`.
    #[error("unauthorized")]
    Unauthorized,
    /// 429 `rate_limited` with `Retry-After`.
    #[error("rate limited")]
    RateLimited(Duration),
    /// 408 `request_body_timeout` with `Connection: close`.
    #[error("request body timeout")]
    BodyTimeout,
    /// A storage failure: 503 when retryable, else 500.
    #[error(transparent)]
    Store(StoreError),
    /// The exchange failed inside (a missing tenant, the CA).
    #[error(transparent)]
    Exchange(crate::authority::exchange::ExchangeError),
    /// A rotation failed inside (the CA).
    #[error(transparent)]
    Rotation(crate::authority::rotation::RotationError),
    /// The CA could not read a tenant CA or sign a CRL.
    #[error(transparent)]
    Ca(#[from] crate::ca::CaError),
    /// A token secret could not be generated.
    #[error(transparent)]
    Secret(#[from] crate::secrets::SecretError),
    /// A blocking task (CA file work) panicked or was cancelled.
    #[error("blocking task failed")]
    Task(#[from] tokio::task::JoinError),
    /// An answer did not serialise.
    #[error("encoding the answer failed")]
    Encode(#[from] serde_json::Error),
    /// A computed time is out of range.
    #[error("time out of range")]
    Time(#[source] time::error::ComponentRange),
    /// A computed header value is not valid.
    #[error("invalid header value")]
    Header(#[from] axum::http::header::InvalidHeaderValue),
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

impl From<crate::text::TextError> for ApiError {
    fn from(e: crate::text::TextError) -> Self {
        ApiError::invalid(e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        ApiError::Store(e)
    }
}

const STORAGE_RETRY_AFTER_SECS: u64 = 5;

/// The problem code of an error answer, kept in the response's extensions
/// for the request counter ([`count_request`]).
#[derive(Debug, Clone, Copy)]
struct ProblemCode(&'static str);

fn problem_response(kind: ProblemKind, detail: Option<String>) -> Response {
    let p = Problem::new(kind, detail);
    let status = StatusCode::from_u16(kind.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut r = (
        status,
        [(
            CONTENT_TYPE,
            HeaderValue::from_static(problem::CONTENT_TYPE),
        )],
        p.to_json(),
    )
        .into_response();
    r.extensions_mut().insert(ProblemCode(kind.code));
    r
}

/// Counts every answer in `requests_total{method,route,status}` (the route
/// template, so the label set stays bounded) and every problem answer in
/// `problems_total{code}`.
async fn count_request(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let method = req.method().clone();
    let route = req.extensions().get::<MatchedPath>().cloned();
    let r = next.run(req).await;
    let code = r.extensions().get::<ProblemCode>().map(|c| c.0);
    state.metrics.request(
        &method,
        route.as_ref().map(MatchedPath::as_str),
        r.status(),
        code,
    );
    r
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
            ApiError::BodyTimeout => {
                let mut r = problem_response(problem::REQUEST_BODY_TIMEOUT, None);
                // The rest of the body may still come: this connection
                // cannot carry another request.
                r.headers_mut()
                    .insert(CONNECTION, HeaderValue::from_static("close"));
                r
            }
            ApiError::Store(StoreError::InvalidText(e)) => {
                problem_response(problem::INVALID_REQUEST, Some(e.to_string()))
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
            e => {
                // The whole chain: each typed variant keeps its cause.
                tracing::error!(error = %crate::error_chain(&e), "internal error");
                problem_response(problem::INTERNAL, None)
            }
        }
    }
}

/// A JSON body with the API's error mapping: wrong media type 415,
/// too large 413, not arriving within `limits.body_read_timeout_ms` 408
/// `request_body_timeout`, not JSON 400 `invalid_json`, not a JSON object
/// or wrong shape (a missing, unknown or mistyped field) 422
/// `invalid_request`.
///
/// Every request body of the API is an object: a top-level array (which
/// serde would otherwise map onto a struct's fields in order) or scalar is
/// refused before any field is looked at. Every request type also refuses
/// unknown fields (`deny_unknown_fields`, nested objects too); the suite test
/// `hardening_api::request_bodies_are_strict_for_every_schema_in_the_spec`
/// walks every request schema of `specs/openapi.yaml`.
#[derive(Debug, Clone)]
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &AppState) -> Result<Self, ApiError> {
        let json = req
            .headers()
            .get(CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(ApiError::new(problem::UNSUPPORTED_MEDIA_TYPE));
        }
        // One deadline for the whole body, however it trickles in.
        let read = tokio::time::timeout(state.body_read_timeout, Bytes::from_request(req, state));
        let bytes = read
            .await
            .map_err(|_| {
                tracing::info!("request body did not arrive in time");
                ApiError::BodyTimeout
            })?
            .map_err(|e: BytesRejection| {
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    ApiError::new(problem::PAYLOAD_TOO_LARGE)
                } else {
                    ApiError::invalid("the request body could not be read")
                }
            })?;
        parse_body(&bytes).map(ApiJson)
    }
}

/// The body as `T`: 400 `invalid_json` when it is not JSON, 422
/// `invalid_request` when it is not an object or does not fit `T`.
pub(crate) fn parse_body<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let first = bytes.iter().find(|b| !b.is_ascii_whitespace());
    if first != Some(&b'{') {
        // Valid JSON of another kind is a shape error; anything else is
        // not JSON at all.
        return match serde_json::from_slice::<serde::de::IgnoredAny>(bytes) {
            Ok(_) => Err(ApiError::invalid("the request body must be a JSON object")),
            Err(_) => Err(ApiError::new(problem::INVALID_JSON)),
        };
    }
    match serde_json::from_slice(bytes) {
        Ok(v) => Ok(v),
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

/// An answer whose body carries a secret (a token's secret) or a freshly
/// issued certificate: the one place that marks such answers
/// `Cache-Control: no-store` (and `Pragma: no-cache` for HTTP/1.0 caches),
/// with `Location` when the answer created a resource.
#[derive(Debug)]
pub(crate) struct Sensitive<T> {
    status: StatusCode,
    location: Option<String>,
    body: T,
}

impl<T> Sensitive<T> {
    /// 200 with `body`.
    pub(crate) fn ok(body: T) -> Self {
        Self {
            status: StatusCode::OK,
            location: None,
            body,
        }
    }

    /// 201 with `body`, optionally naming the new resource.
    pub(crate) fn created(body: T, location: Option<String>) -> Self {
        Self {
            status: StatusCode::CREATED,
            location,
            body,
        }
    }
}

impl<T: serde::Serialize> IntoResponse for Sensitive<T> {
    fn into_response(self) -> Response {
        let mut r = (self.status, axum::Json(self.body)).into_response();
        let h = r.headers_mut();
        h.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        h.insert(PRAGMA, HeaderValue::from_static("no-cache"));
        if let Some(location) = self.location {
            match HeaderValue::try_from(location) {
                Ok(v) => {
                    h.insert(LOCATION, v);
                }
                Err(e) => return ApiError::Header(e).into_response(),
            }
        }
        r
    }
}

/// The credentials of an `Authorization` header value when its scheme is
/// `Bearer`, compared case-insensitively (RFC 9110 §11.1), separated by
/// one or more spaces.
pub(crate) fn bearer_credentials(value: &str) -> Option<&str> {
    let (scheme, rest) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let credentials = rest.trim_matches(' ');
    (!credentials.is_empty()).then_some(credentials)
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
            .and_then(bearer_credentials)
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

/// The client's address: the TCP peer, or — when the peer is one of
/// `forwarded.trusted_proxies` — the right-most `X-Forwarded-For` entry
/// (see [`crate::forwarded`]). `None` when not served over a socket.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub Option<std::net::IpAddr>);

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &AppState,
    ) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr(
            parts
                .extensions
                .get::<ConnectInfo<SocketAddr>>()
                .map(|c| state.trusted_proxies.client_ip(c.0.ip(), &parts.headers)),
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

/// `?wait=true|false` of the calls that revoke or supersede (ADR-0022):
/// whether to wait for the gateways before answering (default true).
#[derive(Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct WaitQuery {
    wait: Option<String>,
}

impl WaitQuery {
    /// The `wait` parameter, or 422 `invalid_request` for anything but
    /// `true` / `false` (or another parameter).
    pub(crate) fn wait(
        q: Result<axum::extract::Query<WaitQuery>, QueryRejection>,
    ) -> Result<bool, ApiError> {
        match q.map(|q| q.0.wait) {
            Ok(None) => Ok(true),
            Ok(Some(w)) if w == "true" => Ok(true),
            Ok(Some(w)) if w == "false" => Ok(false),
            _ => Err(ApiError::invalid(
                "the only query parameter is wait=true|false",
            )),
        }
    }
}

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
