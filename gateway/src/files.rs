//! The file loaders: PEM certificate chains, private keys, the server's
//! certificate and key, the assertion signing key. Each refusal is a
//! [`FileError`] naming what the file is for, its path and why, with the
//! io, PEM, rustls or webpki error as its `source()`.
//!
//! Files are read by [`crate::prepare::Prepared::load`] (once per start)
//! and by the trust bundle reload ([`crate::tls::trust`]); nothing else
//! opens them.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use oneprotect_identity::AssertionSigner;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;

/// A certificate, key or bundle file that was refused.
#[derive(Debug, thiserror::Error)]
#[error("{what} {}: {problem}", path.display())]
pub struct FileError {
    /// What the file is for (`server key`, `trust bundle`...).
    pub what: &'static str,
    /// The file.
    pub path: PathBuf,
    /// Why it was refused.
    #[source]
    pub problem: FileProblem,
}

/// Why a file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileProblem {
    /// The file could not be read.
    #[error("{0}")]
    Read(#[source] std::io::Error),
    /// The file is not PEM.
    #[error("not PEM: {0}")]
    NotPem(#[source] std::io::Error),
    /// The file holds no `CERTIFICATE` block.
    #[error("contains no CERTIFICATE block")]
    NoCertificate,
    /// The file holds no private key block.
    #[error("contains no private key block")]
    NoPrivateKey,
    /// A PEM assertion key file holds no PKCS#8 `PRIVATE KEY` block.
    #[error("no PKCS#8 PRIVATE KEY block")]
    NoPkcs8Key,
    /// The assertion key is not an Ed25519 PKCS#8 key.
    #[error("not an Ed25519 PKCS#8 key")]
    NotEd25519(#[source] oneprotect_identity::assertion::KeyError),
    /// rustls cannot sign with the key.
    #[error("unsupported key: {0}")]
    UnsupportedKey(#[source] rustls::Error),
    /// The key is not the certificate's.
    #[error("does not match the certificate: {0}")]
    KeyMismatch(#[source] rustls::Error),
    /// A certificate is not a usable trust anchor.
    #[error("not a usable trust anchor: {0}")]
    NotAnAnchor(#[source] webpki::Error),
    /// A certificate cannot be added to a root store.
    #[error("not a CA: {0}")]
    NotACa(#[source] rustls::Error),
    /// A certificate does not parse.
    #[error("not a usable certificate: {0}")]
    BadCertificate(#[source] webpki::Error),
    /// rustls refused the certificate and key as a client identity.
    #[error("{0}")]
    Refused(#[source] rustls::Error),
}

impl FileError {
    /// A refusal of the `what` file at `path`.
    pub fn new(what: &'static str, path: &Path, problem: FileProblem) -> Self {
        Self {
            what,
            path: path.to_path_buf(),
            problem,
        }
    }
}

/// Reads every `CERTIFICATE` block of a PEM file (at least one).
pub fn read_certs(
    what: &'static str,
    path: &Path,
) -> Result<Vec<CertificateDer<'static>>, FileError> {
    let err = |p| FileError::new(what, path, p);
    let bytes = std::fs::read(path).map_err(|e| err(FileProblem::Read(e)))?;
    let certs: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut bytes.as_slice())
        .collect::<Result<_, _>>()
        .map_err(|e| err(FileProblem::NotPem(e)))?;
    if certs.is_empty() {
        return Err(err(FileProblem::NoCertificate));
    }
    Ok(certs)
}

/// Reads the first private key block (PKCS#8, SEC1 or PKCS#1) of a PEM file.
pub fn read_private_key(
    what: &'static str,
    path: &Path,
) -> Result<PrivateKeyDer<'static>, FileError> {
    let err = |p| FileError::new(what, path, p);
    let bytes = std::fs::read(path).map_err(|e| err(FileProblem::Read(e)))?;
    rustls_pemfile::private_key(&mut bytes.as_slice())
        .map_err(|e| err(FileProblem::NotPem(e)))?
        .ok_or_else(|| err(FileProblem::NoPrivateKey))
}

/// Pairs a certificate chain with its key as rustls will sign with them,
/// checking that the key (the `what` file at `path`) is the leaf's.
pub fn certify(
    what: &'static str,
    path: &Path,
    chain: Vec<CertificateDer<'static>>,
    key: &PrivateKeyDer<'_>,
) -> Result<CertifiedKey, FileError> {
    let err = |p| FileError::new(what, path, p);
    let signing = rustls::crypto::ring::sign::any_supported_type(key)
        .map_err(|e| err(FileProblem::UnsupportedKey(e)))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| err(FileProblem::KeyMismatch(e)))?;
    Ok(certified)
}

/// Loads the listener's certificate chain and key, checked the way the
/// handshake will use them.
pub fn load_server_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, FileError> {
    let chain = read_certs("server certificate", cert)?;
    let key_der = read_private_key("server key", key)?;
    Ok(Arc::new(certify("server key", key, chain, &key_der)?))
}

/// Loads an Ed25519 PKCS#8 assertion signing key (DER, or PEM `PRIVATE KEY`)
/// under `kid`, or under the key's RFC 7638 thumbprint when `kid` is `None`.
pub fn load_signer(path: &Path, kid: Option<&str>) -> Result<AssertionSigner, FileError> {
    let err = |p| FileError::new("assertion signing key", path, p);
    let bytes = std::fs::read(path).map_err(|e| err(FileProblem::Read(e)))?;
    let der = if bytes.starts_with(b"-----BEGIN") {
        match rustls_pemfile::private_key(&mut bytes.as_slice()) {
            Ok(Some(PrivateKeyDer::Pkcs8(k))) => k.secret_pkcs8_der().to_vec(),
            _ => return Err(err(FileProblem::NoPkcs8Key)),
        }
    } else {
        bytes
    };
    match kid {
        Some(kid) => AssertionSigner::from_pkcs8(kid, &der),
        None => AssertionSigner::from_pkcs8_thumbprint_kid(&der),
    }
    .map_err(|e| err(FileProblem::NotEd25519(e)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_testpki::TestPki;

    #[test]
    fn server_file_checks_give_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        let key = dir.path().join("k.pem");
        std::fs::write(&cert, "garbage").unwrap();
        std::fs::write(&key, "garbage").unwrap();
        let e = load_server_key(&cert, &key).unwrap_err().to_string();
        assert!(e.contains("no CERTIFICATE"), "{e}");
        let pki = TestPki::new("oneprotect.test");
        let ca = pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
        let a = ca.agent(&uuid::Uuid::new_v4().to_string());
        let b = ca.agent(&uuid::Uuid::new_v4().to_string());
        std::fs::write(&cert, &a.cert_pem).unwrap();
        std::fs::write(&key, &b.key_pem).unwrap();
        let e = load_server_key(&cert, &key).unwrap_err();
        assert!(matches!(e.problem, FileProblem::KeyMismatch(_)));
        let e = e.to_string();
        assert!(e.contains("does not match"), "{e}");
        std::fs::write(&key, &a.key_pem).unwrap();
        load_server_key(&cert, &key).unwrap();
    }

    #[test]
    fn errors_name_the_file_and_keep_the_cause() {
        let missing = Path::new("/nonexistent/signing.key");
        let e = load_signer(missing, Some("k")).unwrap_err();
        assert!(e
            .to_string()
            .starts_with("assertion signing key /nonexistent/signing.key: "));
        let io = std::error::Error::source(&e)
            .and_then(std::error::Error::source)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    }
}
