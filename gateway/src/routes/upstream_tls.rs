//! A route's upstream TLS material: the roots that verify its upstreams'
//! certificates and the client certificate the gateway presents to them,
//! loaded and checked once at start.

use std::path::Path;
use std::sync::Arc;

use crate::files::{certify, read_certs, read_private_key, FileError, FileProblem};

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

/// Loads a route's `tls_ca_file` and its `tls_client_cert` with
/// `tls_client_key` (`client`), checking them the way pingora will use them
/// (it panics on a certificate it cannot parse or a key it cannot load, once
/// per new upstream connection), so a bad file is a clear error at start
/// instead.
pub fn load_upstream_tls(
    ca_file: Option<&Path>,
    client: Option<(&Path, &Path)>,
) -> Result<UpstreamTls, FileError> {
    let mut out = UpstreamTls::default();
    let mut roots = rustls::RootCertStore::empty();
    if let Some(path) = ca_file {
        let ders = read_certs("upstream CA file", path)?;
        for d in &ders {
            roots
                .add(d.clone())
                .map_err(|e| FileError::new("upstream CA file", path, FileProblem::NotACa(e)))?;
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
    if let Some((cert, key)) = client {
        let chain = read_certs("upstream client certificate", cert)?;
        // Every block must parse (pingora parses each one and panics on
        // failure); webpki's parser is the stricter of the two.
        for c in &chain {
            webpki::EndEntityCert::try_from(c).map_err(|e| {
                FileError::new(
                    "upstream client certificate",
                    cert,
                    FileProblem::BadCertificate(e),
                )
            })?;
        }
        let key_der = read_private_key("upstream client key", key)?;
        certify("upstream client key", key, chain.clone(), &key_der)?;
        // What pingora builds per upstream connection, built once here.
        rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .and_then(|b| {
            b.with_root_certificates(roots)
                .with_client_auth_cert(chain.clone(), key_der.clone_key())
        })
        .map_err(|e| {
            FileError::new("upstream client certificate", cert, FileProblem::Refused(e))
        })?;
        out.client = Some(Arc::new(pingora::utils::tls::CertKey::new(
            chain.iter().map(|c| c.to_vec()).collect(),
            key_der.secret_der().to_vec(),
        )));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_testpki::TestPki;

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

        let none = load_upstream_tls(None, None).unwrap();
        assert!(none.ca.is_none() && none.client.is_none());
        assert_eq!(none.pool_group, 0);
        let full = load_upstream_tls(Some(&roots), Some((&chain, &key))).unwrap();
        assert_eq!(full.ca.as_ref().map(|c| c.len()), Some(1));
        // Another CA set, another pool group; the same set, the same group.
        let other_roots = w("other-roots.pem", &TestPki::new("other.test").root_pem());
        let other = load_upstream_tls(Some(&other_roots), None).unwrap();
        assert_ne!(full.pool_group, 0);
        assert_ne!(other.pool_group, full.pool_group);
        let again = load_upstream_tls(Some(&roots), None).unwrap();
        assert_eq!(again.pool_group, full.pool_group);
        let client = full.client.unwrap();
        assert_eq!(client.leaf().borrow_raw_cert(), &leaf.cert_der);
        assert_eq!(client.intermediates().len(), 1);

        let err = |r: Result<UpstreamTls, FileError>| r.unwrap_err().to_string();
        let e = err(load_upstream_tls(None, Some((&chain, &wrong_key))));
        assert!(e.contains("does not match"), "{e}");
        let e = err(load_upstream_tls(Some(&garbage), None));
        assert!(e.contains("upstream CA file"), "{e}");
        let e = err(load_upstream_tls(None, Some((&garbage, &key))));
        assert!(e.contains("upstream client certificate"), "{e}");
        let e = err(load_upstream_tls(None, Some((&chain, &garbage))));
        assert!(e.contains("upstream client key"), "{e}");
        let e = err(load_upstream_tls(
            Some(&dir.path().join("missing.pem")),
            None,
        ));
        assert!(e.contains("missing.pem"), "{e}");
    }
}
