//! Certificate rotation and its confirmation (two-phase, ADR-0010), for an
//! agent the gateway's signed assertion authenticated.
//!
//! A certificate presented after it was superseded is refused and recorded
//! as `agent.certificate.reuse_detected` (once per certificate and attempt
//! window) with a metric: the gateway refuses superseded certificates
//! itself, so one reaching this service means a stale gateway cache at best
//! and a stolen key at worst. The agent is not revoked automatically; an
//! admin decides.

use oneprotect_identity::events::AgentOperation;
use oneprotect_identity::{AgentId, SerialNumber, TenantId};

use super::{leaf_lifetime, new_certificate};
use crate::ca::{check_csr, CaError, CsrError, IssuedLeaf};
use crate::http::Inner;
use crate::store::rotation::check_presented;
use crate::store::{
    ConfirmOutcome, RotateOutcome, Rotation, RotationRefusal, RotationState, Store, StoreError,
    SupersededUseRecord,
};

/// The agent and the certificate it presented, as the gateway asserted.
#[derive(Debug, Clone, Copy)]
pub struct Presenter {
    /// The agent's tenant.
    pub tenant: TenantId,
    /// The agent.
    pub agent: AgentId,
    /// The serial of the certificate it presented to the gateway.
    pub serial: SerialNumber,
}

/// Why a rotation or confirmation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum RotationError {
    /// The CSR is longer than [`crate::ca::MAX_CSR_PEM_LEN`].
    #[error("CSR too large")]
    CsrTooLarge,
    /// The CSR was refused.
    #[error("CSR refused")]
    Csr(#[source] CsrError),
    /// No such tenant or agent.
    #[error("unknown agent")]
    UnknownAgent,
    /// The store's rotation rules refused (a superseded certificate's use
    /// has been recorded).
    #[error("refused: {0:?}")]
    Refused(RotationRefusal),
    /// The CA could not sign the leaf.
    #[error("issuing the leaf failed")]
    Issue(#[source] CaError),
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A refusal as an error; a superseded certificate's use is also logged,
/// counted and recorded (its failure to record is logged, not answered).
async fn refused(
    state: &Inner,
    who: &Presenter,
    refusal: RotationRefusal,
    operation: AgentOperation,
) -> RotationError {
    if let RotationRefusal::CertificateSuperseded { .. } = refusal {
        tracing::warn!(
            tenant = %who.tenant, agent = %who.agent, serial = %who.serial,
            ?operation, "superseded certificate presented: possible key theft"
        );
        state.metrics.superseded_use(operation, 1);
        // One event per certificate and attempt window, whoever saw the use
        // first (a gateway's report or this endpoint).
        let record = SupersededUseRecord {
            tenant: who.tenant,
            agent: who.agent,
            serial: who.serial,
            operation,
            route: None,
            source_ip: None,
            seen_at: state.clock.now(),
        };
        if let Err(e) = state
            .store
            .record_superseded_use(&record, state.reuse_window)
            .await
        {
            tracing::error!(error = %e, agent = %who.agent, "could not record reuse_detected");
        }
    }
    RotationError::Refused(refusal)
}

/// Issues a new certificate for `csr_pem` and makes it current; the
/// presented one stays accepted as previous for `rotation.grace_secs` at
/// most (or until [`confirm`]).
pub async fn rotate(
    state: &Inner,
    who: &Presenter,
    csr_pem: &str,
) -> Result<IssuedLeaf, RotationError> {
    if csr_pem.len() > crate::ca::MAX_CSR_PEM_LEN {
        return Err(RotationError::CsrTooLarge);
    }
    let csr = check_csr(csr_pem).map_err(RotationError::Csr)?;
    let lifetime = state
        .store
        .fetch_tenant(who.tenant)
        .await?
        .map(|t| leaf_lifetime(&t))
        .ok_or(RotationError::UnknownAgent)?;
    // A pre-check spares the CA work for refusals; the transaction decides.
    let Some(current) = state.store.fetch_agent(who.tenant, who.agent).await? else {
        return Err(RotationError::UnknownAgent);
    };
    let presented = state
        .store
        .list_agent_certificates(who.tenant, who.agent)
        .await?
        .into_iter()
        .find(|c| c.serial == who.serial);
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
        return Err(refused(state, who, r, AgentOperation::Rotate).await);
    }
    let previous_not_after = presented.map_or(state.clock.now(), |c| c.not_after);
    let leaf = state
        .ca
        .issue_leaf(who.tenant, who.agent, &csr, lifetime)
        .map_err(RotationError::Issue)?;
    let now = state.clock.now();
    let rotation = Rotation {
        tenant: who.tenant,
        agent: who.agent,
        presented: who.serial,
        certificate: new_certificate(&leaf),
        previous_valid_until: (now + state.rotation_grace).min(previous_not_after),
        now,
    };
    let plan = match state.store.rotate(&rotation).await? {
        RotateOutcome::Rotated(plan) => plan,
        RotateOutcome::Refused(r) => {
            state.metrics.rotation("refused");
            return Err(refused(state, who, r, AgentOperation::Rotate).await);
        }
    };
    state.metrics.rotation("rotated");
    tracing::info!(
        tenant = %who.tenant, agent = %who.agent, presented = %who.serial,
        serial = %leaf.serial, superseded = plan.supersede.len(),
        previous_was_current = (current.current_serial == who.serial),
        "certificate rotated"
    );
    Ok(leaf)
}

/// Records that the agent authenticated with the presented certificate:
/// completes a pending rotation when it is the newest. The serial the
/// confirmation superseded, if any.
pub async fn confirm(
    state: &Inner,
    who: &Presenter,
) -> Result<Option<SerialNumber>, RotationError> {
    let now = state.clock.now();
    match state
        .store
        .confirm_certificate(who.tenant, who.agent, who.serial, now)
        .await?
    {
        ConfirmOutcome::Confirmed(s) => {
            state
                .metrics
                .confirmation(if s.is_some() { "completed" } else { "no_op" });
            Ok(s.map(|s| s.serial))
        }
        ConfirmOutcome::Refused(r) => {
            state.metrics.confirmation("refused");
            Err(refused(state, who, r, AgentOperation::Confirm).await)
        }
    }
}
