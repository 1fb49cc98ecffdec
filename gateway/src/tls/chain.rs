//! Client chain validation: webpki path validation against the current
//! trust bundle, then the agent identity of the leaf and the issuer webpki
//! verified (see [`crate::tls`]).

use std::sync::Arc;

use oneprotect_identity::{AgentIdentity, ChainError, TrustDomain};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, UnixTime};
use rustls::CertificateError;

use crate::tls::trust::TrustStore;

/// Why a client chain was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// Path validation failed (unknown issuer, expired, not yet valid, bad
    /// signature, wrong EKU...).
    #[error("certificate path invalid: {0}")]
    Path(webpki::Error),
    /// The chain is valid but does not carry a valid agent identity (e.g. a
    /// tenant CA minting another tenant's agent).
    #[error("certificate identity invalid: {0}")]
    Identity(ChainError),
    /// The identity's trust domain is not the configured one.
    #[error("certificate is in another trust domain")]
    TrustDomain,
}

/// Every label [`VerifyError::reason`] returns (the metrics export each at 0
/// from the start).
pub const VERIFY_REASONS: [&str; 9] = [
    "expired",
    "not_yet_valid",
    "unknown_issuer",
    "bad_signature",
    "bad_eku",
    "invalid_path",
    "tenant_mismatch",
    "invalid_identity",
    "trust_domain",
];

impl VerifyError {
    /// A short stable label for metrics (one of [`VERIFY_REASONS`]).
    pub fn reason(&self) -> &'static str {
        match self {
            VerifyError::Path(webpki::Error::CertExpired { .. }) => "expired",
            VerifyError::Path(webpki::Error::CertNotValidYet { .. }) => "not_yet_valid",
            VerifyError::Path(webpki::Error::UnknownIssuer) => "unknown_issuer",
            VerifyError::Path(webpki::Error::InvalidSignatureForPublicKey) => "bad_signature",
            VerifyError::Path(webpki::Error::RequiredEkuNotFoundContext(_)) => "bad_eku",
            VerifyError::Path(_) => "invalid_path",
            VerifyError::Identity(ChainError::TenantMismatch) => "tenant_mismatch",
            VerifyError::Identity(_) => "invalid_identity",
            VerifyError::TrustDomain => "trust_domain",
        }
    }

    /// The rustls error the handshake fails with.
    pub(crate) fn to_rustls(&self) -> rustls::Error {
        let ce = match self {
            VerifyError::Path(webpki::Error::CertExpired { .. }) => CertificateError::Expired,
            VerifyError::Path(webpki::Error::CertNotValidYet { .. }) => {
                CertificateError::NotValidYet
            }
            VerifyError::Path(webpki::Error::UnknownIssuer) => CertificateError::UnknownIssuer,
            VerifyError::Path(webpki::Error::InvalidSignatureForPublicKey) => {
                CertificateError::BadSignature
            }
            VerifyError::Path(webpki::Error::BadDer) => CertificateError::BadEncoding,
            _ => CertificateError::ApplicationVerificationFailure,
        };
        rustls::Error::InvalidCertificate(ce)
    }
}

/// Validates a client chain and extracts its agent identity.
#[derive(Debug)]
pub struct ChainValidator {
    store: Arc<TrustStore>,
    trust_domain: Option<TrustDomain>,
    algs: WebPkiSupportedAlgorithms,
}

impl ChainValidator {
    /// A validator over `store`, optionally pinned to one trust domain.
    pub fn new(store: Arc<TrustStore>, trust_domain: Option<TrustDomain>) -> Self {
        Self {
            store,
            trust_domain,
            algs: rustls::crypto::ring::default_provider().signature_verification_algorithms,
        }
    }

    /// The trust store.
    pub fn store(&self) -> &Arc<TrustStore> {
        &self.store
    }

    /// The signature algorithms chains and handshakes are checked with.
    pub(crate) fn algs(&self) -> &WebPkiSupportedAlgorithms {
        &self.algs
    }

    /// Validates `end_entity` with `intermediates` at `now` and returns the
    /// agent identity (see the module documentation).
    pub fn validate(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<AgentIdentity, VerifyError> {
        let bundle = self.store.current();
        let ee = webpki::EndEntityCert::try_from(end_entity).map_err(VerifyError::Path)?;
        let found: std::cell::RefCell<Option<Result<AgentIdentity, ChainError>>> =
            std::cell::RefCell::new(None);
        let hook = |path: &webpki::VerifiedPath<'_>| -> Result<(), webpki::Error> {
            let issuer = match path.intermediate_certificates().next() {
                Some(c) => c.der(),
                None => match bundle.der_of(path.anchor()) {
                    Some(d) => d.clone(),
                    None => return Err(webpki::Error::UnknownIssuer),
                },
            };
            let res = AgentIdentity::from_chain(end_entity.as_ref(), issuer.as_ref());
            let ok = res.is_ok();
            *found.borrow_mut() = Some(res);
            if ok {
                Ok(())
            } else {
                // Refuse this path; webpki tries any other path.
                Err(webpki::Error::UnknownIssuer)
            }
        };
        let verified = ee.verify_for_usage(
            self.algs.all,
            bundle.anchors(),
            intermediates,
            now,
            webpki::KeyUsage::client_auth(),
            None,
            Some(&hook),
        );
        let found = found.into_inner();
        match (verified, found) {
            (Ok(_), Some(Ok(id))) => {
                if let Some(td) = &self.trust_domain {
                    if id.trust_domain() != td {
                        return Err(VerifyError::TrustDomain);
                    }
                }
                Ok(id)
            }
            (Ok(_), _) => Err(VerifyError::Path(webpki::Error::UnknownIssuer)),
            (Err(_), Some(Err(e))) => Err(VerifyError::Identity(e)),
            (Err(e), _) => Err(VerifyError::Path(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_testpki::{LeafSpec, TestPki};

    fn validator(pki: &TestPki) -> (ChainValidator, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bundle.pem");
        std::fs::write(&path, pki.root_pem()).unwrap();
        let store = Arc::new(TrustStore::load(&path).unwrap());
        (ChainValidator::new(store, None), dir)
    }

    fn der(b: &[u8]) -> CertificateDer<'static> {
        CertificateDer::from(b.to_vec())
    }

    #[test]
    fn accepts_a_good_chain_and_extracts_identity() {
        let pki = TestPki::new("oneprotect.test");
        let tenant = uuid::Uuid::new_v4().to_string();
        let agent = uuid::Uuid::new_v4().to_string();
        let ca = pki.tenant_ca(&tenant);
        let leaf = ca.agent(&agent);
        let (v, _d) = validator(&pki);
        let id = v
            .validate(&der(&leaf.cert_der), &[der(&ca.cert_der)], UnixTime::now())
            .unwrap();
        assert_eq!(id.agent().to_string(), agent);
        assert_eq!(id.tenant().to_string(), tenant);
    }

    #[test]
    fn refuses_foreign_root_expired_and_tenant_mismatch() {
        let pki = TestPki::new("oneprotect.test");
        let (v, _d) = validator(&pki);
        let tenant = uuid::Uuid::new_v4().to_string();
        let ca = pki.tenant_ca(&tenant);
        let agent = uuid::Uuid::new_v4().to_string();

        let foreign = TestPki::new("foreign.test").tenant_ca(&tenant);
        let leaf = foreign.agent(&agent);
        let e = v
            .validate(
                &der(&leaf.cert_der),
                &[der(&foreign.cert_der)],
                UnixTime::now(),
            )
            .unwrap_err();
        assert_eq!(e.reason(), "unknown_issuer");

        let mut spec = LeafSpec::agent(&ca, &agent);
        spec.not_after = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
        spec.not_before = spec.not_after - time::Duration::hours(1);
        let leaf = ca.leaf(&spec);
        let e = v
            .validate(&der(&leaf.cert_der), &[der(&ca.cert_der)], UnixTime::now())
            .unwrap_err();
        assert_eq!(e.reason(), "expired");

        let mut spec = LeafSpec::agent(&ca, &agent);
        spec.uris = vec![format!(
            "spiffe://oneprotect.test/tenant/{}/agent/{agent}",
            uuid::Uuid::new_v4()
        )];
        let leaf = ca.leaf(&spec);
        let e = v
            .validate(&der(&leaf.cert_der), &[der(&ca.cert_der)], UnixTime::now())
            .unwrap_err();
        assert_eq!(e, VerifyError::Identity(ChainError::TenantMismatch));
    }

    #[test]
    fn a_forged_extra_intermediate_cannot_lend_its_tenant() {
        // Tenant A's CA mints a leaf for tenant B; the client adds a
        // self-made "CA" with A's subject but B's URI. The check must run on
        // the issuer webpki verified, so the forgery changes nothing.
        let pki = TestPki::new("oneprotect.test");
        let (v, _d) = validator(&pki);
        let tenant_a = uuid::Uuid::new_v4().to_string();
        let tenant_b = uuid::Uuid::new_v4().to_string();
        let ca_a = pki.tenant_ca(&tenant_a);
        let rogue = TestPki::new("oneprotect.test").tenant_ca_with_uri(
            &tenant_a,
            &format!("spiffe://oneprotect.test/tenant/{tenant_b}"),
        );
        let mut spec = LeafSpec::agent(&ca_a, &uuid::Uuid::new_v4().to_string());
        spec.uris = vec![format!(
            "spiffe://oneprotect.test/tenant/{tenant_b}/agent/{}",
            uuid::Uuid::new_v4()
        )];
        let leaf = ca_a.leaf(&spec);
        for order in [
            vec![der(&rogue.cert_der), der(&ca_a.cert_der)],
            vec![der(&ca_a.cert_der), der(&rogue.cert_der)],
        ] {
            assert!(v
                .validate(&der(&leaf.cert_der), &order, UnixTime::now())
                .is_err());
        }
    }
}
