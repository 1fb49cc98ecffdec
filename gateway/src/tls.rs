//! mTLS termination: file checks, the swappable trust bundle, the client
//! certificate verifier and the post-handshake identity callback.
//!
//! # How a client certificate becomes an identity
//!
//! 1. [`AgentCertVerifier`] (a rustls `ClientCertVerifier`) validates the
//!    presented chain with rustls-webpki against the current
//!    [`TrustBundle`], with the clientAuth EKU, and — inside webpki's path
//!    hook, so on the *verified* path only — runs
//!    [`AgentIdentity::from_chain`] on the leaf and the CA that actually
//!    issued it. The tenant boundary is therefore enforced against the
//!    issuer whose signature was checked, never against an unverified
//!    intermediate the client added. (rustls' `WebPkiClientVerifier` does
//!    the same path validation but does not expose the verified path, which
//!    is why the gateway calls webpki itself; the TLS signature checks are
//!    rustls' own helpers.)
//! 2. The verified identity is parked in a short-lived map keyed by the
//!    leaf's SHA-256 fingerprint.
//! 3. [`IdentityCallback::handshake_complete_callback`] (pingora's
//!    `TlsAccept`) picks it up, builds the per-connection [`ConnIdentity`]
//!    (header values, Redis keys) once, and stores it in the connection's
//!    `SslDigest` extension; every request (every h2 stream) reads it from
//!    there. A resumed TLS 1.3 session skips the verifier: the callback then
//!    re-validates the chain restored from the ticket against the current
//!    bundle, so a reload also applies to resumptions.
//!
//! # Certificate-less clients
//!
//! The verifier allows unauthenticated clients by default
//! (`client_auth_mandatory() == false`) because the gateway fronts the
//! enrollment exchange, which new agents call without a certificate. Every
//! route except those configured with `require_identity = false` refuses a
//! request without a verified identity (401 `identity_required`). A client
//! that *does* present a certificate that fails verification is refused at
//! the handshake. `listener.require_client_cert = true` makes a certificate
//! mandatory at the handshake.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arc_swap::ArcSwap;
use async_trait::async_trait;
use oneprotect_identity::{AgentIdentity, CertFingerprint, ChainError, TrustDomain};
use pingora::listeners::TlsAccept;
use pingora::protocols::tls::TlsRef;
use rustls::client::danger::HandshakeSignatureValid;
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::{CertificateDer, TrustAnchor, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, SignatureScheme};

use crate::config::ConfigError;
use crate::conn::{ConnIdentity, IdentityContext};
use crate::metrics::Metrics;

fn file_err(what: &'static str, path: &Path, reason: impl Into<String>) -> ConfigError {
    ConfigError::File {
        what,
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

fn read_pem_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, ConfigError> {
    let bytes = std::fs::read(path).map_err(|e| file_err(what, path, e.to_string()))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(what, path, format!("not PEM: {e}")))?;
    if certs.is_empty() {
        return Err(file_err(what, path, "contains no CERTIFICATE block"));
    }
    Ok(certs)
}

/// Checks the server certificate chain and key files the way pingora's
/// `TlsSettings::build()` will load them, so a bad file is a clear error
/// instead of a panic.
pub fn check_server_files(cert: &Path, key: &Path) -> Result<(), ConfigError> {
    let certs = read_pem_certs("server certificate", cert)?;
    let key_bytes = std::fs::read(key).map_err(|e| file_err("server key", key, e.to_string()))?;
    let key_der = rustls_pemfile::private_key(&mut key_bytes.as_slice())
        .map_err(|e| file_err("server key", key, format!("not PEM: {e}")))?
        .ok_or_else(|| file_err("server key", key, "contains no private key block"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der)
        .map_err(|e| file_err("server key", key, format!("unsupported key: {e}")))?;
    let certified = rustls::sign::CertifiedKey::new(certs, signing);
    certified.keys_match().map_err(|e| {
        file_err(
            "server key",
            key,
            format!("does not match the certificate: {e}"),
        )
    })?;
    Ok(())
}

/// The trust anchors agent chains must lead to.
#[derive(Debug)]
pub struct TrustBundle {
    anchors: Vec<TrustAnchor<'static>>,
    ders: Vec<CertificateDer<'static>>,
}

impl TrustBundle {
    /// Builds a bundle from DER root certificates.
    pub fn from_ders(ders: Vec<CertificateDer<'static>>) -> Result<Self, webpki::Error> {
        let anchors = ders
            .iter()
            .map(|d| webpki::anchor_from_trusted_cert(d).map(|a| a.to_owned()))
            .collect::<Result<_, _>>()?;
        Ok(Self { anchors, ders })
    }

    /// Number of anchors.
    pub fn len(&self) -> usize {
        self.anchors.len()
    }

    /// Whether the bundle is empty (never true for a loaded bundle).
    pub fn is_empty(&self) -> bool {
        self.anchors.is_empty()
    }

    fn der_of(&self, anchor: &TrustAnchor<'_>) -> Option<&CertificateDer<'static>> {
        self.anchors
            .iter()
            .position(|a| std::ptr::eq(a, anchor))
            .map(|i| &self.ders[i])
    }
}

/// Reads a PEM trust bundle (one or more root certificates).
pub fn load_trust_bundle(path: &Path) -> Result<TrustBundle, ConfigError> {
    let ders = read_pem_certs("trust bundle", path)?;
    TrustBundle::from_ders(ders).map_err(|e| {
        file_err(
            "trust bundle",
            path,
            format!("not a usable trust anchor: {e}"),
        )
    })
}

/// The current trust bundle, swappable at run time without dropping
/// connections (new handshakes use the new bundle; established connections
/// keep their verified identity).
#[derive(Debug)]
pub struct TrustStore {
    path: PathBuf,
    current: ArcSwap<TrustBundle>,
    modified: std::sync::Mutex<Option<SystemTime>>,
}

impl TrustStore {
    /// Loads the bundle at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bundle = load_trust_bundle(path)?;
        Ok(Self {
            path: path.to_path_buf(),
            current: ArcSwap::from_pointee(bundle),
            modified: std::sync::Mutex::new(mtime(path)),
        })
    }

    /// The bundle in force.
    pub fn current(&self) -> Arc<TrustBundle> {
        self.current.load_full()
    }

    /// Re-reads the file and swaps the bundle in; on error the old bundle
    /// stays in force.
    pub fn reload(&self) -> Result<usize, ConfigError> {
        let bundle = load_trust_bundle(&self.path)?;
        let n = bundle.len();
        self.current.store(Arc::new(bundle));
        if let Ok(mut m) = self.modified.lock() {
            *m = mtime(&self.path);
        }
        Ok(n)
    }

    /// Reloads when the file's modification time changed since the last
    /// load. Returns `None` when nothing changed.
    pub fn reload_if_changed(&self) -> Option<Result<usize, ConfigError>> {
        let now = mtime(&self.path);
        let changed = self.modified.lock().map(|m| *m != now).unwrap_or(true);
        changed.then(|| self.reload())
    }
}

fn mtime(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

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

impl VerifyError {
    /// A short stable label for metrics.
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

    fn to_rustls(&self) -> rustls::Error {
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
            &bundle.anchors,
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

    /// Takes the identity verified for the leaf with fingerprint `fp`.
    fn take_verified(&self, fp: &CertFingerprint) -> Option<Arc<AgentIdentity>> {
        self.verified.remove(fp)
    }

    fn record_failure(&self, e: &VerifyError) {
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
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.validator.algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.validator.algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.validator.algs.supported_schemes()
    }
}

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
                .validator
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

/// One route's upstream TLS material, loaded and checked at start: the roots
/// that verify the upstreams' certificates and the client certificate the
/// gateway presents to them.
#[derive(Clone, Default)]
pub struct UpstreamTls {
    /// Roots for the upstreams' certificates (`None`: the platform's roots).
    pub ca: Option<Arc<pingora::protocols::tls::CaType>>,
    /// The gateway's client certificate chain and key (mutual TLS).
    pub client: Option<Arc<pingora::utils::tls::CertKey>>,
    /// Identifies the CA set in pingora's upstream connection pool. pingora's
    /// pool key covers the address, SNI and client certificate but not the
    /// CA list, so without this a connection verified against one route's
    /// private CA would be reused by a route that trusts only the platform's
    /// roots (or another CA). 0 without a CA file.
    pub pool_group: u64,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("ca", &self.ca.as_ref().map(|c| c.len()))
            .field("client_cert", &self.client.is_some())
            .field("pool_group", &self.pool_group)
            .finish()
    }
}

/// Loads a route's `tls_ca_file`, `tls_client_cert` and `tls_client_key`,
/// checking them the way pingora will use them (it panics on a certificate
/// it cannot parse or a key it cannot load, once per new upstream
/// connection), so a bad file is a clear error at start instead.
pub fn load_upstream_tls(
    ca_file: Option<&Path>,
    client_cert: Option<&Path>,
    client_key: Option<&Path>,
) -> Result<UpstreamTls, ConfigError> {
    let mut out = UpstreamTls::default();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let ders = read_pem_certs("upstream CA file", path)?;
        for d in &ders {
            roots
                .add(d.clone())
                .map_err(|e| file_err("upstream CA file", path, format!("not a CA: {e}")))?;
        }
        let wrapped: Vec<pingora::utils::tls::WrappedX509> = ders
            .into_iter()
            .map(|d| {
                pingora::utils::tls::WrappedX509::new(d.to_vec(), pingora::utils::tls::parse_x509)
            })
            .collect();
        out.ca = Some(Arc::from(wrapped));
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for d in &roots.roots {
            std::hash::Hash::hash(&d.subject.as_ref(), &mut h);
            std::hash::Hash::hash(&d.subject_public_key_info.as_ref(), &mut h);
        }
        // Never 0, the value of routes without a CA file.
        out.pool_group = std::hash::Hasher::finish(&h) | 1;
    }
    match (client_cert, client_key) {
        (None, None) => {}
        (Some(cert), Some(key)) => {
            let chain = read_pem_certs("upstream client certificate", cert)?;
            // Every block must parse (pingora parses each one and panics
            // on failure); webpki's parser is the stricter of the two.
            for c in &chain {
                webpki::EndEntityCert::try_from(c).map_err(|e| {
                    file_err(
                        "upstream client certificate",
                        cert,
                        format!("not a usable certificate: {e}"),
                    )
                })?;
            }
            let key_bytes = std::fs::read(key)
                .map_err(|e| file_err("upstream client key", key, e.to_string()))?;
            let key_der = rustls_pemfile::private_key(&mut key_bytes.as_slice())
                .map_err(|e| file_err("upstream client key", key, format!("not PEM: {e}")))?
                .ok_or_else(|| {
                    file_err("upstream client key", key, "contains no private key block")
                })?;
            // What pingora builds per upstream connection, built once here.
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let signing = provider
                .key_provider
                .load_private_key(key_der.clone_key())
                .map_err(|e| file_err("upstream client key", key, format!("unsupported: {e}")))?;
            rustls::sign::CertifiedKey::new(chain.clone(), signing)
                .keys_match()
                .map_err(|e| {
                    file_err(
                        "upstream client key",
                        key,
                        format!("does not match the certificate: {e}"),
                    )
                })?;
            rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .and_then(|b| {
                    b.with_root_certificates(roots)
                        .with_client_auth_cert(chain.clone(), key_der.clone_key())
                })
                .map_err(|e| file_err("upstream client certificate", cert, e.to_string()))?;
            out.client = Some(Arc::new(pingora::utils::tls::CertKey::new(
                chain.iter().map(|c| c.to_vec()).collect(),
                key_der.secret_der().to_vec(),
            )));
        }
        (Some(_), None) | (None, Some(_)) => {
            return Err(ConfigError::Invalid(
                "tls_client_cert and tls_client_key go together".into(),
            ))
        }
    }
    Ok(out)
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

    #[test]
    fn server_file_checks_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, "garbage").unwrap();
        std::fs::write(&key, "garbage").unwrap();
        let e = check_server_files(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let pki = TestPki::new("oneprotect.test");
        let ca = pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
        let a = ca.agent(&uuid::Uuid::new_v4().to_string());
        let b = ca.agent(&uuid::Uuid::new_v4().to_string());
        std::fs::write(&cert, &a.cert_pem).unwrap();
        std::fs::write(&key, &b.key_pem).unwrap();
        let e = check_server_files(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("does not match"), "{e}");
        std::fs::write(&key, &a.key_pem).unwrap();
        check_server_files(&cert, &key).unwrap();
    }

    #[test]
    fn upstream_tls_files_are_checked_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p
        };
        let pki = TestPki::new("oneprotect.test");
        let ca = pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
        let leaf = ca.agent(&uuid::Uuid::new_v4().to_string());
        let other = ca.agent(&uuid::Uuid::new_v4().to_string());
        let roots = w("roots.pem", &pki.root_pem());
        let chain = w("chain.pem", &format!("{}{}", leaf.cert_pem, ca.cert_pem));
        let key = w("leaf.key", &leaf.key_pem);
        let wrong_key = w("other.key", &other.key_pem);
        let garbage = w(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );

        let none = load_upstream_tls(None, None, None).unwrap();
        assert!(none.ca.is_none() && none.client.is_none());
        assert_eq!(none.pool_group, 0);
        let full = load_upstream_tls(Some(&roots), Some(&chain), Some(&key)).unwrap();
        assert_eq!(full.ca.as_ref().map(|c| c.len()), Some(1));
        // Another CA set, another pool group; the same set, the same group.
        let other_roots = w("other-roots.pem", &TestPki::new("other.test").root_pem());
        let other = load_upstream_tls(Some(&other_roots), None, None).unwrap();
        assert_ne!(full.pool_group, 0);
        assert_ne!(other.pool_group, full.pool_group);
        let again = load_upstream_tls(Some(&roots), None, None).unwrap();
        assert_eq!(again.pool_group, full.pool_group);
        let client = full.client.unwrap();
        assert_eq!(client.leaf().borrow_raw_cert(), &leaf.cert_der);
        assert_eq!(client.intermediates().len(), 1);

        let err = |r: Result<UpstreamTls, ConfigError>| r.unwrap_err().to_string();
        let e = err(load_upstream_tls(None, Some(&chain), Some(&wrong_key)));
        assert!(e.contains("does not match"), "{e}");
        let e = err(load_upstream_tls(None, Some(&chain), None));
        assert!(e.contains("go together"), "{e}");
        let e = err(load_upstream_tls(None, None, Some(&key)));
        assert!(e.contains("go together"), "{e}");
        let e = err(load_upstream_tls(Some(&garbage), None, None));
        assert!(e.contains("upstream CA file"), "{e}");
        let e = err(load_upstream_tls(None, Some(&garbage), Some(&key)));
        assert!(e.contains("upstream client certificate"), "{e}");
        let e = err(load_upstream_tls(None, Some(&chain), Some(&garbage)));
        assert!(e.contains("upstream client key"), "{e}");
        let e = err(load_upstream_tls(
            Some(&dir.path().join("missing.pem")),
            None,
            None,
        ));
        assert!(e.contains("missing.pem"), "{e}");
    }
}
