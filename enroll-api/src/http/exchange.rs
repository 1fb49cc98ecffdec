//! `POST /api/v1/agent-enrollment/exchange`: the request and answer types
//! over [`crate::authority::exchange`], which holds the workflow.
//!
//! Every token failure — unknown, expired, used up, revoked — is the same
//! 401 `invalid_token`; the tenant's audit (outbox) records which.

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use oneprotect_identity::problem;
use oneprotect_identity::profile::{rotate_after, NOT_BEFORE_CUSHION};
use oneprotect_identity::{AgentId, SerialNumber, TenantId, TokenSecret};

use super::{ApiError, ApiJson, AppState, ClientAddr, Sensitive};
use crate::authority::exchange::{self as workflow, Enrolled, ExchangeError};
use crate::ca::{CsrError, IssuedLeaf};

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/api/v1/agent-enrollment/exchange", post(exchange))
}

/// `ExchangeRequest`. The token is a redacting newtype: a `Debug` of this
/// struct cannot leak it. Unknown fields, here and in `agent`, are refused
/// before the token is looked at.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ExchangeRequest {
    token: TokenSecret,
    csr_pem: String,
    agent: AgentInfo,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AgentInfo {
    hostname: String,
    os: String,
    agent_version: String,
}

/// `EnrollmentResult`.
#[derive(Debug, Serialize)]
pub(super) struct EnrollmentResult {
    agent_id: AgentId,
    tenant_id: TenantId,
    spiffe_id: String,
    serial: SerialNumber,
    certificate_pem: String,
    chain_pem: String,
    trust_bundle_pem: String,
    #[serde(with = "time::serde::rfc3339")]
    not_before: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    not_after: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    rotate_after: OffsetDateTime,
}

impl EnrollmentResult {
    /// The answer for a freshly issued `leaf` (exchange and rotation).
    pub(super) fn new(
        state: &AppState,
        tenant: TenantId,
        agent_id: AgentId,
        leaf: IssuedLeaf,
    ) -> Result<Self, ApiError> {
        // Two thirds from issuance, not from the backdated NotBefore: with a
        // short lifetime the cushion would otherwise make rotation due at once.
        let issued = leaf.not_before + NOT_BEFORE_CUSHION;
        let rotate = rotate_after(issued.unix_timestamp(), leaf.not_after.unix_timestamp());
        let rotate_after = OffsetDateTime::from_unix_timestamp(rotate).map_err(ApiError::Time)?;
        Ok(Self {
            agent_id,
            tenant_id: tenant,
            spiffe_id: leaf.uri.to_string(),
            serial: leaf.serial,
            certificate_pem: leaf.cert_pem,
            chain_pem: leaf.chain_pem,
            trust_bundle_pem: state.ca.trust_bundle_pem().to_owned(),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            rotate_after,
        })
    }
}

pub(super) fn csr_problem(e: &CsrError) -> ApiError {
    match e {
        CsrError::Malformed => ApiError::new(problem::INVALID_CSR),
        CsrError::SignatureInvalid => ApiError::new(problem::CSR_SIGNATURE_INVALID),
        CsrError::UnsupportedKey => ApiError::detail(
            problem::UNSUPPORTED_KEY,
            "accepted: ECDSA P-256/P-384, Ed25519, RSA 2048..8192 bits",
        ),
        CsrError::WeakKey(bits) => ApiError::detail(
            problem::WEAK_KEY,
            format!("RSA key of {bits} bits; at least 2048 required"),
        ),
    }
}

impl From<ExchangeError> for ApiError {
    fn from(e: ExchangeError) -> Self {
        match e {
            ExchangeError::RateLimited(wait) => ApiError::RateLimited(wait),
            ExchangeError::InvalidText(e) => e.into(),
            ExchangeError::CsrTooLarge => ApiError::new(problem::INVALID_CSR),
            ExchangeError::InvalidToken => ApiError::new(problem::INVALID_TOKEN),
            ExchangeError::Csr(e) => csr_problem(&e),
            ExchangeError::Store(e) => ApiError::Store(e),
            e @ (ExchangeError::TenantMissing(_) | ExchangeError::Issue(_)) => {
                ApiError::Exchange(e)
            }
        }
    }
}

async fn exchange(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<ExchangeRequest>,
) -> Result<Sensitive<EnrollmentResult>, ApiError> {
    let Enrolled {
        tenant,
        agent,
        leaf,
    } = workflow::exchange(
        &state,
        workflow::ExchangeRequest {
            token: &req.token,
            csr_pem: &req.csr_pem,
            hostname: &req.agent.hostname,
            os: &req.agent.os,
            agent_version: &req.agent.agent_version,
            client,
        },
    )
    .await?;
    Ok(Sensitive::created(
        EnrollmentResult::new(&state, tenant, agent, leaf)?,
        None,
    ))
}
