//! The signed identity assertion, made once per identity and route and
//! re-signed shortly before it expires: a signature costs as much as a whole
//! proxied request, so the per-request cost must be a header copy.
//!
//! Every route signs for its own audience (`routes.audience`, default the
//! route's name), so an assertion one upstream saw cannot be replayed to
//! another. The signing key can be replaced while the gateway runs
//! (`assertion.key_file` changed, then SIGHUP or the file poll): the next
//! request on every connection gets an assertion under the new key id.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use http::HeaderValue;
use oneprotect_identity::{AgentIdentity, AssertionClaims, AssertionSigner, CertFingerprint};

use crate::config::AssertionConfig;
use crate::files::{load_signer, FileError};

/// One signed assertion as a ready header value.
#[derive(Debug)]
pub struct SignedAssertion {
    /// The compact JWT as a header value (never logged).
    pub value: HeaderValue,
    /// Unix seconds after which the gateway signs a new one.
    pub refresh_at: i64,
    /// The route (index in the configuration) it was signed for.
    pub route: u32,
    /// The signing key generation it was signed under.
    pub generation: u64,
}

/// Why a changed signing key file was not applied.
#[derive(Debug, thiserror::Error)]
pub enum KeyReloadError {
    /// The file could not be read or is not an Ed25519 PKCS#8 key.
    #[error(transparent)]
    File(#[from] FileError),
    /// `assertion.kid` is set, and a different key under the same id would
    /// make verifiers that cached the old key refuse every new assertion.
    #[error(
        "assertion.key_file holds a new key but assertion.kid ({0:?}) is pinned: a new key \
         needs a new kid; leave kid unset (the key's thumbprint) or restart with a new kid"
    )]
    PinnedKid(String),
}

/// Signs assertions and shares them between connections of one certificate.
pub struct AssertionService {
    signer: ArcSwap<AssertionSigner>,
    generation: AtomicU64,
    key_file: Option<PathBuf>,
    pinned_kid: Option<String>,
    issuer: String,
    lifetime: i64,
    refresh_before: i64,
    cache: moka::sync::Cache<(CertFingerprint, u32), Arc<SignedAssertion>>,
}

impl std::fmt::Debug for AssertionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionService")
            .field("kid", &self.kid())
            .finish_non_exhaustive()
    }
}

impl AssertionService {
    /// A service signing with `signer` as configured by `cfg`.
    pub fn new(signer: AssertionSigner, cfg: &AssertionConfig) -> Self {
        let lifetime = cfg.lifetime_secs as i64;
        Self {
            signer: ArcSwap::from_pointee(signer),
            generation: AtomicU64::new(0),
            key_file: cfg.key_file.clone(),
            pinned_kid: cfg.kid.clone(),
            issuer: cfg.issuer.clone(),
            lifetime,
            refresh_before: cfg.refresh_before_secs as i64,
            cache: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(cfg.lifetime_secs))
                .build(),
        }
    }

    /// The current signer's key id.
    pub fn kid(&self) -> String {
        self.signer.load().kid().to_owned()
    }

    /// The current signer's public key (for upstream verifiers).
    pub fn public_key(&self) -> [u8; 32] {
        self.signer.load().public_key()
    }

    /// The current key generation (bumped by every applied key change).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// Re-reads `assertion.key_file`. `Ok(None)` when there is no file or
    /// it holds the key in use; `Ok(Some(kid))` when a new key now signs.
    pub fn reload(&self) -> Result<Option<String>, KeyReloadError> {
        let Some(path) = &self.key_file else {
            return Ok(None);
        };
        let fresh = load_signer(path, self.pinned_kid.as_deref())?;
        if fresh.public_key() == self.public_key() {
            return Ok(None);
        }
        if let Some(kid) = &self.pinned_kid {
            return Err(KeyReloadError::PinnedKid(kid.clone()));
        }
        let kid = fresh.kid().to_owned();
        self.signer.store(Arc::new(fresh));
        self.generation.fetch_add(1, Ordering::AcqRel);
        self.cache.invalidate_all();
        Ok(Some(kid))
    }

    /// A current assertion for `id` on route `route` (its index) with
    /// audience `aud`: the shared one when still fresh and signed by the
    /// current key, otherwise a new signature.
    pub fn get(&self, id: &AgentIdentity, route: u32, aud: &str, now: i64) -> Arc<SignedAssertion> {
        let generation = self.generation();
        let key = (id.fingerprint(), route);
        if let Some(s) = self.cache.get(&key) {
            if now < s.refresh_at && s.generation == generation {
                return s;
            }
        }
        let fresh = Arc::new(self.sign(id, route, aud, generation, now));
        self.cache.insert(key, fresh.clone());
        fresh
    }

    fn sign(
        &self,
        id: &AgentIdentity,
        route: u32,
        aud: &str,
        generation: u64,
        now: i64,
    ) -> SignedAssertion {
        // Never outlive the certificate.
        let exp = (now + self.lifetime).min(id.not_after()).max(now + 1);
        let claims = AssertionClaims {
            iss: self.issuer.clone(),
            sub: id.uri().clone(),
            aud: aud.to_owned(),
            iat: now,
            exp,
            tenant_id: id.tenant(),
            agent_id: id.agent(),
            serial: id.serial(),
            cert_sha256: id.fingerprint(),
            cert_not_after: id.not_after(),
        };
        let jwt = self.signer.load().sign(&claims);
        SignedAssertion {
            // base64url and dots only.
            value: HeaderValue::from_str(&jwt).expect("a compact JWT is a valid header value"),
            refresh_at: (exp - self.refresh_before).max(now),
            route,
            generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key_file(dir: &std::path::Path, name: &str) -> (PathBuf, [u8; 32]) {
        let (signer, pkcs8) = AssertionSigner::generate("x").unwrap();
        let path = dir.join(name);
        std::fs::write(&path, pkcs8).unwrap();
        (path, signer.public_key())
    }

    fn service(file: &std::path::Path, kid: Option<&str>) -> AssertionService {
        let cfg = AssertionConfig {
            key_file: Some(file.to_owned()),
            kid: kid.map(str::to_owned),
            ..AssertionConfig::default()
        };
        let signer = load_signer(file, kid).unwrap();
        AssertionService::new(signer, &cfg)
    }

    #[test]
    fn a_new_key_file_signs_at_once_under_its_thumbprint() {
        let dir = tempfile::tempdir().unwrap();
        let (file, first) = key_file(dir.path(), "k");
        let svc = service(&file, None);
        assert_eq!(svc.kid(), oneprotect_identity::jwk::thumbprint(&first));
        // The same key: nothing to do.
        assert_eq!(svc.reload().unwrap(), None);
        assert_eq!(svc.generation(), 0);
        // A new key renamed over the file: a new kid and generation.
        let (staged, second) = key_file(dir.path(), "staged");
        std::fs::rename(&staged, &file).unwrap();
        let kid = svc.reload().unwrap().unwrap();
        assert_eq!(kid, oneprotect_identity::jwk::thumbprint(&second));
        assert_eq!((svc.kid(), svc.public_key()), (kid, second));
        assert_eq!(svc.generation(), 1);
        // A file that is not a key: refused, the key in use stays.
        std::fs::write(&file, b"not a key").unwrap();
        assert!(matches!(svc.reload(), Err(KeyReloadError::File(_))));
        assert_eq!(svc.public_key(), second);
    }

    #[test]
    fn a_pinned_kid_refuses_a_different_key() {
        let dir = tempfile::tempdir().unwrap();
        let (file, first) = key_file(dir.path(), "k");
        let svc = service(&file, Some("gateway-1"));
        let (staged, _) = key_file(dir.path(), "staged");
        std::fs::rename(&staged, &file).unwrap();
        let e = svc.reload().unwrap_err();
        assert!(matches!(e, KeyReloadError::PinnedKid(ref k) if k == "gateway-1"));
        assert!(e.to_string().contains("leave kid unset"), "{e}");
        assert_eq!(
            (svc.kid(), svc.public_key()),
            ("gateway-1".to_owned(), first)
        );
        assert_eq!(svc.generation(), 0);
    }
}
