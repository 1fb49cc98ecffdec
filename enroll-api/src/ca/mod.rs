//! The certificate authority: a platform root and one issuing CA per tenant.
//!
//! No HTTP and no database here. Keys and certificates live as PEM files in
//! one directory (`root.pem`, `tenants/<tenant_id>.pem`, each holding the
//! private key and the certificate, mode 0600). Tenant CAs are created on
//! first use; creation is published with a hard link, so two replicas racing
//! on a shared directory agree on one CA (the loser re-reads the winner's).
//!
//! Leaves follow the profile in [`oneprotect_identity::profile`]: exactly the
//! identity URI SAN, clientAuth, digitalSignature, CA=false, a 128-bit random
//! serial, NotBefore backdated by the cushion, NotAfter capped at the issuer's.

mod csr;

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, PublicKeyData, SanType, SubjectPublicKeyInfo,
};
use ring::rand::SecureRandom;
use rustls_pki_types::pem::PemObject;
use time::OffsetDateTime;

use oneprotect_identity::profile::{
    NOT_BEFORE_CUSHION, ROOT_CA_LIFETIME, SERIAL_BYTES, TENANT_CA_LIFETIME,
};
use oneprotect_identity::{AgentId, AgentUri, SerialNumber, TenantCaUri, TenantId, TrustDomain};

pub use csr::{check_csr, CheckedCsr, CsrError, MAX_CSR_PEM_LEN};

use crate::clock::SharedClock;

const ROOT_FILE: &str = "root.pem";
const TENANTS_DIR: &str = "tenants";

/// Why a CA operation failed.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// Reading or writing a key file failed.
    #[error("CA file {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// A key file exists but does not hold a usable key and certificate.
    #[error("CA file {0} is damaged or not a CA")]
    Damaged(PathBuf),
    /// The root CA does not exist and automatic creation is off.
    #[error("no root CA in {0}; run `oneprotect-enroll-api ca init`")]
    NoRoot(PathBuf),
    /// `ca init` found an existing root.
    #[error("a root CA already exists in {0}")]
    RootExists(PathBuf),
    /// rcgen refused to build or sign a certificate.
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
    /// The issuer expires before the leaf would start.
    #[error("issuing CA has expired")]
    IssuerExpired,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> CaError + '_ {
    move |source| CaError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One CA: its key, certificate and validity end.
struct LoadedCa {
    key: KeyPair,
    cert_pem: String,
    cert_der: Vec<u8>,
    not_after: OffsetDateTime,
}

impl LoadedCa {
    fn issuer(&self) -> Result<Issuer<'static, &KeyPair>, CaError> {
        Ok(Issuer::from_ca_cert_der(
            &self.cert_der.clone().into(),
            &self.key,
        )?)
    }

    fn bundle_text(&self) -> String {
        format!("{}{}", self.key.serialize_pem(), self.cert_pem)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, CaError> {
        let damaged = || CaError::Damaged(path.to_owned());
        let key = KeyPair::from_pem(text).map_err(|_| damaged())?;
        let cert_der = rustls_pki_types::CertificateDer::pem_slice_iter(text.as_bytes())
            .next()
            .ok_or_else(damaged)?
            .map_err(|_| damaged())?
            .to_vec();
        let (_, cert) = x509_parser::parse_x509_certificate(&cert_der).map_err(|_| damaged())?;
        if !cert.is_ca() || cert.public_key().raw != key.subject_public_key_info().as_slice() {
            return Err(damaged());
        }
        let not_after = cert.validity().not_after.to_datetime();
        Ok(Self {
            key,
            cert_pem: pem_cert(&cert_der),
            cert_der,
            not_after,
        })
    }
}

fn pem_cert(der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    out
}

/// A freshly issued agent certificate.
#[derive(Debug, Clone)]
pub struct IssuedLeaf {
    /// The identity in the URI SAN.
    pub uri: AgentUri,
    /// The serial number.
    pub serial: SerialNumber,
    /// The leaf, PEM.
    pub cert_pem: String,
    /// The leaf, DER.
    pub cert_der: Vec<u8>,
    /// The issuing tenant CA, PEM (the chain the agent presents).
    pub chain_pem: String,
    /// NotBefore (backdated by the cushion).
    pub not_before: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
}

/// The platform root and the tenant issuing CAs, backed by a directory.
pub struct Ca {
    dir: PathBuf,
    trust_domain: TrustDomain,
    clock: SharedClock,
    root: LoadedCa,
    tenants: RwLock<HashMap<TenantId, Arc<LoadedCa>>>,
    // Serialises tenant CA creation inside this process.
    create_lock: Mutex<()>,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("dir", &self.dir)
            .field("trust_domain", &self.trust_domain)
            .finish_non_exhaustive()
    }
}

fn random_serial() -> Result<SerialNumber, CaError> {
    let rng = ring::rand::SystemRandom::new();
    loop {
        let mut bytes = [0u8; SERIAL_BYTES];
        rng.fill(&mut bytes).map_err(|_| CaError::Random)?;
        if let Some(s) = SerialNumber::from_bytes(bytes) {
            return Ok(s);
        }
    }
}

fn ca_key() -> Result<KeyPair, CaError> {
    Ok(KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)?)
}

/// Writes `text` to `path` with mode 0600, never replacing an existing file.
/// Returns `Ok(false)` when `path` already exists.
fn publish_new(path: &Path, text: &str) -> Result<bool, CaError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let tmp = dir.join(format!(".tmp-{}", uuid::Uuid::new_v4()));
    {
        let mut opts = std::fs::OpenOptions::new();
        opts.write(true).create_new(true);
        #[cfg(unix)]
        {
            use std::os::unix::fs::OpenOptionsExt;
            opts.mode(0o600);
        }
        let mut f = opts.open(&tmp).map_err(io_err(&tmp))?;
        f.write_all(text.as_bytes()).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
    }
    let linked = std::fs::hard_link(&tmp, path);
    let _ = std::fs::remove_file(&tmp);
    match linked {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(false),
        Err(e) => Err(io_err(path)(e)),
    }
}

fn create_dir_private(dir: &Path) -> Result<(), CaError> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir).map_err(io_err(dir))
}

fn read_to_string(path: &Path) -> Result<Option<String>, CaError> {
    match std::fs::read_to_string(path) {
        Ok(s) => Ok(Some(s)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(path)(e)),
    }
}

impl Ca {
    /// Creates the root CA in `dir` (for `ca init`). Refuses to replace an
    /// existing root.
    pub fn init(
        dir: &Path,
        trust_domain: &TrustDomain,
        clock: &SharedClock,
    ) -> Result<(), CaError> {
        create_dir_private(&dir.join(TENANTS_DIR))?;
        let path = dir.join(ROOT_FILE);
        let text = Self::new_root(trust_domain, clock)?;
        if publish_new(&path, &text)? {
            Ok(())
        } else {
            Err(CaError::RootExists(path))
        }
    }

    fn new_root(trust_domain: &TrustDomain, clock: &SharedClock) -> Result<String, CaError> {
        let now = clock.now();
        let key = ca_key()?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "OneProtect");
        dn.push(
            DnType::CommonName,
            format!("OneProtect agent root CA ({trust_domain})"),
        );
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(
            random_serial()?.to_significant_bytes(),
        ));
        params.not_before = now - NOT_BEFORE_CUSHION;
        params.not_after = now + ROOT_CA_LIFETIME;
        let cert = params.self_signed(&key)?;
        Ok(format!("{}{}", key.serialize_pem(), cert.pem()))
    }

    /// Opens the CA directory. With `auto_init` a missing root is generated
    /// (the dev default); without it, a missing root is an error.
    pub fn open(
        dir: &Path,
        trust_domain: TrustDomain,
        clock: SharedClock,
        auto_init: bool,
    ) -> Result<Self, CaError> {
        let path = dir.join(ROOT_FILE);
        if read_to_string(&path)?.is_none() {
            if !auto_init {
                return Err(CaError::NoRoot(dir.to_owned()));
            }
            match Self::init(dir, &trust_domain, &clock) {
                Ok(()) | Err(CaError::RootExists(_)) => {}
                Err(e) => return Err(e),
            }
        }
        create_dir_private(&dir.join(TENANTS_DIR))?;
        let text = read_to_string(&path)?.ok_or_else(|| CaError::NoRoot(dir.to_owned()))?;
        let root = LoadedCa::parse(&path, &text)?;
        Ok(Self {
            dir: dir.to_owned(),
            trust_domain,
            clock,
            root,
            tenants: RwLock::new(HashMap::new()),
            create_lock: Mutex::new(()),
        })
    }

    /// The trust domain in every identity this CA issues.
    pub fn trust_domain(&self) -> &TrustDomain {
        &self.trust_domain
    }

    /// The platform root certificate, PEM: the trust bundle.
    pub fn trust_bundle_pem(&self) -> &str {
        &self.root.cert_pem
    }

    /// The platform root certificate, DER.
    pub fn root_der(&self) -> &[u8] {
        &self.root.cert_der
    }

    /// The tenant's issuing CA certificate (PEM), created on first use.
    pub fn tenant_ca_pem(&self, tenant: TenantId) -> Result<String, CaError> {
        Ok(self.tenant_ca(tenant)?.cert_pem.clone())
    }

    fn tenant_ca(&self, tenant: TenantId) -> Result<Arc<LoadedCa>, CaError> {
        if let Some(ca) = self
            .tenants
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&tenant)
        {
            return Ok(Arc::clone(ca));
        }
        let _guard = self.create_lock.lock().unwrap_or_else(|e| e.into_inner());
        let path = self.dir.join(TENANTS_DIR).join(format!("{tenant}.pem"));
        let text = match read_to_string(&path)? {
            Some(t) => t,
            None => {
                let fresh = self.new_tenant_ca(tenant)?.bundle_text();
                publish_new(&path, &fresh)?;
                // Whether we won or lost a race with another replica, the
                // file is now the one truth.
                read_to_string(&path)?.ok_or_else(|| CaError::Damaged(path.clone()))?
            }
        };
        let ca = Arc::new(LoadedCa::parse(&path, &text)?);
        self.tenants
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .insert(tenant, Arc::clone(&ca));
        Ok(ca)
    }

    fn new_tenant_ca(&self, tenant: TenantId) -> Result<LoadedCa, CaError> {
        let now = self.clock.now();
        let key = ca_key()?;
        let uri = TenantCaUri::new(self.trust_domain.clone(), tenant);
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "OneProtect");
        dn.push(DnType::CommonName, format!("OneProtect tenant CA {tenant}"));
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(uri.to_string().try_into()?)];
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(
            random_serial()?.to_significant_bytes(),
        ));
        params.use_authority_key_identifier_extension = true;
        params.not_before = now - NOT_BEFORE_CUSHION;
        params.not_after = (now + TENANT_CA_LIFETIME).min(self.root.not_after);
        let cert = params.signed_by(&key, &self.root.issuer()?)?;
        let cert_der = cert.der().to_vec();
        Ok(LoadedCa {
            key,
            cert_pem: cert.pem(),
            cert_der,
            not_after: params.not_after,
        })
    }

    /// The tenant CA's CRL (DER) listing `revoked` (serial, revocation
    /// time), signed by that CA: thisUpdate `now`, nextUpdate `now + validity`
    /// (capped at the CA's NotAfter), CRL number `now` in unix seconds (so
    /// numbers increase from one CRL to the next).
    pub fn tenant_crl_der(
        &self,
        tenant: TenantId,
        revoked: &[(SerialNumber, OffsetDateTime)],
        validity: Duration,
    ) -> Result<Vec<u8>, CaError> {
        let ca = self.tenant_ca(tenant)?;
        self.crl_der(&ca, revoked, validity)
    }

    /// The platform root's CRL (DER), signed by the root, with the same
    /// thisUpdate/nextUpdate/number rules as [`Ca::tenant_crl_der`]. It lists
    /// revoked tenant CAs; no operation revokes a tenant CA yet, so it is
    /// empty, but a verifier that checks CRLs for every CA of the chain (nginx
    /// `ssl_crl`, OpenSSL `-crl_check_all`) needs it to accept any agent.
    pub fn root_crl_der(
        &self,
        revoked: &[(SerialNumber, OffsetDateTime)],
        validity: Duration,
    ) -> Result<Vec<u8>, CaError> {
        self.crl_der(&self.root, revoked, validity)
    }

    fn crl_der(
        &self,
        ca: &LoadedCa,
        revoked: &[(SerialNumber, OffsetDateTime)],
        validity: Duration,
    ) -> Result<Vec<u8>, CaError> {
        let now = self.clock.now();
        let next_update = (now + validity).min(ca.not_after);
        if next_update <= now {
            return Err(CaError::IssuerExpired);
        }
        let number = u64::try_from(now.unix_timestamp()).unwrap_or_default();
        let params = rcgen::CertificateRevocationListParams {
            this_update: now,
            next_update,
            crl_number: rcgen::SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, at)| rcgen::RevokedCertParams {
                    serial_number: rcgen::SerialNumber::from_slice(serial.to_significant_bytes()),
                    revocation_time: *at,
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&ca.issuer()?)?.der().to_vec())
    }

    /// Issues an agent leaf for `agent` of `tenant` with the key in `csr`.
    ///
    /// NotBefore is now minus [`NOT_BEFORE_CUSHION`]; NotAfter is now plus
    /// `lifetime`, capped at the tenant CA's NotAfter.
    pub fn issue_leaf(
        &self,
        tenant: TenantId,
        agent: AgentId,
        csr: &CheckedCsr,
        lifetime: Duration,
    ) -> Result<IssuedLeaf, CaError> {
        let ca = self.tenant_ca(tenant)?;
        let now = self.clock.now();
        let uri = AgentUri::new(self.trust_domain.clone(), tenant, agent);
        let serial = random_serial()?;
        let not_before = now - NOT_BEFORE_CUSHION;
        let not_after = (now + lifetime).min(ca.not_after);
        if not_after <= now {
            return Err(CaError::IssuerExpired);
        }
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, "OneProtect");
        dn.push(DnType::CommonName, agent.to_string());
        params.distinguished_name = dn;
        params.subject_alt_names = vec![SanType::URI(uri.to_string().try_into()?)];
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(rcgen::SerialNumber::from_slice(
            serial.to_significant_bytes(),
        ));
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let spki = SubjectPublicKeyInfo::from_der(csr.spki_der())?;
        let cert = params.signed_by(&spki, &ca.issuer()?)?;
        Ok(IssuedLeaf {
            uri,
            serial,
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            chain_pem: ca.cert_pem.clone(),
            not_before,
            not_after,
        })
    }
}

#[cfg(test)]
mod tests;
