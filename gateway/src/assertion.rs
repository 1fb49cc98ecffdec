//! The signed identity assertion, made once per identity and re-signed
//! shortly before it expires: a signature costs as much as a whole proxied
//! request, so the per-request cost must be a header copy.

use std::sync::Arc;
use std::time::Duration;

use http::HeaderValue;
use oneprotect_identity::{AgentIdentity, AssertionClaims, AssertionSigner, CertFingerprint};

use crate::config::AssertionConfig;

/// One signed assertion as a ready header value.
#[derive(Debug)]
pub struct SignedAssertion {
    /// The compact JWT as a header value (never logged).
    pub value: HeaderValue,
    /// Unix seconds after which the gateway signs a new one.
    pub refresh_at: i64,
}

/// Signs assertions and shares them between connections of one certificate.
pub struct AssertionService {
    signer: AssertionSigner,
    issuer: String,
    audience: String,
    lifetime: i64,
    refresh_before: i64,
    cache: moka::sync::Cache<CertFingerprint, Arc<SignedAssertion>>,
}

impl std::fmt::Debug for AssertionService {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AssertionService")
            .field("kid", &self.signer.kid())
            .finish_non_exhaustive()
    }
}

impl AssertionService {
    /// A service signing with `signer` as configured by `cfg`.
    pub fn new(signer: AssertionSigner, cfg: &AssertionConfig) -> Self {
        let lifetime = cfg.lifetime_secs as i64;
        Self {
            signer,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            lifetime,
            refresh_before: cfg.refresh_before_secs as i64,
            cache: moka::sync::Cache::builder()
                .max_capacity(100_000)
                .time_to_live(Duration::from_secs(cfg.lifetime_secs))
                .build(),
        }
    }

    /// The signer's key id.
    pub fn kid(&self) -> &str {
        self.signer.kid()
    }

    /// The signer's public key (for upstream verifiers).
    pub fn public_key(&self) -> [u8; 32] {
        self.signer.public_key()
    }

    /// A current assertion for `id`: the shared one when still fresh,
    /// otherwise a new signature.
    pub fn get(&self, id: &AgentIdentity, now: i64) -> Arc<SignedAssertion> {
        if let Some(s) = self.cache.get(&id.fingerprint()) {
            if now < s.refresh_at {
                return s;
            }
        }
        let fresh = Arc::new(self.sign(id, now));
        self.cache.insert(id.fingerprint(), fresh.clone());
        fresh
    }

    fn sign(&self, id: &AgentIdentity, now: i64) -> SignedAssertion {
        // Never outlive the certificate.
        let exp = (now + self.lifetime).min(id.not_after()).max(now + 1);
        let claims = AssertionClaims {
            iss: self.issuer.clone(),
            sub: id.uri().clone(),
            aud: self.audience.clone(),
            iat: now,
            exp,
            tenant_id: id.tenant(),
            agent_id: id.agent(),
            serial: id.serial(),
            cert_sha256: id.fingerprint(),
            cert_not_after: id.not_after(),
        };
        let jwt = self.signer.sign(&claims);
        SignedAssertion {
            // base64url and dots only.
            value: HeaderValue::from_str(&jwt).expect("a compact JWT is a valid header value"),
            refresh_at: (exp - self.refresh_before).max(now),
        }
    }
}
