//! The one step from a [`Config`] to the material the gateway runs on: the
//! configuration is validated and every file it names is read, once, here.
//! [`crate::server::build`] starts from the result; `oneprotect-gateway
//! --check` and `--print-assertion-key` stop at it.

use std::sync::Arc;

use oneprotect_identity::AssertionSigner;
use rustls::sign::CertifiedKey;

use crate::config::{Config, ConfigError};
use crate::files::{load_server_key, load_signer, FileError};
use crate::routes::{load_upstream_tls, UpstreamTls};
use crate::tls::TrustStore;

/// Why a configuration could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    /// A value or combination is refused.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A file is missing or does not parse.
    #[error(transparent)]
    File(#[from] FileError),
}

/// A validated configuration with its files loaded.
pub struct Prepared {
    /// The configuration.
    pub config: Config,
    /// The listener's certificate chain and key (`listener.cert`,
    /// `listener.key`).
    pub server_key: Arc<CertifiedKey>,
    /// The trust bundle (`listener.trust_bundle`; the store reloads it).
    pub trust: TrustStore,
    /// The assertion signing key (`assertion.key_file`); `None` when unset,
    /// and the gateway then signs with an ephemeral key.
    pub signer: Option<AssertionSigner>,
    /// Each route's upstream TLS material, in the order of `config.routes`.
    pub upstream_tls: Vec<UpstreamTls>,
}

impl std::fmt::Debug for Prepared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Prepared")
            .field("trust_anchors", &self.trust.current().len())
            .field("assertion_kid", &self.signer.as_ref().map(|s| s.kid()))
            .field("upstream_tls", &self.upstream_tls)
            .finish_non_exhaustive()
    }
}

impl Prepared {
    /// Validates `config` ([`Config::validate`]) and loads its files: the
    /// server certificate and key, the trust bundle, the assertion signing
    /// key and each route's upstream TLS files, each checked the way it
    /// will be used (pingora panics on a bad file, so this is where a bad
    /// one becomes a clear error).
    pub fn load(config: Config) -> Result<Self, PrepareError> {
        let config = config.validate()?;
        let l = &config.listener;
        let server_key = load_server_key(&l.cert, &l.key)?;
        let trust = TrustStore::load(&l.trust_bundle)?;
        let signer = match &config.assertion.key_file {
            Some(path) => Some(load_signer(path, config.assertion.kid.as_deref())?),
            None => None,
        };
        let upstream_tls = config
            .routes
            .iter()
            .map(|r| load_upstream_tls(r.tls_ca_file.as_deref(), r.tls_client_files()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            config,
            server_key,
            trust,
            signer,
            upstream_tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::MINIMAL;

    #[test]
    fn missing_files_are_reported_clearly() {
        let c = Config::from_toml(MINIMAL, Path::new("t")).unwrap();
        let e = Prepared::load(c).unwrap_err();
        assert!(matches!(e, PrepareError::File(_)));
        let e = e.to_string();
        assert!(e.contains("/nonexistent/cert.pem"), "{e}");
    }

    #[test]
    fn the_config_is_validated_first() {
        let text = format!("{MINIMAL}\n[runtime]\nthreads = 0\n");
        let c = Config::from_toml(&text, Path::new("t")).unwrap();
        let e = Prepared::load(c).unwrap_err();
        assert!(matches!(e, PrepareError::Config(_)), "{e}");
    }

    #[test]
    fn every_file_is_loaded() {
        let dir = tempfile::tempdir().unwrap();
        let w = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            p.display().to_string()
        };
        let pki = oneprotect_testpki::TestPki::new("oneprotect.test");
        let ca = pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
        let server = ca.agent(&uuid::Uuid::new_v4().to_string());
        let (_, pkcs8) = AssertionSigner::generate("k").unwrap();
        let key_file = dir.path().join("assertion.der");
        std::fs::write(&key_file, pkcs8).unwrap();
        let text = format!(
            "[listener]\ncert = \"{}\"\nkey = \"{}\"\ntrust_bundle = \"{}\"\n\
             [assertion]\nkey_file = \"{}\"\nkid = \"k\"\n\
             [[routes]]\nprefix = \"/api\"\nupstreams = [\"127.0.0.1:1\"]\ntls = true\n\
             sni = \"up.test\"\ntls_ca_file = \"{}\"\n",
            w("s.pem", &server.cert_pem),
            w("s.key", &server.key_pem),
            w("b.pem", &pki.root_pem()),
            key_file.display(),
            w("ca.pem", &pki.root_pem()),
        );
        let p = Prepared::load(Config::from_toml(&text, Path::new("t")).unwrap()).unwrap();
        assert_eq!(p.trust.current().len(), 1);
        assert_eq!(p.signer.as_ref().map(|s| s.kid()), Some("k"));
        assert_eq!(p.upstream_tls.len(), 1);
        assert_ne!(p.upstream_tls[0].pool_group, 0);
    }
}
