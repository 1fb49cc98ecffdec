//! Enrollment: a fresh key, a CSR, and the token + CSR exchange.

use oneprotect_identity::{AgentId, SerialNumber, TenantId, TokenSecret};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use serde::{Deserialize, Serialize};

use crate::client::Endpoint;
use crate::AgentError;

/// The exchange endpoint.
pub const EXCHANGE_PATH: &str = "/api/v1/agent-enrollment/exchange";

/// What the agent reports about itself at enrollment. Informational only:
/// the service never derives identity from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentMetadata {
    /// The device's hostname.
    pub hostname: String,
    /// Operating system, e.g. `linux`.
    pub os: String,
    /// This agent's version.
    pub agent_version: String,
}

impl AgentMetadata {
    /// Metadata of the machine this runs on.
    pub fn this_host() -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_owned())
            .filter(|h| !h.is_empty())
            .or_else(|| std::env::var("HOSTNAME").ok())
            .unwrap_or_else(|| "unknown".into());
        Self {
            hostname,
            os: std::env::consts::OS.into(),
            agent_version: env!("CARGO_PKG_VERSION").into(),
        }
    }
}

/// The enroll-api's answer to an exchange or a rotation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IssuedCertificate {
    /// The agent's id.
    pub agent_id: AgentId,
    /// The agent's tenant.
    pub tenant_id: TenantId,
    /// The identity URI in the certificate.
    pub spiffe_id: String,
    /// The certificate's serial.
    pub serial: SerialNumber,
    /// The leaf certificate, PEM.
    pub certificate_pem: String,
    /// The issuing (tenant) CA, PEM.
    pub chain_pem: String,
    /// The platform root(s), PEM.
    pub trust_bundle_pem: String,
    /// NotBefore.
    #[serde(with = "time::serde::rfc3339")]
    pub not_before: time::OffsetDateTime,
    /// NotAfter.
    #[serde(with = "time::serde::rfc3339")]
    pub not_after: time::OffsetDateTime,
    /// When to rotate.
    #[serde(with = "time::serde::rfc3339")]
    pub rotate_after: time::OffsetDateTime,
}

/// A new identity: the locally generated key and the certificate issued for it.
pub struct Enrolled {
    /// The private key, PKCS#8 PEM. Never sent anywhere.
    pub key_pem: String,
    /// What the service issued.
    pub issued: IssuedCertificate,
}

impl std::fmt::Debug for Enrolled {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Enrolled")
            .field("key_pem", &"[redacted]")
            .field("issued", &self.issued)
            .finish()
    }
}

/// A freshly generated ECDSA P-256 key and a CSR for it (PEM). The CSR's
/// subject is empty: the service sets the identity.
pub fn new_key_and_csr() -> Result<(KeyPair, String), AgentError> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)
        .map_err(|e| AgentError::Key(e.to_string()))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|csr| csr.pem())
        .map_err(|e| AgentError::Key(e.to_string()))?;
    Ok((key, csr))
}

#[derive(Serialize)]
struct ExchangeRequest<'a> {
    token: &'a str,
    csr_pem: &'a str,
    agent: &'a AgentMetadata,
}

/// Generates a key, sends token + CSR to `server`'s exchange endpoint and
/// returns the new identity (not yet stored: see [`crate::state::StateDir`]).
pub async fn enroll(
    server: &Endpoint,
    token: &TokenSecret,
    metadata: &AgentMetadata,
) -> Result<Enrolled, AgentError> {
    let (key, csr_pem) = new_key_and_csr()?;
    let req = ExchangeRequest {
        token: token.expose_secret(),
        csr_pem: &csr_pem,
        agent: metadata,
    };
    let resp = server.post_json(EXCHANGE_PATH, &req).await?;
    let issued: IssuedCertificate = resp.json()?;
    check_issued_for_key(&issued, &key)?;
    Ok(Enrolled {
        key_pem: key.serialize_pem(),
        issued,
    })
}

/// Checks that the issued certificate carries our public key: a server that
/// answered with someone else's certificate must not be trusted.
pub(crate) fn check_issued_for_key(
    issued: &IssuedCertificate,
    key: &KeyPair,
) -> Result<(), AgentError> {
    use rcgen::PublicKeyData as _;
    let certs = crate::tls::certs_from_pem(issued.certificate_pem.as_bytes())?;
    let leaf = &certs[0];
    let ours = key.subject_public_key_info();
    // The SPKI appears verbatim inside the certificate's DER.
    if !leaf
        .as_ref()
        .windows(ours.len())
        .any(|w| w == ours.as_slice())
    {
        return Err(AgentError::Protocol(
            "issued certificate does not carry this agent's public key".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generates_a_p256_csr_with_no_subject() {
        let (_key, csr) = new_key_and_csr().unwrap();
        assert!(csr.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
        let parsed = rcgen::CertificateSigningRequestParams::from_pem(&csr).unwrap();
        assert!(parsed.params.subject_alt_names.is_empty());
    }
}
