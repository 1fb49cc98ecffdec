//! Dev-only test PKI: a platform root, tenant issuing CAs and agent leaves in
//! OneProtect's certificate profile, plus deliberately broken variants for
//! refusal tests (two URI SANs, CA=true leaves, missing clientAuth, expired,
//! not yet valid, tenant mismatch, foreign roots).
//!
//! Everything is returned as DER/PEM bytes so this crate does not depend on
//! the types under test. Never use it outside tests and benchmarks: keys are
//! generated in memory and never protected.
//!
//! ```
//! let pki = oneprotect_testpki::TestPki::new("oneprotect.test");
//! let tenant = uuid::Uuid::new_v4().to_string();
//! let ca = pki.tenant_ca(&tenant);
//! let leaf = ca.agent(&uuid::Uuid::new_v4().to_string());
//! assert!(leaf.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
//! ```

// rcgen errors only on invalid parameters, which here are fixed by the code:
// a failure is a bug in this test helper, so `expect` is the right answer.
#![allow(clippy::expect_used)]

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, CertifiedIssuer,
    DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair,
    KeyUsagePurpose, RevokedCertParams, SanType, SerialNumber,
};
use time::{Duration, OffsetDateTime};

/// A root CA for one trust domain.
pub struct TestPki {
    trust_domain: String,
    root: CertifiedIssuer<'static, KeyPair>,
}

/// A tenant issuing CA (pathlen 0, URI SAN `spiffe://<td>/tenant/<id>`).
pub struct TenantCa {
    /// The trust domain.
    pub trust_domain: String,
    /// The tenant id (canonical UUID text).
    pub tenant: String,
    /// The CA certificate, DER.
    pub cert_der: Vec<u8>,
    /// The CA certificate, PEM.
    pub cert_pem: String,
    /// The CA private key, PKCS#8 PEM.
    pub key_pem: String,
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// An issued leaf with its private key.
#[derive(Clone)]
pub struct Leaf {
    /// The certificate, DER.
    pub cert_der: Vec<u8>,
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// The private key, PKCS#8 PEM.
    pub key_pem: String,
}

/// What to put in a leaf. [`LeafSpec::agent`] is the correct profile; each
/// field can be changed to make a broken one.
#[derive(Clone, Debug)]
pub struct LeafSpec {
    /// URI SANs, in order.
    pub uris: Vec<String>,
    /// DNS SANs.
    pub dns: Vec<String>,
    /// Whether to mark the leaf CA=true.
    pub is_ca: bool,
    /// Key usages.
    pub key_usages: Vec<KeyUsagePurpose>,
    /// Extended key usages.
    pub extended_key_usages: Vec<ExtendedKeyUsagePurpose>,
    /// NotBefore.
    pub not_before: OffsetDateTime,
    /// NotAfter.
    pub not_after: OffsetDateTime,
    /// Serial number bytes (big-endian, any length rcgen accepts); 16 random
    /// bytes when `None`.
    pub serial: Option<Vec<u8>>,
}

impl LeafSpec {
    /// The correct agent profile for `agent` of `ca`'s tenant, valid from an
    /// hour ago for a day.
    pub fn agent(ca: &TenantCa, agent: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        Self {
            uris: vec![format!(
                "spiffe://{}/tenant/{}/agent/{agent}",
                ca.trust_domain, ca.tenant
            )],
            dns: Vec::new(),
            is_ca: false,
            key_usages: vec![KeyUsagePurpose::DigitalSignature],
            extended_key_usages: vec![ExtendedKeyUsagePurpose::ClientAuth],
            not_before: now - Duration::hours(1),
            not_after: now + Duration::days(1),
            serial: None,
        }
    }
}

fn random_serial() -> [u8; 16] {
    *uuid::Uuid::new_v4().as_bytes()
}

fn name(cn: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::OrganizationName, "OneProtect test");
    dn.push(DnType::CommonName, cn);
    dn
}

fn uri(s: &str) -> SanType {
    SanType::URI(s.try_into().expect("URI SAN is IA5"))
}

impl TestPki {
    /// A new root for `trust_domain`, valid from a day ago for ten years.
    pub fn new(trust_domain: &str) -> Self {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("{trust_domain} test root"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(1));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(3650);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        let key = KeyPair::generate().expect("generate root key");
        let root = CertifiedIssuer::self_signed(params, key).expect("self-sign root");
        Self {
            trust_domain: trust_domain.to_owned(),
            root,
        }
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The root certificate, DER.
    pub fn root_der(&self) -> Vec<u8> {
        self.root.der().to_vec()
    }

    /// The root certificate, PEM.
    pub fn root_pem(&self) -> String {
        self.root.pem()
    }

    /// A CRL signed by the root listing `revoked` serials (big-endian bytes),
    /// PEM, valid from an hour ago for `valid_for`.
    pub fn crl_pem(&self, revoked: &[Vec<u8>], valid_for: Duration) -> String {
        crl_pem(&self.root, revoked, valid_for)
    }

    /// A tenant issuing CA for `tenant` with the correct profile.
    pub fn tenant_ca(&self, tenant: &str) -> TenantCa {
        self.tenant_ca_with_uri(
            tenant,
            &format!("spiffe://{}/tenant/{tenant}", self.trust_domain),
        )
    }

    /// A tenant issuing CA for `tenant` whose URI SAN is `ca_uri` (to test CAs
    /// with a wrong or foreign identity).
    pub fn tenant_ca_with_uri(&self, tenant: &str, ca_uri: &str) -> TenantCa {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = name(&format!("tenant {tenant} issuing CA"));
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        params.subject_alt_names = vec![uri(ca_uri)];
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(365);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate tenant CA key");
        let key_pem = key.serialize_pem();
        let issuer = CertifiedIssuer::signed_by(params, key, &*self.root).expect("sign tenant CA");
        let cert_der = issuer.der().to_vec();
        let cert_pem = issuer.pem();
        TenantCa {
            trust_domain: self.trust_domain.clone(),
            tenant: tenant.to_owned(),
            cert_der,
            cert_pem,
            key_pem,
            issuer,
        }
    }
}

fn crl_pem(issuer: &Issuer<'_, KeyPair>, revoked: &[Vec<u8>], valid_for: Duration) -> String {
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now - Duration::hours(1),
        next_update: now + valid_for,
        crl_number: SerialNumber::from_slice(&random_serial()),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|serial| RevokedCertParams {
                serial_number: SerialNumber::from_slice(serial),
                revocation_time: now - Duration::minutes(30),
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    params
        .signed_by(issuer)
        .expect("sign CRL")
        .pem()
        .expect("encode CRL")
}

impl TenantCa {
    /// A CRL signed by this CA listing `revoked` serials (big-endian bytes),
    /// PEM, valid from an hour ago for `valid_for`.
    pub fn crl_pem(&self, revoked: &[Vec<u8>], valid_for: Duration) -> String {
        crl_pem(&self.issuer, revoked, valid_for)
    }

    /// A correct agent leaf for `agent`.
    pub fn agent(&self, agent: &str) -> Leaf {
        self.leaf(&LeafSpec::agent(self, agent))
    }

    /// A leaf made to `spec` (correct or deliberately broken).
    pub fn leaf(&self, spec: &LeafSpec) -> Leaf {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = spec
            .uris
            .iter()
            .map(|u| uri(u))
            .chain(
                spec.dns
                    .iter()
                    .map(|d| SanType::DnsName(d.as_str().try_into().expect("DNS SAN is IA5"))),
            )
            .collect();
        params.is_ca = if spec.is_ca {
            IsCa::Ca(BasicConstraints::Unconstrained)
        } else {
            IsCa::ExplicitNoCa
        };
        params.key_usages = spec.key_usages.clone();
        params.extended_key_usages = spec.extended_key_usages.clone();
        params.not_before = spec.not_before;
        params.not_after = spec.not_after;
        params.serial_number = Some(SerialNumber::from_slice(
            &spec
                .serial
                .clone()
                .unwrap_or_else(|| random_serial().to_vec()),
        ));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params.signed_by(&key, &*self.issuer).expect("sign leaf");
        Leaf {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        }
    }
}

impl TestPki {
    /// A TLS server certificate signed by this root, for `names` (DNS names or
    /// IP addresses), with serverAuth EKU. For test and bench listeners.
    pub fn server_cert(&self, names: &[&str]) -> Leaf {
        let now = OffsetDateTime::now_utc();
        let mut params = CertificateParams::default();
        params.distinguished_name = name("test server");
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName((*n).try_into().expect("DNS SAN is IA5")),
            })
            .collect();
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(365);
        params.serial_number = Some(SerialNumber::from_slice(&random_serial()));
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate server key");
        let cert = params
            .signed_by(&key, &*self.root)
            .expect("sign server cert");
        Leaf {
            cert_der: cert.der().to_vec(),
            cert_pem: cert.pem(),
            key_der: key.serialize_der(),
            key_pem: key.serialize_pem(),
        }
    }
}
