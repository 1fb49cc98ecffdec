//! CSR checks: parse, key policy, proof of possession.
//!
//! The order matters: the key policy runs before the signature check, so a
//! 1024-bit RSA key is reported as weak (ring refuses to verify it at all),
//! and an unaccepted algorithm is reported as unsupported rather than as a
//! bad signature.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::CertificateSigningRequestDer;
use x509_parser::certification_request::X509CertificationRequest;
use x509_parser::oid_registry::{
    Oid, OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_NIST_EC_P384, OID_PKCS1_RSAENCRYPTION,
    OID_PKCS1_RSASSAPSS, OID_PKCS1_SHA256WITHRSA, OID_PKCS1_SHA384WITHRSA, OID_PKCS1_SHA512WITHRSA,
    OID_SIG_ECDSA_WITH_SHA256, OID_SIG_ECDSA_WITH_SHA384, OID_SIG_ED25519,
};
use x509_parser::prelude::FromDer;
use x509_parser::public_key::PublicKey;

use oneprotect_identity::profile::{KeyAlgorithm, MAX_RSA_BITS, MIN_RSA_BITS};

/// Largest CSR PEM accepted, in bytes (an 8192-bit RSA CSR is about 3.5 KiB).
pub const MAX_CSR_PEM_LEN: usize = 16 * 1024;

/// Why a CSR was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CsrError {
    /// Not one PEM `CERTIFICATE REQUEST` block holding a DER PKCS#10 request.
    #[error("CSR is not a PEM-encoded PKCS#10 request")]
    Malformed,
    /// The self-signature does not verify: no proof of possession.
    #[error("CSR signature does not verify")]
    SignatureInvalid,
    /// The key type, curve or signature algorithm is not accepted.
    #[error("key or signature algorithm not accepted")]
    UnsupportedKey,
    /// An RSA key shorter than the minimum.
    #[error("RSA key of {0} bits is shorter than the minimum")]
    WeakKey(usize),
}

/// A CSR that passed every check: its SubjectPublicKeyInfo (DER) and key
/// algorithm. Everything else the CSR asked for is dropped here.
#[derive(Debug, Clone)]
pub struct CheckedCsr {
    spki_der: Vec<u8>,
    algorithm: KeyAlgorithm,
}

impl CheckedCsr {
    /// The public key as DER SubjectPublicKeyInfo.
    pub fn spki_der(&self) -> &[u8] {
        &self.spki_der
    }

    /// The key algorithm.
    pub fn algorithm(&self) -> KeyAlgorithm {
        self.algorithm
    }
}

const ALLOWED_SIGNATURES: [&Oid<'static>; 7] = [
    &OID_SIG_ECDSA_WITH_SHA256,
    &OID_SIG_ECDSA_WITH_SHA384,
    &OID_SIG_ED25519,
    &OID_PKCS1_SHA256WITHRSA,
    &OID_PKCS1_SHA384WITHRSA,
    &OID_PKCS1_SHA512WITHRSA,
    &OID_PKCS1_RSASSAPSS,
];

/// Parses and checks a PEM CSR: accepted key (ECDSA P-256/P-384, Ed25519,
/// RSA of [`MIN_RSA_BITS`]..=[`MAX_RSA_BITS`] bits), accepted signature
/// algorithm, and a signature that verifies with the CSR's own key.
///
/// The requested subject, SANs and extensions are ignored, whatever they are.
pub fn check_csr(pem: &str) -> Result<CheckedCsr, CsrError> {
    if pem.len() > MAX_CSR_PEM_LEN {
        return Err(CsrError::Malformed);
    }
    let der = CertificateSigningRequestDer::from_pem_slice(pem.as_bytes())
        .map_err(|_| CsrError::Malformed)?;
    let Ok(([], csr)) = X509CertificationRequest::from_der(der.as_ref()) else {
        return Err(CsrError::Malformed);
    };
    let spki = &csr.certification_request_info.subject_pki;
    let key_oid = &spki.algorithm.algorithm;
    let algorithm = if *key_oid == OID_KEY_TYPE_EC_PUBLIC_KEY {
        let curve = spki
            .algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .ok_or(CsrError::UnsupportedKey)?;
        if curve == OID_EC_P256 {
            KeyAlgorithm::EcdsaP256
        } else if curve == OID_NIST_EC_P384 {
            KeyAlgorithm::EcdsaP384
        } else {
            return Err(CsrError::UnsupportedKey);
        }
    } else if *key_oid == OID_SIG_ED25519 {
        KeyAlgorithm::Ed25519
    } else if *key_oid == OID_PKCS1_RSAENCRYPTION {
        let bits = match spki.parsed() {
            Ok(PublicKey::RSA(rsa)) => rsa.key_size(),
            _ => return Err(CsrError::Malformed),
        };
        if bits < MIN_RSA_BITS {
            return Err(CsrError::WeakKey(bits));
        }
        if bits > MAX_RSA_BITS {
            return Err(CsrError::UnsupportedKey);
        }
        KeyAlgorithm::Rsa
    } else {
        return Err(CsrError::UnsupportedKey);
    };
    let sig_oid = &csr.signature_algorithm.algorithm;
    if !ALLOWED_SIGNATURES.contains(&sig_oid) {
        return Err(CsrError::UnsupportedKey);
    }
    csr.verify_signature()
        .map_err(|_| CsrError::SignatureInvalid)?;
    Ok(CheckedCsr {
        spki_der: spki.raw.to_vec(),
        algorithm,
    })
}
