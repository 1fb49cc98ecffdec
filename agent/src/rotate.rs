//! Rotation: a new key and CSR, sent through the gateway with the current
//! certificate (the gateway turns it into the signed identity assertion the
//! enroll-api checks).

use oneprotect_identity::{AgentId, SerialNumber};
use serde::Serialize;

use crate::client::Endpoint;
use crate::enroll::{check_issued_for_key, new_key_and_csr, Enrolled, IssuedCertificate};
use crate::AgentError;

/// The confirmation path for `agent`.
pub fn confirm_path(agent: AgentId) -> String {
    format!("/api/v1/agents/{agent}/certificate/confirm")
}

/// The enroll-api's answer to a confirmation.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct Confirmation {
    /// The agent.
    pub agent_id: AgentId,
    /// The confirmed (newest) certificate.
    pub serial: SerialNumber,
    /// The certificate this confirmation superseded, if a rotation was pending.
    pub superseded_serial: Option<SerialNumber>,
}

/// Tells the enroll-api, through `gateway` presenting the *new* certificate,
/// that the agent uses it: the rotation's second phase. The previous
/// certificate is superseded at once instead of at the end of the grace
/// period.
pub async fn confirm(gateway: &Endpoint, agent: AgentId) -> Result<Confirmation, AgentError> {
    let resp = gateway
        .request(http::Method::POST, &confirm_path(agent), &[], None)
        .await?;
    resp.json()
}

/// The rotation path for `agent`.
pub fn rotate_path(agent: AgentId) -> String {
    format!("/api/v1/agents/{agent}/certificate/rotate")
}

#[derive(Serialize)]
struct RotateRequest<'a> {
    csr_pem: &'a str,
}

/// Rotates `agent`'s certificate through `gateway` (an mTLS endpoint
/// presenting the current certificate). Returns the new identity, not yet
/// stored.
pub async fn rotate(gateway: &Endpoint, agent: AgentId) -> Result<Enrolled, AgentError> {
    let (key, csr_pem) = new_key_and_csr()?;
    let resp = gateway
        .post_json(&rotate_path(agent), &RotateRequest { csr_pem: &csr_pem })
        .await?;
    let issued: IssuedCertificate = resp.json()?;
    if issued.agent_id != agent {
        return Err(AgentError::Protocol(format!(
            "rotation answered for agent {} instead of {agent}",
            issued.agent_id
        )));
    }
    check_issued_for_key(&issued, &key)?;
    Ok(Enrolled {
        key_pem: key.serialize_pem(),
        issued,
    })
}
