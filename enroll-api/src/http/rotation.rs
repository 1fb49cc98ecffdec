//! The agent-authenticated endpoints: certificate rotation and its
//! confirmation (two-phase, ADR-0010), over
//! [`crate::authority::rotation`], which holds the workflow.
//!
//! They sit behind the gateway and trust only its signed identity assertion
//! (`x-oneprotect-identity-assertion`, verified with the configured gateway
//! keys, issuer and audience): never a client-sent identity header, never the
//! network path. The asserted agent must be the path's agent. A superseded
//! certificate is 403 `certificate_superseded` (and recorded).

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};

use oneprotect_identity::headers::IDENTITY_ASSERTION;
use oneprotect_identity::problem;
use oneprotect_identity::{AgentId, SerialNumber, TenantId};

use super::exchange::{csr_problem, EnrollmentResult};
use super::{path_id, ApiError, ApiJson, AppState, Sensitive};
use crate::authority::rotation::{self as workflow, Presenter, RotationError};
use crate::store::RotationRefusal;

pub(crate) fn router() -> Router<AppState> {
    Router::new()
        .route("/api/v1/agents/{agent_id}/certificate/rotate", post(rotate))
        .route(
            "/api/v1/agents/{agent_id}/certificate/confirm",
            post(confirm),
        )
}

/// An agent authenticated by a verified gateway assertion.
#[derive(Debug, Clone, Copy)]
pub(crate) struct AgentAuth {
    /// The agent's tenant.
    pub(crate) tenant: TenantId,
    /// The agent.
    pub(crate) agent: AgentId,
    /// The serial of the certificate it presented to the gateway.
    pub(crate) serial: SerialNumber,
}

impl FromRequestParts<AppState> for AgentAuth {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let mut values = parts.headers.get_all(IDENTITY_ASSERTION).iter();
        let (Some(value), None) = (values.next(), values.next()) else {
            // None, or several (never what the gateway sends).
            return Err(ApiError::new(problem::IDENTITY_REQUIRED));
        };
        let token = value
            .to_str()
            .map_err(|_| ApiError::new(problem::IDENTITY_REQUIRED))?;
        let now = state.clock.now().unix_timestamp();
        match state.assertions.verify(token, now) {
            Ok(v) => Ok(AgentAuth {
                tenant: v.claims.tenant_id,
                agent: v.claims.agent_id,
                serial: v.claims.serial,
            }),
            Err(e) => {
                // The reason goes to the log and a metric, not to the caller.
                tracing::info!(reason = %e, "agent endpoint: identity assertion refused");
                state.metrics.assertion_refused(&e);
                Err(ApiError::new(problem::IDENTITY_REQUIRED))
            }
        }
    }
}

/// `RotateRequest`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RotateRequest {
    csr_pem: String,
}

/// `CertificateConfirmation`.
#[derive(Debug, Serialize)]
pub(crate) struct Confirmation {
    agent_id: AgentId,
    serial: SerialNumber,
    superseded_serial: Option<SerialNumber>,
    /// What the gateways confirmed about the supersession (none when
    /// nothing was superseded).
    enforcement: Option<crate::enforce::Enforcement>,
}

/// The asserted agent must be the path's; anything else is 403.
fn check_path(auth: &AgentAuth, path: &str) -> Result<(), ApiError> {
    let agent: AgentId = path_id(path)?;
    if agent != auth.agent {
        return Err(ApiError::detail(
            problem::IDENTITY_MISMATCH,
            "the certificate belongs to another agent",
        ));
    }
    Ok(())
}

impl AgentAuth {
    fn presenter(&self) -> Presenter {
        Presenter {
            tenant: self.tenant,
            agent: self.agent,
            serial: self.serial,
        }
    }
}

fn refusal_problem(refusal: RotationRefusal) -> ApiError {
    match refusal {
        RotationRefusal::UnknownAgent => ApiError::new(problem::NOT_FOUND),
        RotationRefusal::AgentRevoked => ApiError::new(problem::AGENT_REVOKED),
        RotationRefusal::NotThisAgents => ApiError::detail(
            problem::IDENTITY_MISMATCH,
            "the certificate is not one of this agent's",
        ),
        RotationRefusal::CertificateRevoked => ApiError::new(problem::CERTIFICATE_REVOKED),
        RotationRefusal::PreviousPresented => ApiError::detail(
            problem::CONFLICT,
            "confirm with the certificate issued by the rotation, not the previous one",
        ),
        RotationRefusal::CertificateSuperseded { .. } => {
            ApiError::new(problem::CERTIFICATE_SUPERSEDED)
        }
    }
}

impl From<RotationError> for ApiError {
    fn from(e: RotationError) -> Self {
        match e {
            RotationError::CsrTooLarge => ApiError::new(problem::INVALID_CSR),
            RotationError::Csr(e) => csr_problem(&e),
            RotationError::UnknownAgent => ApiError::new(problem::NOT_FOUND),
            RotationError::Refused(r) => refusal_problem(r),
            RotationError::Store(e) => ApiError::Store(e),
            e @ RotationError::Issue(_) => ApiError::Rotation(e),
        }
    }
}

async fn rotate(
    State(state): State<AppState>,
    auth: AgentAuth,
    Path(agent): Path<String>,
    ApiJson(req): ApiJson<RotateRequest>,
) -> Result<Sensitive<EnrollmentResult>, ApiError> {
    check_path(&auth, &agent)?;
    let leaf = workflow::rotate(&state, &auth.presenter(), &req.csr_pem).await?;
    Ok(Sensitive::ok(EnrollmentResult::new(
        &state,
        auth.tenant,
        auth.agent,
        leaf,
    )?))
}

async fn confirm(
    State(state): State<AppState>,
    auth: AgentAuth,
    Path(agent): Path<String>,
    q: Result<Query<super::WaitQuery>, QueryRejection>,
) -> Result<Sensitive<Confirmation>, ApiError> {
    check_path(&auth, &agent)?;
    let wait = super::WaitQuery::wait(q)?;
    let superseded = workflow::confirm(&state, &auth.presenter()).await?;
    let enforcement = match superseded {
        Some(_) => Some(state.enforce(auth.tenant, auth.agent, wait).await),
        None => None,
    };
    Ok(Sensitive::ok(Confirmation {
        agent_id: auth.agent,
        serial: auth.serial,
        superseded_serial: superseded,
        enforcement,
    }))
}
