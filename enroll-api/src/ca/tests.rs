use rustls_pki_types::{pem::PemObject, CertificateDer, CertificateSigningRequestDer};
use std::process::Command;
use std::sync::Arc;

use rcgen::{CertificateParams, KeyPair, SanType};
use x509_parser::prelude::*;

use oneprotect_identity::profile::{DEFAULT_LEAF_LIFETIME, NOT_BEFORE_CUSHION};
use oneprotect_identity::AgentIdentity;

use super::*;
use crate::clock::{Clock, FixedClock, SharedClock};

fn clock() -> (FixedClock, SharedClock) {
    let c = FixedClock::new(OffsetDateTime::from_unix_timestamp(1_800_000_000).unwrap());
    (c.clone(), Arc::new(c))
}

fn open(dir: &Path) -> (Ca, FixedClock) {
    let (fixed, shared) = clock();
    let ca = Ca::open(dir, "oneprotect.test".parse().unwrap(), shared, true).unwrap();
    (ca, fixed)
}

fn csr_for(
    alg: &'static rcgen::SignatureAlgorithm,
    tweak: impl FnOnce(&mut CertificateParams),
) -> String {
    let key = KeyPair::generate_for(alg).unwrap();
    let mut params = CertificateParams::new(vec!["evil.example".to_string()]).unwrap();
    tweak(&mut params);
    params.serialize_request(&key).unwrap().pem().unwrap()
}

fn openssl_csr(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("k.pem");
    let csr = dir.path().join("c.pem");
    let out = Command::new("openssl")
        .args(["req", "-new", "-nodes", "-subj", "/CN=x", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr)
        .args(args)
        .output()
        .expect("openssl CLI");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::read_to_string(csr).unwrap()
}

#[test]
fn issues_a_leaf_that_matches_the_profile() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, fixed) = open(dir.path());
    let tenant = TenantId::random();
    let agent = AgentId::random();
    let csr = check_csr(&csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, |p| {
        p.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        p.subject_alt_names
            .push(SanType::URI("spiffe://evil/tenant/x".try_into().unwrap()));
    }))
    .unwrap();
    assert_eq!(
        csr.algorithm(),
        oneprotect_identity::profile::KeyAlgorithm::EcdsaP256
    );
    let leaf = ca
        .issue_leaf(tenant, agent, &csr, DEFAULT_LEAF_LIFETIME)
        .unwrap();
    let now = fixed.now();
    assert_eq!(leaf.not_before, now - NOT_BEFORE_CUSHION);
    assert_eq!(leaf.not_after, now + DEFAULT_LEAF_LIFETIME);

    let chain_der = CertificateDer::from_pem_slice(leaf.chain_pem.as_bytes()).unwrap();
    let id = AgentIdentity::from_chain(&leaf.cert_der, &chain_der).unwrap();
    assert_eq!(id.tenant(), tenant);
    assert_eq!(id.agent(), agent);
    assert_eq!(id.serial(), leaf.serial);
    assert_eq!(id.uri(), &leaf.uri);
    assert_eq!(id.not_after(), leaf.not_after.unix_timestamp());

    let (_, cert) = parse_x509_certificate(&leaf.cert_der).unwrap();
    let (_, issuer) = parse_x509_certificate(&chain_der).unwrap();
    cert.verify_signature(Some(issuer.public_key())).unwrap();
    // Exactly one SAN (the URI); the requested DNS name and URI are gone.
    let san = cert.subject_alternative_name().unwrap().unwrap();
    assert_eq!(san.value.general_names.len(), 1);
    assert!(!cert.is_ca());
    assert_eq!(
        cert.basic_constraints().unwrap().map(|b| b.value.ca),
        Some(false)
    );
    assert!(!cert.subject().to_string().contains("evil"));
    let ku = cert.key_usage().unwrap().unwrap().value;
    assert!(ku.digital_signature() && !ku.key_cert_sign() && !ku.key_encipherment());
    let eku = cert.extended_key_usage().unwrap().unwrap().value;
    assert!(eku.client_auth && !eku.server_auth);
    assert!(cert.raw_serial().len() >= 15);

    // The tenant CA: one URI SAN, pathlen 0, signed by the root.
    let (_, root) = parse_x509_certificate(ca.root_der()).unwrap();
    issuer.verify_signature(Some(root.public_key())).unwrap();
    let bc = issuer.basic_constraints().unwrap().unwrap().value;
    assert!(bc.ca);
    assert_eq!(bc.path_len_constraint, Some(0));
}

#[test]
fn serials_are_random_and_not_after_is_capped_at_the_issuer() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, _) = open(dir.path());
    let tenant = TenantId::random();
    let csr = check_csr(&csr_for(&rcgen::PKCS_ED25519, |_| {})).unwrap();
    let a = ca
        .issue_leaf(tenant, AgentId::random(), &csr, Duration::from_secs(60))
        .unwrap();
    let b = ca
        .issue_leaf(
            tenant,
            AgentId::random(),
            &csr,
            Duration::from_secs(100 * 365 * 86400),
        )
        .unwrap();
    assert_ne!(a.serial, b.serial);
    let chain_der = CertificateDer::from_pem_slice(b.chain_pem.as_bytes()).unwrap();
    let (_, issuer) = parse_x509_certificate(&chain_der).unwrap();
    assert_eq!(b.not_after, issuer.validity().not_after.to_datetime());
}

#[test]
fn accepts_p384_ed25519_and_rsa2048() {
    for pem in [
        csr_for(&rcgen::PKCS_ECDSA_P384_SHA384, |_| {}),
        csr_for(&rcgen::PKCS_ED25519, |_| {}),
        openssl_csr(&["-newkey", "rsa:2048"]),
        openssl_csr(&["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"]),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let (ca, _) = open(dir.path());
        let csr = check_csr(&pem).unwrap();
        let leaf = ca
            .issue_leaf(
                TenantId::random(),
                AgentId::random(),
                &csr,
                DEFAULT_LEAF_LIFETIME,
            )
            .unwrap();
        let chain_der = CertificateDer::from_pem_slice(leaf.chain_pem.as_bytes()).unwrap();
        AgentIdentity::from_chain(&leaf.cert_der, &chain_der).unwrap();
    }
}

#[test]
fn refuses_weak_unsupported_malformed_and_forged_csrs() {
    assert_eq!(
        check_csr(&openssl_csr(&["-newkey", "rsa:1024"])).unwrap_err(),
        CsrError::WeakKey(1024)
    );
    assert_eq!(
        check_csr(&openssl_csr(&[
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-521"
        ]))
        .unwrap_err(),
        CsrError::UnsupportedKey
    );
    assert_eq!(
        check_csr(&openssl_csr(&["-newkey", "rsa:2048", "-sha1"])).unwrap_err(),
        CsrError::UnsupportedKey
    );
    for bad in [
        "",
        "garbage",
        "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
    ] {
        assert_eq!(check_csr(bad).unwrap_err(), CsrError::Malformed, "{bad:?}");
    }
    assert_eq!(
        check_csr(&"A".repeat(MAX_CSR_PEM_LEN + 1)).unwrap_err(),
        CsrError::Malformed
    );

    // Flip a bit in the signature: the request no longer proves possession.
    let pem = csr_for(&rcgen::PKCS_ECDSA_P256_SHA256, |_| {});
    let mut der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .as_ref()
        .to_vec();
    let last = der.len() - 3;
    der[last] ^= 0x01;
    let forged = pem_of("CERTIFICATE REQUEST", &der);
    assert_eq!(check_csr(&forged).unwrap_err(), CsrError::SignatureInvalid);
}

fn pem_of(label: &str, der: &[u8]) -> String {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD.encode(der);
    format!("-----BEGIN {label}-----\n{b64}\n-----END {label}-----\n")
}

#[test]
fn keys_are_private_files_and_survive_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let tenant = TenantId::random();
    let (root, tenant_pem) = {
        let (ca, _) = open(dir.path());
        (
            ca.trust_bundle_pem().to_owned(),
            ca.tenant_ca_pem(tenant).unwrap(),
        )
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        for f in [
            dir.path().join("root.pem"),
            dir.path().join(format!("tenants/{tenant}.pem")),
        ] {
            let mode = std::fs::metadata(&f).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{}", f.display());
        }
    }
    let (ca, _) = open(dir.path());
    assert_eq!(ca.trust_bundle_pem(), root);
    assert_eq!(ca.tenant_ca_pem(tenant).unwrap(), tenant_pem);
    assert_ne!(ca.tenant_ca_pem(TenantId::random()).unwrap(), tenant_pem);
}

#[test]
fn init_refuses_to_replace_a_root_and_open_requires_one() {
    let dir = tempfile::tempdir().unwrap();
    let (_, shared) = clock();
    let td: TrustDomain = "oneprotect.test".parse().unwrap();
    assert!(matches!(
        Ca::open(dir.path(), td.clone(), shared.clone(), false),
        Err(CaError::NoRoot(_))
    ));
    Ca::init(dir.path(), &td, &shared).unwrap();
    assert!(matches!(
        Ca::init(dir.path(), &td, &shared),
        Err(CaError::RootExists(_))
    ));
    Ca::open(dir.path(), td, shared, false).unwrap();
}
