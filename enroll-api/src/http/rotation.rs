//! The agent-authenticated endpoints: certificate rotation and its
//! confirmation (two-phase, ADR-0010).
//!
//! They sit behind the gateway and trust only its signed identity assertion
//! (`x-oneprotect-identity-assertion`, verified with the configured gateway
//! keys, issuer and audience): never a client-sent identity header, never the
//! network path. The asserted agent must be the path's agent.
//!
//! A certificate presented after it was superseded is refused with 403
//! `certificate_superseded` and recorded as `agent.certificate.reuse_detected`
//! with a metric: the gateway refuses superseded certificates itself, so one
//! reaching this service means a stale gateway cache at best and a stolen key
//! at worst. The agent is not revoked automatically; an admin decides.

use axum::extract::{FromRequestParts, Path, State};
use axum::http::request::Parts;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use oneprotect_identity::events::AgentOperation;
use oneprotect_identity::headers::IDENTITY_ASSERTION;
use oneprotect_identity::problem;
use oneprotect_identity::{AgentId, CertFingerprint, SerialNumber, TenantId};

use super::exchange::{csr_problem, EnrollmentResult};
use super::{path_id, ApiError, ApiJson, AppState, Sensitive};
use crate::ca::check_csr;
use crate::store::rotation::check_presented;
use crate::store::{
    ConfirmOutcome, NewCertificate, RotateOutcome, Rotation, RotationRefusal, RotationState, Store,
    SupersededUseRecord,
};

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

/// Maps a refusal to its answer; a superseded certificate is also recorded.
async fn refused(
    state: &AppState,
    auth: &AgentAuth,
    refusal: RotationRefusal,
    operation: AgentOperation,
) -> ApiError {
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
            tracing::warn!(
                tenant = %auth.tenant, agent = %auth.agent, serial = %auth.serial,
                ?operation, "superseded certificate presented: possible key theft"
            );
            state.metrics.superseded_use(operation);
            // One event per certificate and attempt window, whoever saw the
            // use first (a gateway's report or this endpoint).
            let record = SupersededUseRecord {
                tenant: auth.tenant,
                agent: auth.agent,
                serial: auth.serial,
                operation,
                route: None,
                source_ip: None,
                seen_at: state.clock.now(),
            };
            match state
                .store
                .record_superseded_use(&record, state.reuse_window)
                .await
            {
                Ok(_) => {}
                Err(e) => {
                    tracing::error!(error = %e, agent = %auth.agent, "could not record reuse_detected");
                }
            }
            ApiError::new(problem::CERTIFICATE_SUPERSEDED)
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
    if req.csr_pem.len() > crate::ca::MAX_CSR_PEM_LEN {
        return Err(ApiError::new(problem::INVALID_CSR));
    }
    let csr = check_csr(&req.csr_pem).map_err(|e| csr_problem(&e))?;
    let lifetime = state
        .store
        .fetch_tenant(auth.tenant)
        .await?
        .map(|t| std::time::Duration::from_secs(t.leaf_lifetime_secs.max(60).unsigned_abs()))
        .ok_or(ApiError::new(problem::NOT_FOUND))?;
    // A pre-check spares the CA work for refusals; the transaction decides.
    let Some(current) = state.store.fetch_agent(auth.tenant, auth.agent).await? else {
        return Err(ApiError::new(problem::NOT_FOUND));
    };
    let presented = state
        .store
        .list_agent_certificates(auth.tenant, auth.agent)
        .await?
        .into_iter()
        .find(|c| c.serial == auth.serial);
    // The planner's own refusal rules on what was just read; the
    // transaction decides again under the row lock.
    let pre = RotationState {
        status: current.status,
        current: current.current_serial,
        previous: current.previous_serial,
        previous_valid_until: current.previous_valid_until,
        presented: presented.as_ref().map(|c| c.status),
    };
    if let Err(r) = check_presented(&pre) {
        state.metrics.rotation("refused");
        return Err(refused(&state, &auth, r, AgentOperation::Rotate).await);
    }
    let previous_not_after = presented.map_or(state.clock.now(), |c| c.not_after);
    let leaf = state
        .ca
        .issue_leaf(auth.tenant, auth.agent, &csr, lifetime)
        .map_err(|e| ApiError::Internal(e.to_string()))?;
    let now = state.clock.now();
    let rotation = Rotation {
        tenant: auth.tenant,
        agent: auth.agent,
        presented: auth.serial,
        certificate: NewCertificate {
            serial: leaf.serial,
            fingerprint: CertFingerprint::of_der(&leaf.cert_der).to_string(),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            cert_pem: leaf.cert_pem.clone(),
        },
        previous_valid_until: (now + state.rotation_grace).min(previous_not_after),
        now,
    };
    let plan = match state.store.rotate(&rotation).await? {
        RotateOutcome::Rotated(plan) => plan,
        RotateOutcome::Refused(r) => {
            state.metrics.rotation("refused");
            return Err(refused(&state, &auth, r, AgentOperation::Rotate).await);
        }
    };
    state.metrics.rotation("rotated");
    tracing::info!(
        tenant = %auth.tenant, agent = %auth.agent, presented = %auth.serial,
        serial = %leaf.serial, superseded = plan.supersede.len(),
        previous_was_current = (current.current_serial == auth.serial),
        "certificate rotated"
    );
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
) -> Result<Sensitive<Confirmation>, ApiError> {
    check_path(&auth, &agent)?;
    let now: OffsetDateTime = state.clock.now();
    match state
        .store
        .confirm_certificate(auth.tenant, auth.agent, auth.serial, now)
        .await?
    {
        ConfirmOutcome::Confirmed(s) => {
            state
                .metrics
                .confirmation(if s.is_some() { "completed" } else { "no_op" });
            Ok(Sensitive::ok(Confirmation {
                agent_id: auth.agent,
                serial: auth.serial,
                superseded_serial: s.map(|s| s.serial),
            }))
        }
        ConfirmOutcome::Refused(r) => {
            state.metrics.confirmation("refused");
            Err(refused(&state, &auth, r, AgentOperation::Confirm).await)
        }
    }
}
