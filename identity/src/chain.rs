//! The identity of an agent certificate and its issuing tenant CA.
//!
//! [`AgentIdentity::from_chain`] checks the identity-bearing parts of the
//! profile — SPIFFE's X509-SVID rules and the tenant boundary — and extracts
//! the identity. It does **not** verify signatures or validity periods: call
//! it on a chain that a path validator (rustls-webpki in the gateway) has
//! already verified against the trust bundle. It is pure and allocation-light
//! so the gateway can run it once per handshake.

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::FromDer;

use crate::ids::{AgentId, CertFingerprint, SerialNumber, TenantId};
use crate::uri::{AgentUri, TenantCaUri, TrustDomain, UriError};

/// Why a certificate chain does not carry a valid agent identity. Each
/// refusal has its own variant so the gateway can count them by reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The leaf is not a DER X.509 certificate (or has trailing bytes).
    #[error("leaf certificate does not parse")]
    MalformedLeaf,
    /// The issuer is not a DER X.509 certificate (or has trailing bytes).
    #[error("issuer certificate does not parse")]
    MalformedIssuer,
    /// An extension of the leaf is malformed or duplicated.
    #[error("leaf certificate has malformed or duplicate extensions")]
    BadExtensions,
    /// The leaf has no URI SAN.
    #[error("leaf certificate has no URI SAN")]
    NoUriSan,
    /// The leaf has more than one URI SAN (SPIFFE allows exactly one).
    #[error("leaf certificate has more than one URI SAN")]
    MultipleUriSans,
    /// The leaf's URI SAN is not an agent identity URI.
    #[error("leaf URI SAN is not an agent identity: {0}")]
    BadLeafUri(#[source] UriError),
    /// The leaf is marked CA=true.
    #[error("leaf certificate is a CA")]
    LeafIsCa,
    /// The leaf's key usage is missing, lacks digitalSignature, or allows
    /// certificate or CRL signing.
    #[error("leaf key usage is not digitalSignature only")]
    BadKeyUsage,
    /// The leaf lacks the clientAuth extended key usage.
    #[error("leaf lacks the clientAuth extended key usage")]
    MissingClientAuth,
    /// The issuer is not a CA certificate.
    #[error("issuer is not a CA")]
    IssuerNotCa,
    /// The issuer does not carry exactly one URI SAN naming a tenant CA.
    #[error("issuer does not carry a tenant CA identity")]
    BadIssuerUri,
    /// The leaf's issuer name is not the issuer's subject name.
    #[error("leaf was not issued by this issuer")]
    NotIssuedBy,
    /// The leaf and its issuer are in different trust domains.
    #[error("leaf and issuer are in different trust domains")]
    TrustDomainMismatch,
    /// The leaf names another tenant than its issuing CA.
    #[error("leaf tenant differs from its issuing CA's tenant")]
    TenantMismatch,
    /// The leaf's serial is not a positive integer of at most 20 octets
    /// (RFC 5280 §4.1.2.2).
    #[error("leaf serial number is not a positive integer of at most 20 octets")]
    BadSerial,
}

/// The verified identity of one agent certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentIdentity {
    uri: AgentUri,
    serial: SerialNumber,
    fingerprint: CertFingerprint,
    not_before: i64,
    not_after: i64,
}

fn parse_cert(der: &[u8]) -> Option<X509Certificate<'_>> {
    match X509Certificate::from_der(der) {
        Ok(([], cert)) => Some(cert),
        _ => None,
    }
}

/// The single URI SAN of a certificate: `Ok(None)` when there is none.
fn single_uri<'a>(cert: &X509Certificate<'a>) -> Result<Option<&'a str>, ChainError> {
    let san = cert
        .subject_alternative_name()
        .map_err(|_| ChainError::BadExtensions)?;
    let mut uris = san
        .iter()
        .flat_map(|ext| ext.value.general_names.iter())
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some(*u),
            _ => None,
        });
    let first = uris.next();
    if uris.next().is_some() {
        return Err(ChainError::MultipleUriSans);
    }
    Ok(first)
}

impl AgentIdentity {
    /// Checks the leaf `leaf_der` issued by `issuer_der` (both DER) against
    /// the agent certificate profile and returns its identity.
    ///
    /// Refuses (each with its own [`ChainError`]): anything but exactly one
    /// URI SAN that parses as an agent URI, CA=true, key usage other than
    /// digitalSignature (without certificate or CRL signing), no clientAuth
    /// EKU, an issuer that is not a CA with one tenant-CA URI SAN, a leaf
    /// whose issuer name is not the issuer's subject, and a leaf whose trust
    /// domain or tenant differs from the issuer's.
    ///
    /// Signatures and validity periods are not checked here: see the module
    /// documentation.
    pub fn from_chain(leaf_der: &[u8], issuer_der: &[u8]) -> Result<Self, ChainError> {
        let leaf = parse_cert(leaf_der).ok_or(ChainError::MalformedLeaf)?;
        let issuer = parse_cert(issuer_der).ok_or(ChainError::MalformedIssuer)?;

        let uri: AgentUri = single_uri(&leaf)?
            .ok_or(ChainError::NoUriSan)?
            .parse()
            .map_err(ChainError::BadLeafUri)?;

        let bc = leaf
            .basic_constraints()
            .map_err(|_| ChainError::BadExtensions)?;
        if bc.is_some_and(|bc| bc.value.ca) {
            return Err(ChainError::LeafIsCa);
        }
        let ku = leaf
            .key_usage()
            .map_err(|_| ChainError::BadExtensions)?
            .ok_or(ChainError::BadKeyUsage)?;
        if !ku.value.digital_signature() || ku.value.key_cert_sign() || ku.value.crl_sign() {
            return Err(ChainError::BadKeyUsage);
        }
        let eku = leaf
            .extended_key_usage()
            .map_err(|_| ChainError::BadExtensions)?;
        if !eku.is_some_and(|e| e.value.client_auth) {
            return Err(ChainError::MissingClientAuth);
        }

        let issuer_bc = issuer
            .basic_constraints()
            .map_err(|_| ChainError::IssuerNotCa)?;
        if !issuer_bc.is_some_and(|bc| bc.value.ca) {
            return Err(ChainError::IssuerNotCa);
        }
        let ca_uri: TenantCaUri = single_uri(&issuer)
            .map_err(|_| ChainError::BadIssuerUri)?
            .ok_or(ChainError::BadIssuerUri)?
            .parse()
            .map_err(|_| ChainError::BadIssuerUri)?;
        if leaf.issuer().as_raw() != issuer.subject().as_raw() {
            return Err(ChainError::NotIssuedBy);
        }
        if ca_uri.trust_domain() != uri.trust_domain() {
            return Err(ChainError::TrustDomainMismatch);
        }
        if ca_uri.tenant() != uri.tenant() {
            return Err(ChainError::TenantMismatch);
        }

        let serial =
            SerialNumber::from_der_integer(leaf.raw_serial()).map_err(|_| ChainError::BadSerial)?;
        Ok(Self {
            uri,
            serial,
            fingerprint: CertFingerprint::of_der(leaf_der),
            not_before: leaf.validity().not_before.timestamp(),
            not_after: leaf.validity().not_after.timestamp(),
        })
    }

    /// The agent's identity URI.
    pub fn uri(&self) -> &AgentUri {
        &self.uri
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &TrustDomain {
        self.uri.trust_domain()
    }

    /// The tenant.
    pub fn tenant(&self) -> TenantId {
        self.uri.tenant()
    }

    /// The agent.
    pub fn agent(&self) -> AgentId {
        self.uri.agent()
    }

    /// The leaf's serial number.
    pub fn serial(&self) -> SerialNumber {
        self.serial
    }

    /// The SHA-256 fingerprint of the leaf's DER.
    pub fn fingerprint(&self) -> CertFingerprint {
        self.fingerprint
    }

    /// NotBefore, unix seconds.
    pub fn not_before(&self) -> i64 {
        self.not_before
    }

    /// NotAfter, unix seconds.
    pub fn not_after(&self) -> i64 {
        self.not_after
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_testpki::{LeafSpec, TestPki};
    use rcgen::{ExtendedKeyUsagePurpose, KeyUsagePurpose};

    const TD: &str = "oneprotect.test";

    struct Fixture {
        pki: TestPki,
        ca: oneprotect_testpki::TenantCa,
        tenant: String,
        agent: String,
    }

    fn fixture() -> Fixture {
        let pki = TestPki::new(TD);
        let tenant = uuid::Uuid::new_v4().to_string();
        let agent = uuid::Uuid::new_v4().to_string();
        let ca = pki.tenant_ca(&tenant);
        Fixture {
            pki,
            ca,
            tenant,
            agent,
        }
    }

    fn check(f: &Fixture, spec: &LeafSpec) -> Result<AgentIdentity, ChainError> {
        let leaf = f.ca.leaf(spec);
        AgentIdentity::from_chain(&leaf.cert_der, &f.ca.cert_der)
    }

    #[test]
    fn accepts_the_profile_and_extracts_identity() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        let mut serial = [0u8; 16];
        serial[0] = 0x80; // high bit: DER needs a sign byte
        serial[15] = 7;
        spec.serial = Some(serial.to_vec());
        let leaf = f.ca.leaf(&spec);
        let id = AgentIdentity::from_chain(&leaf.cert_der, &f.ca.cert_der).unwrap();
        assert_eq!(id.tenant().to_string(), f.tenant);
        assert_eq!(id.agent().to_string(), f.agent);
        assert_eq!(id.trust_domain().as_str(), TD);
        assert_eq!(id.serial().as_bytes()[4..], serial);
        assert_eq!(id.fingerprint(), CertFingerprint::of_der(&leaf.cert_der));
        assert_eq!(id.not_after(), spec.not_after.unix_timestamp());
        assert_eq!(id.not_before(), spec.not_before.unix_timestamp());
    }

    #[test]
    fn accepts_other_san_types_beside_the_one_uri() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        spec.dns = vec!["host.example".into()];
        assert!(check(&f, &spec).is_ok());
    }

    #[test]
    fn refuses_malformed_leaf_and_issuer() {
        let f = fixture();
        let leaf = f.ca.agent(&f.agent);
        assert_eq!(
            AgentIdentity::from_chain(b"garbage", &f.ca.cert_der),
            Err(ChainError::MalformedLeaf)
        );
        let mut trailing = leaf.cert_der.clone();
        trailing.push(0);
        assert_eq!(
            AgentIdentity::from_chain(&trailing, &f.ca.cert_der),
            Err(ChainError::MalformedLeaf)
        );
        assert_eq!(
            AgentIdentity::from_chain(&leaf.cert_der, b""),
            Err(ChainError::MalformedIssuer)
        );
    }

    #[test]
    fn refuses_no_uri_san() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        spec.uris.clear();
        spec.dns = vec!["host.example".into()];
        assert_eq!(check(&f, &spec), Err(ChainError::NoUriSan));
    }

    #[test]
    fn refuses_two_uri_sans() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        let second = spec.uris[0].replace(&f.agent, &uuid::Uuid::new_v4().to_string());
        spec.uris.push(second);
        assert_eq!(check(&f, &spec), Err(ChainError::MultipleUriSans));
    }

    #[test]
    fn refuses_a_uri_that_is_not_an_agent_identity() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        spec.uris = vec![format!("spiffe://{TD}/tenant/{}", f.tenant)];
        assert_eq!(
            check(&f, &spec),
            Err(ChainError::BadLeafUri(UriError::BadPath))
        );
        spec.uris = vec![format!(
            "https://{TD}/tenant/{}/agent/{}",
            f.tenant, f.agent
        )];
        assert_eq!(
            check(&f, &spec),
            Err(ChainError::BadLeafUri(UriError::WrongScheme))
        );
    }

    #[test]
    fn refuses_a_ca_leaf() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        spec.is_ca = true;
        assert_eq!(check(&f, &spec), Err(ChainError::LeafIsCa));
    }

    #[test]
    fn refuses_bad_key_usage() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        spec.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyCertSign,
        ];
        assert_eq!(check(&f, &spec), Err(ChainError::BadKeyUsage));
        spec.key_usages = vec![KeyUsagePurpose::KeyEncipherment];
        assert_eq!(check(&f, &spec), Err(ChainError::BadKeyUsage));
        spec.key_usages.clear();
        assert_eq!(check(&f, &spec), Err(ChainError::BadKeyUsage));
    }

    #[test]
    fn refuses_missing_client_auth() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        spec.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        assert_eq!(check(&f, &spec), Err(ChainError::MissingClientAuth));
        spec.extended_key_usages.clear();
        assert_eq!(check(&f, &spec), Err(ChainError::MissingClientAuth));
    }

    #[test]
    fn refuses_an_issuer_that_is_not_a_ca() {
        let f = fixture();
        let leaf = f.ca.agent(&f.agent);
        let other = f.ca.agent(&uuid::Uuid::new_v4().to_string());
        assert_eq!(
            AgentIdentity::from_chain(&leaf.cert_der, &other.cert_der),
            Err(ChainError::IssuerNotCa)
        );
    }

    #[test]
    fn refuses_an_issuer_without_tenant_ca_identity() {
        let f = fixture();
        let bad_ca = f
            .pki
            .tenant_ca_with_uri(&f.tenant, "spiffe://oneprotect.test/platform");
        let leaf = bad_ca.agent(&f.agent);
        assert_eq!(
            AgentIdentity::from_chain(&leaf.cert_der, &bad_ca.cert_der),
            Err(ChainError::BadIssuerUri)
        );
        // The root has no URI SAN at all.
        assert_eq!(
            AgentIdentity::from_chain(&leaf.cert_der, &f.pki.root_der()),
            Err(ChainError::BadIssuerUri)
        );
    }

    #[test]
    fn refuses_a_leaf_from_another_issuer() {
        let f = fixture();
        let leaf = f.ca.agent(&f.agent);
        let sibling = f.pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
        // Different subject name (it embeds the tenant id).
        assert_eq!(
            AgentIdentity::from_chain(&leaf.cert_der, &sibling.cert_der),
            Err(ChainError::NotIssuedBy)
        );
    }

    #[test]
    fn refuses_a_leaf_for_another_tenant() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        let other_tenant = uuid::Uuid::new_v4().to_string();
        spec.uris = vec![format!(
            "spiffe://{TD}/tenant/{other_tenant}/agent/{}",
            f.agent
        )];
        assert_eq!(check(&f, &spec), Err(ChainError::TenantMismatch));
    }

    #[test]
    fn refuses_a_leaf_in_another_trust_domain() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        spec.uris = vec![format!(
            "spiffe://evil.test/tenant/{}/agent/{}",
            f.tenant, f.agent
        )];
        assert_eq!(check(&f, &spec), Err(ChainError::TrustDomainMismatch));
    }

    #[test]
    fn accepts_every_serial_length_rfc_5280_allows_and_no_longer() {
        let f = fixture();
        let mut spec = LeafSpec::agent(&f.ca, &f.agent);
        // 159 bits, what `openssl ca -rand_serial` makes: 20 octets.
        spec.serial = Some(vec![0x7f; 20]);
        assert_eq!(
            check(&f, &spec).unwrap().serial().to_string(),
            "7f".repeat(20)
        );
        spec.serial = Some(vec![1u8; 17]);
        assert_eq!(
            check(&f, &spec).unwrap().serial().to_string(),
            format!("000000{}", "01".repeat(17))
        );
        // 21 octets, or 20 with the high bit (a sign byte makes 21).
        spec.serial = Some(vec![1u8; 21]);
        assert_eq!(check(&f, &spec), Err(ChainError::BadSerial));
        spec.serial = Some(vec![0x80; 20]);
        assert_eq!(check(&f, &spec), Err(ChainError::BadSerial));
        spec.serial = Some(vec![0, 0, 0, 1]);
        assert_eq!(
            check(&f, &spec).unwrap().serial().to_string(),
            format!("{:032x}", 1)
        );
    }
}
