//! The rustls client certificate verifier: [`ChainValidator`] over the
//! swappable trust bundle, refusals counted and logged within a budget, the
//! verified identity parked for [`crate::tls::accept`].

use std::sync::Arc;
use std::time::Duration;

use oneprotect_identity::{AgentIdentity, CertFingerprint};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::metrics::Metrics;
use crate::tls::chain::{ChainValidator, VerifyError};

/// The rustls client certificate verifier: webpki path validation plus the
/// agent identity checks, over a swappable trust bundle.
#[derive(Debug)]
pub struct AgentCertVerifier {
    validator: Arc<ChainValidator>,
    mandatory: bool,
    verified: moka::sync::Cache<CertFingerprint, Arc<AgentIdentity>>,
    metrics: Metrics,
    log: crate::handshake::LogBudget,
}

impl AgentCertVerifier {
    /// A verifier; `mandatory` refuses clients without a certificate.
    pub fn new(validator: Arc<ChainValidator>, mandatory: bool, metrics: Metrics) -> Self {
        Self {
            validator,
            mandatory,
            // Holds an identity only from verification to the end of the
            // same handshake; the bound keeps a handshake flood harmless.
            verified: moka::sync::Cache::builder()
                .max_capacity(65_536)
                .time_to_live(Duration::from_secs(30))
                .build(),
            metrics,
            log: crate::handshake::LogBudget::default(),
        }
    }

    /// The chain validator (resumed sessions are re-validated with it).
    pub(crate) fn validator(&self) -> &ChainValidator {
        &self.validator
    }

    /// Takes the identity verified for the leaf with fingerprint `fp`.
    pub(crate) fn take_verified(&self, fp: &CertFingerprint) -> Option<Arc<AgentIdentity>> {
        self.verified.remove(fp)
    }

    /// Counts a refused chain and logs it within the log budget.
    pub(crate) fn record_failure(&self, e: &VerifyError) {
        self.metrics
            .handshake_failures
            .with_label_values(&[e.reason()])
            .inc();
        if let crate::handshake::Budget::Log { suppressed } =
            self.log.check(std::time::Instant::now())
        {
            if suppressed > 0 {
                tracing::warn!(
                    suppressed,
                    "client certificate refusals not logged in the last interval (all are \
                     counted in handshake_failures_total)"
                );
            }
            tracing::warn!(reason = e.reason(), error = %e, "client certificate refused");
        }
    }
}

impl ClientCertVerifier for AgentCertVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // The bundle is swappable, so no borrowed hint list; agents hold
        // exactly one certificate and send it regardless.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        match self.validator.validate(end_entity, intermediates, now) {
            Ok(id) => {
                let now_secs = i64::try_from(now.as_secs()).unwrap_or(i64::MAX);
                let left = id.not_after().saturating_sub(now_secs).max(0);
                self.metrics.client_cert_remaining.observe(left as f64);
                self.verified.insert(id.fingerprint(), Arc::new(id));
                Ok(ClientCertVerified::assertion())
            }
            Err(e) => {
                self.record_failure(&e);
                Err(e.to_rustls())
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, self.validator.algs())
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, self.validator.algs())
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.validator.algs().supported_schemes()
    }
}
