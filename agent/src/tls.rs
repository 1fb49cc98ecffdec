//! rustls client configurations: server-only (enrollment) and mutual TLS
//! (everything through the gateway). Always the ring provider, TLS 1.2+.

use std::sync::Arc;

use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use crate::AgentError;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Parses every certificate in a PEM bundle. Fails on an empty bundle.
pub fn certs_from_pem(pem: &[u8]) -> Result<Vec<CertificateDer<'static>>, AgentError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut &pem[..])
        .collect::<Result<_, _>>()
        .map_err(|e| AgentError::BadPem {
            what: "certificate PEM",
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(AgentError::BadPem {
            what: "certificate PEM",
            reason: "no certificate found".into(),
        });
    }
    Ok(certs)
}

/// Parses the first private key in a PEM document.
pub fn key_from_pem(pem: &[u8]) -> Result<PrivateKeyDer<'static>, AgentError> {
    rustls_pemfile::private_key(&mut &pem[..])
        .map_err(|e| AgentError::BadPem {
            what: "private key PEM",
            reason: e.to_string(),
        })?
        .ok_or(AgentError::BadPem {
            what: "private key PEM",
            reason: "no private key found".into(),
        })
}

/// A root store of every certificate in a PEM bundle.
pub fn roots_from_pem(pem: &[u8]) -> Result<RootCertStore, AgentError> {
    let mut roots = RootCertStore::empty();
    for cert in certs_from_pem(pem)? {
        roots.add(cert).map_err(|e| AgentError::BadPem {
            what: "trust anchor",
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// A client configuration that verifies the server against `roots` and
/// presents no client certificate (used for enrollment).
pub fn server_only(roots: RootCertStore) -> Result<Arc<ClientConfig>, AgentError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}

/// A client configuration that verifies the server against `roots` and
/// presents `chain` (leaf first, then the tenant CA) with `key`.
pub fn mutual(
    roots: RootCertStore,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, AgentError> {
    let mut cfg = ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Arc::new(cfg))
}
