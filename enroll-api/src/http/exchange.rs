//! The token + CSR exchange: the one unauthenticated write.
//!
//! Order of checks: rate limit by source address; body shape; token shape;
//! token look-up by keyed hash (the pre-tenant narrow path); rate limit by
//! token id; token state; CSR policy and proof of possession; then the leaf
//! is signed outside any transaction, and one transaction consumes a use and
//! writes agent, certificate and event. If the consume loses (a concurrent
//! exchange took the last use), the signed leaf is dropped unseen.
//!
//! Every token failure — unknown, expired, used up, revoked — is the same
//! 401 `invalid_token`; the tenant's audit (outbox) records which.

use axum::extract::State;
use axum::routing::post;
use axum::Router;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use oneprotect_identity::events::{Actor, EnrollmentFailure, Event, Payload};
use oneprotect_identity::problem;
use oneprotect_identity::profile::{rotate_after, NOT_BEFORE_CUSHION};
use oneprotect_identity::{
    AgentId, AgentStatus, CertFingerprint, SerialNumber, TenantId, TokenId, TokenSecret,
};

use super::{ApiError, ApiJson, AppState, ClientAddr, Sensitive};
use crate::ca::{check_csr, CsrError, IssuedLeaf};
use crate::secrets::TOKEN_PREFIX;
use crate::store::{
    AgentRecord, EnrollOutcome, Enrollment, NewCertificate, Store, TokenRefusal, TokenStatus,
};
use crate::text;

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
        let rotate_after = OffsetDateTime::from_unix_timestamp(rotate)
            .map_err(|e| ApiError::Internal(e.to_string()))?;
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

fn csr_failure(e: &CsrError) -> EnrollmentFailure {
    match e {
        CsrError::Malformed => EnrollmentFailure::CsrInvalid,
        CsrError::SignatureInvalid => EnrollmentFailure::CsrSignatureInvalid,
        CsrError::UnsupportedKey | CsrError::WeakKey(_) => EnrollmentFailure::KeyRejected,
    }
}

async fn record_failure(
    state: &AppState,
    tenant: TenantId,
    token_id: TokenId,
    reason: EnrollmentFailure,
    now: OffsetDateTime,
) {
    let event = Event::new(
        tenant,
        Actor::EnrollmentToken(token_id),
        now,
        Payload::EnrollmentFailed {
            token_id,
            reason_code: reason,
        },
    );
    // The answer to the agent does not depend on the audit write.
    if let Err(e) = state.store.create_event(&event).await {
        tracing::warn!(error = %e, %tenant, %token_id, "could not record failed enrollment");
    }
}

fn refusal_failure(r: TokenRefusal) -> Option<EnrollmentFailure> {
    match r {
        TokenRefusal::Unknown => None,
        TokenRefusal::Expired => Some(EnrollmentFailure::TokenExpired),
        TokenRefusal::UsedUp => Some(EnrollmentFailure::TokenUsedUp),
        TokenRefusal::Revoked => Some(EnrollmentFailure::TokenRevoked),
    }
}

async fn exchange(
    State(state): State<AppState>,
    ClientAddr(client): ClientAddr,
    ApiJson(req): ApiJson<ExchangeRequest>,
) -> Result<Sensitive<EnrollmentResult>, ApiError> {
    let started = std::time::Instant::now();
    // The client's address: behind a trusted gateway the address it
    // forwarded, never a header from anyone else (crate::forwarded).
    if let Some(client) = client {
        state
            .per_address
            .check(&client.to_string(), started)
            .map_err(|wait| {
                tracing::info!(%client, "exchange refused: rate limited by address");
                ApiError::RateLimited(wait)
            })?;
    }
    text::check("agent.hostname", &req.agent.hostname, 1, 253)?;
    text::check("agent.os", &req.agent.os, 1, 64)?;
    text::check("agent.agent_version", &req.agent.agent_version, 1, 64)?;
    if req.csr_pem.len() > crate::ca::MAX_CSR_PEM_LEN {
        return Err(ApiError::new(problem::INVALID_CSR));
    }

    let secret = req.token.expose_secret();
    if !crate::secrets::well_formed(secret, TOKEN_PREFIX) {
        tracing::info!("exchange refused: malformed token");
        return Err(ApiError::new(problem::INVALID_TOKEN));
    }
    let token_hash = state.pepper.hash(secret);
    let Some((token_id, tenant)) = state.store.fetch_token_ref_by_hash(&token_hash).await? else {
        tracing::info!("exchange refused: unknown token");
        return Err(ApiError::new(problem::INVALID_TOKEN));
    };
    state
        .per_token
        .check(&token_id.to_string(), started)
        .map_err(ApiError::RateLimited)?;

    let now = state.clock.now();
    // A pre-check for a precise audit reason and to spare the CA work; the
    // conditional update below is what decides.
    let token = state.store.fetch_token(tenant, token_id).await?;
    let status = token.as_ref().map(|t| t.status(now));
    if status != Some(TokenStatus::Active) {
        let refusal = match status {
            Some(TokenStatus::Expired) => TokenRefusal::Expired,
            Some(TokenStatus::UsedUp) => TokenRefusal::UsedUp,
            Some(TokenStatus::Revoked) => TokenRefusal::Revoked,
            _ => TokenRefusal::Unknown,
        };
        if let Some(reason) = refusal_failure(refusal) {
            record_failure(&state, tenant, token_id, reason, now).await;
        }
        tracing::info!(%tenant, %token_id, ?refusal, "exchange refused: token not usable");
        return Err(ApiError::new(problem::INVALID_TOKEN));
    }

    let csr = match check_csr(&req.csr_pem) {
        Ok(csr) => csr,
        Err(e) => {
            record_failure(&state, tenant, token_id, csr_failure(&e), now).await;
            tracing::info!(%tenant, %token_id, error = %e, "exchange refused: CSR");
            return Err(csr_problem(&e));
        }
    };

    let lifetime = state
        .store
        .fetch_tenant(tenant)
        .await?
        .map(|t| std::time::Duration::from_secs(t.leaf_lifetime_secs.max(60).unsigned_abs()))
        .ok_or_else(|| ApiError::Internal(format!("tenant {tenant} of a token is missing")))?;
    let agent_id = AgentId::random();
    let leaf = state
        .ca
        .issue_leaf(tenant, agent_id, &csr, lifetime)
        .map_err(|e| ApiError::Internal(e.to_string()))?;

    let agent = AgentRecord {
        id: agent_id,
        tenant_id: tenant,
        spiffe_id: leaf.uri.to_string(),
        status: AgentStatus::Active,
        hostname: req.agent.hostname.clone(),
        os: req.agent.os.clone(),
        agent_version: req.agent.agent_version.clone(),
        token_id,
        enrolled_at: now,
        current_serial: leaf.serial,
        certificate_not_after: leaf.not_after,
        revoked_at: None,
        revocation_reason: None,
        previous_serial: None,
        previous_valid_until: None,
    };
    let event = Event::new(
        tenant,
        Actor::EnrollmentToken(token_id),
        now,
        Payload::Enrolled {
            agent_id,
            token_id,
            spiffe_id: leaf.uri.clone(),
            serial: leaf.serial,
            not_after: leaf.not_after,
            hostname: agent.hostname.clone(),
            os: agent.os.clone(),
            agent_version: agent.agent_version.clone(),
        },
    );
    let enrollment = Enrollment {
        token_id,
        token_hash,
        agent,
        certificate: NewCertificate {
            serial: leaf.serial,
            fingerprint: CertFingerprint::of_der(&leaf.cert_der).to_string(),
            not_before: leaf.not_before,
            not_after: leaf.not_after,
            cert_pem: leaf.cert_pem.clone(),
        },
        event,
        now,
    };
    match state.store.enroll(&enrollment).await? {
        EnrollOutcome::Enrolled => {}
        EnrollOutcome::Refused(r) => {
            if let Some(reason) = refusal_failure(r) {
                record_failure(&state, tenant, token_id, reason, now).await;
            }
            tracing::info!(%tenant, %token_id, refusal = ?r, "exchange refused: token consumed concurrently");
            return Err(ApiError::new(problem::INVALID_TOKEN));
        }
    }
    tracing::info!(%tenant, %token_id, agent = %agent_id, serial = %leaf.serial, "agent enrolled");
    Ok(Sensitive::created(
        EnrollmentResult::new(&state, tenant, agent_id, leaf)?,
        None,
    ))
}
