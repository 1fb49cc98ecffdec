//! pingora's post-handshake callback: the verified chain becomes the
//! connection's [`ConnIdentity`] (see [`crate::tls`]).

use std::sync::Arc;

use async_trait::async_trait;
use oneprotect_identity::CertFingerprint;
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use rustls::pki_types::UnixTime;

use crate::conn::{ConnIdentity, IdentityContext};
use crate::tls::verifier::AgentCertVerifier;

/// pingora's post-handshake callback: turns the verified chain into the
/// connection's [`ConnIdentity`] (see the module documentation).
pub struct IdentityCallback {
    verifier: Arc<AgentCertVerifier>,
    ctx: Arc<IdentityContext>,
}

impl IdentityCallback {
    /// A callback reading identities verified by `verifier`.
    pub fn new(verifier: Arc<AgentCertVerifier>, ctx: Arc<IdentityContext>) -> Self {
        Self { verifier, ctx }
    }
}

#[async_trait]
impl TlsAccept for IdentityCallback {
    async fn handshake_complete_callback(
        &self,
        tls: &TlsRef,
    ) -> Option<Arc<dyn std::any::Any + Send + Sync>> {
        let chain = tls.peer_cert_chain_der()?;
        let (leaf, rest) = chain.split_first()?;
        let fp = CertFingerprint::of_der(leaf.as_ref());
        let id = match self.verifier.take_verified(&fp) {
            Some(id) => id,
            // A resumed session: the verifier did not run. Re-validate the
            // chain restored from the ticket against the current bundle.
            None => match self
                .verifier
                .validator()
                .validate(leaf, rest, UnixTime::now())
            {
                Ok(id) => Arc::new(id),
                Err(e) => {
                    self.verifier.record_failure(&e);
                    return None;
                }
            },
        };
        Some(Arc::new(ConnIdentity::new(id, &self.ctx)))
    }
}
