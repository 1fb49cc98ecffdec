//! The signed identity assertion the gateway hands upstreams.
//!
//! A compact JWT (RFC 7519) signed with Ed25519 (`alg: EdDSA`, RFC 8037),
//! carrying the verified identity of the client certificate. Upstreams verify
//! it with [`AssertionVerifier`] instead of trusting the network path: a
//! request that reached them some other way has no valid assertion.
//!
//! Lifetimes are short (at most [`MAX_LIFETIME_SECS`]) and the gateway signs
//! once per connection or identity and re-signs shortly before expiry, so the
//! per-request cost is a header copy, not a signature.

use std::collections::HashMap;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use ring::signature::{self, Ed25519KeyPair, KeyPair as _};
use serde::{Deserialize, Serialize};

use crate::ids::{AgentId, CertFingerprint, SerialNumber, TenantId};
use crate::uri::AgentUri;

/// The longest lifetime (`exp - iat`) a verifier accepts: 60 seconds.
pub const MAX_LIFETIME_SECS: i64 = 60;
/// Clock skew tolerated between gateway and upstream: 5 seconds.
pub const DEFAULT_LEEWAY_SECS: i64 = 5;
/// The issuer the gateway puts in `iss` unless configured otherwise.
pub const DEFAULT_ISSUER: &str = "oneprotect-gateway";
/// The longest assertion the verifier will look at (bounds parsing work).
const MAX_TOKEN_LEN: usize = 4096;

/// The claims of an identity assertion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionClaims {
    /// Issuer: the gateway fleet's name.
    pub iss: String,
    /// Subject: the agent's SPIFFE identity URI.
    pub sub: AgentUri,
    /// Audience: the upstream service(s) this assertion is for.
    pub aud: String,
    /// Issued at, unix seconds.
    pub iat: i64,
    /// Expires at, unix seconds.
    pub exp: i64,
    /// The tenant (also in `sub`; repeated for convenience, checked equal).
    pub tenant_id: TenantId,
    /// The agent (also in `sub`; checked equal).
    pub agent_id: AgentId,
    /// The client certificate's serial.
    pub serial: SerialNumber,
    /// The client certificate's SHA-256 fingerprint (hex).
    pub cert_sha256: CertFingerprint,
    /// The client certificate's NotAfter, unix seconds.
    pub cert_not_after: i64,
}

/// Why an assertion was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AssertionError {
    /// Not three base64url parts, bad base64, bad JSON, or too long.
    #[error("assertion is malformed")]
    Malformed,
    /// The header names an algorithm other than EdDSA, or carries `crit`.
    #[error("assertion uses an unsupported algorithm")]
    UnsupportedAlgorithm,
    /// The header's `kid` is not a key this verifier trusts.
    #[error("assertion is signed by an unknown key")]
    UnknownKey,
    /// The signature does not verify.
    #[error("assertion signature is invalid")]
    BadSignature,
    /// `exp` is in the past (beyond the leeway).
    #[error("assertion has expired")]
    Expired,
    /// `iat` is in the future (beyond the leeway).
    #[error("assertion is not yet valid")]
    NotYetValid,
    /// `exp - iat` exceeds [`MAX_LIFETIME_SECS`], or is not positive.
    #[error("assertion lifetime is too long")]
    LifetimeTooLong,
    /// `aud` is not the verifier's audience.
    #[error("assertion is for another audience")]
    WrongAudience,
    /// `iss` is not the verifier's issuer.
    #[error("assertion is from another issuer")]
    WrongIssuer,
    /// `tenant_id`/`agent_id` disagree with `sub`.
    #[error("assertion claims are inconsistent")]
    InconsistentClaims,
}

/// Why a signing key could not be loaded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid Ed25519 PKCS#8 key")]
pub struct KeyError;

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    typ: Option<String>,
    kid: String,
    #[serde(default, skip_serializing)]
    crit: Option<serde_json::Value>,
}

/// Signs assertions with one Ed25519 key.
pub struct AssertionSigner {
    key: Ed25519KeyPair,
    kid: String,
    encoded_header: String,
}

impl fmt::Debug for AssertionSigner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AssertionSigner")
            .field("kid", &self.kid)
            .field("key", &"[redacted]")
            .finish()
    }
}

impl AssertionSigner {
    /// Loads a signer from a PKCS#8 (v1 or v2) Ed25519 private key.
    pub fn from_pkcs8(kid: impl Into<String>, pkcs8: &[u8]) -> Result<Self, KeyError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|_| KeyError)?;
        let kid = kid.into();
        let header = Header {
            alg: "EdDSA".into(),
            typ: Some("JWT".into()),
            kid: kid.clone(),
            crit: None,
        };
        // A struct of strings always serialises.
        let encoded_header = B64.encode(serde_json::to_vec(&header).expect("header serialises"));
        Ok(Self {
            key,
            kid,
            encoded_header,
        })
    }

    /// Loads a signer whose key id is the key's RFC 7638 thumbprint
    /// ([`crate::jwk::thumbprint`]): a new key always gets a new id.
    pub fn from_pkcs8_thumbprint_kid(pkcs8: &[u8]) -> Result<Self, KeyError> {
        let key = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).map_err(|_| KeyError)?;
        let public: [u8; 32] = key.public_key().as_ref().try_into().map_err(|_| KeyError)?;
        Self::from_pkcs8(crate::jwk::thumbprint(&public), pkcs8)
    }

    /// Generates a fresh key; returns the signer and its PKCS#8 document (to
    /// store with mode 0600).
    pub fn generate(kid: impl Into<String>) -> Result<(Self, Vec<u8>), KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng).map_err(|_| KeyError)?;
        let signer = Self::from_pkcs8(kid, pkcs8.as_ref())?;
        Ok((signer, pkcs8.as_ref().to_vec()))
    }

    /// The key id put in every assertion's header.
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The raw 32-byte Ed25519 public key, for [`AssertionVerifier::add_key`].
    pub fn public_key(&self) -> [u8; 32] {
        let mut out = [0u8; 32];
        out.copy_from_slice(self.key.public_key().as_ref());
        out
    }

    /// Signs `claims` into a compact JWT.
    pub fn sign(&self, claims: &AssertionClaims) -> String {
        // Claims are strings and integers: serialisation cannot fail.
        let payload = B64.encode(serde_json::to_vec(claims).expect("claims serialise"));
        let mut out = String::with_capacity(self.encoded_header.len() + payload.len() + 90);
        out.push_str(&self.encoded_header);
        out.push('.');
        out.push_str(&payload);
        let sig = self.key.sign(out.as_bytes());
        out.push('.');
        B64.encode_string(sig.as_ref(), &mut out);
        out
    }
}

/// A verified assertion.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedAssertion {
    /// The key id that signed it.
    pub kid: String,
    /// The claims.
    pub claims: AssertionClaims,
}

/// Verifies assertions: signature by a trusted key, issuer, audience, expiry,
/// lifetime and claim consistency.
#[derive(Debug, Clone)]
pub struct AssertionVerifier {
    keys: HashMap<String, [u8; 32]>,
    issuer: String,
    audience: String,
    leeway: i64,
}

impl AssertionVerifier {
    /// A verifier for `audience` and the default issuer, trusting no key yet.
    pub fn new(audience: impl Into<String>) -> Self {
        Self {
            keys: HashMap::new(),
            issuer: DEFAULT_ISSUER.into(),
            audience: audience.into(),
            leeway: DEFAULT_LEEWAY_SECS,
        }
    }

    /// Accepts assertions from `issuer` instead of [`DEFAULT_ISSUER`].
    pub fn with_issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuer = issuer.into();
        self
    }

    /// Trusts the raw Ed25519 public key `public_key` under `kid`.
    pub fn add_key(mut self, kid: impl Into<String>, public_key: [u8; 32]) -> Self {
        self.keys.insert(kid.into(), public_key);
        self
    }

    /// Trusts every Ed25519 signature key of a JWK Set (as the enroll-api
    /// publishes them), in addition to the keys already trusted.
    pub fn add_jwks(mut self, set: &crate::jwk::JwkSet) -> Result<Self, crate::jwk::JwkError> {
        self.keys.extend(set.ed25519_keys()?);
        Ok(self)
    }

    /// Replaces the trusted keys (a refreshed JWK Set).
    pub fn set_keys(&mut self, keys: impl IntoIterator<Item = (String, [u8; 32])>) {
        self.keys = keys.into_iter().collect();
    }

    /// Whether a key with id `kid` is trusted.
    pub fn has_key(&self, kid: &str) -> bool {
        self.keys.contains_key(kid)
    }

    /// The audience this verifier requires.
    pub fn audience(&self) -> &str {
        &self.audience
    }

    /// Verifies `token` at time `now` (unix seconds).
    pub fn verify(&self, token: &str, now: i64) -> Result<VerifiedAssertion, AssertionError> {
        if token.len() > MAX_TOKEN_LEN {
            return Err(AssertionError::Malformed);
        }
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(AssertionError::Malformed);
        };
        let header: Header = B64
            .decode(h)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(AssertionError::Malformed)?;
        if header.alg != "EdDSA" || header.crit.is_some() {
            return Err(AssertionError::UnsupportedAlgorithm);
        }
        let key = self
            .keys
            .get(&header.kid)
            .ok_or(AssertionError::UnknownKey)?;
        let sig = B64.decode(s).map_err(|_| AssertionError::Malformed)?;
        let signed = &token[..h.len() + 1 + p.len()];
        signature::UnparsedPublicKey::new(&signature::ED25519, key)
            .verify(signed.as_bytes(), &sig)
            .map_err(|_| AssertionError::BadSignature)?;
        let claims: AssertionClaims = B64
            .decode(p)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .ok_or(AssertionError::Malformed)?;
        if claims.iss != self.issuer {
            return Err(AssertionError::WrongIssuer);
        }
        if claims.aud != self.audience {
            return Err(AssertionError::WrongAudience);
        }
        let lifetime = claims.exp - claims.iat;
        if lifetime <= 0 || lifetime > MAX_LIFETIME_SECS {
            return Err(AssertionError::LifetimeTooLong);
        }
        if now > claims.exp + self.leeway {
            return Err(AssertionError::Expired);
        }
        if claims.iat > now + self.leeway {
            return Err(AssertionError::NotYetValid);
        }
        if claims.sub.tenant() != claims.tenant_id || claims.sub.agent() != claims.agent_id {
            return Err(AssertionError::InconsistentClaims);
        }
        Ok(VerifiedAssertion {
            kid: header.kid,
            claims,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(now: i64) -> AssertionClaims {
        let sub: AgentUri = "spiffe://oneprotect.local/tenant/6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10/agent/0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b".parse().unwrap();
        AssertionClaims {
            iss: DEFAULT_ISSUER.into(),
            tenant_id: sub.tenant(),
            agent_id: sub.agent(),
            sub,
            aud: "workers".into(),
            iat: now,
            exp: now + 60,
            serial: "abcdef".parse().unwrap(),
            cert_sha256: CertFingerprint::of_der(b"cert"),
            cert_not_after: now + 86400,
        }
    }

    fn setup() -> (AssertionSigner, AssertionVerifier) {
        let (signer, _) = AssertionSigner::generate("k1").unwrap();
        let verifier = AssertionVerifier::new("workers").add_key("k1", signer.public_key());
        (signer, verifier)
    }

    #[test]
    fn signs_and_verifies() {
        let (signer, verifier) = setup();
        let c = claims(1000);
        let token = signer.sign(&c);
        let v = verifier.verify(&token, 1030).unwrap();
        assert_eq!(v.claims, c);
        assert_eq!(v.kid, "k1");
        assert!(!format!("{signer:?}").contains("key: ["));
    }

    #[test]
    fn refuses_tampering_and_foreign_keys() {
        let (signer, verifier) = setup();
        let token = signer.sign(&claims(1000));
        let mut forged = claims(1000);
        forged.tenant_id = TenantId::random();
        let forged_payload = B64.encode(serde_json::to_vec(&forged).unwrap());
        let parts: Vec<&str> = token.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(
            verifier.verify(&tampered, 1000),
            Err(AssertionError::BadSignature)
        );

        let (other, _) = AssertionSigner::generate("k1").unwrap();
        assert_eq!(
            verifier.verify(&other.sign(&claims(1000)), 1000),
            Err(AssertionError::BadSignature)
        );
        let (other, _) = AssertionSigner::generate("k2").unwrap();
        assert_eq!(
            verifier.verify(&other.sign(&claims(1000)), 1000),
            Err(AssertionError::UnknownKey)
        );
    }

    #[test]
    fn refuses_expired_early_long_lived_and_misaddressed() {
        let (signer, verifier) = setup();
        let token = signer.sign(&claims(1000));
        assert_eq!(verifier.verify(&token, 1066), Err(AssertionError::Expired));
        assert!(verifier.verify(&token, 1065).is_ok());
        assert_eq!(
            verifier.verify(&token, 994),
            Err(AssertionError::NotYetValid)
        );

        let mut long = claims(1000);
        long.exp = 1000 + MAX_LIFETIME_SECS + 1;
        assert_eq!(
            verifier.verify(&signer.sign(&long), 1000),
            Err(AssertionError::LifetimeTooLong)
        );

        let mut aud = claims(1000);
        aud.aud = "other".into();
        assert_eq!(
            verifier.verify(&signer.sign(&aud), 1000),
            Err(AssertionError::WrongAudience)
        );

        let mut iss = claims(1000);
        iss.iss = "someone".into();
        assert_eq!(
            verifier.verify(&signer.sign(&iss), 1000),
            Err(AssertionError::WrongIssuer)
        );

        let mut inconsistent = claims(1000);
        inconsistent.agent_id = AgentId::random();
        assert_eq!(
            verifier.verify(&signer.sign(&inconsistent), 1000),
            Err(AssertionError::InconsistentClaims)
        );
    }

    #[test]
    fn refuses_malformed_and_other_algorithms() {
        let (signer, verifier) = setup();
        for bad in ["", "a.b", "a.b.c.d", "!!!.x.y", &"a".repeat(5000)] {
            assert_eq!(
                verifier.verify(bad, 1000),
                Err(AssertionError::Malformed),
                "{bad}"
            );
        }
        let token = signer.sign(&claims(1000));
        let rest = token.split_once('.').unwrap().1;
        for header in [
            r#"{"alg":"none","kid":"k1"}"#,
            r#"{"alg":"HS256","kid":"k1"}"#,
            r#"{"alg":"EdDSA","kid":"k1","crit":["exp"]}"#,
        ] {
            let t = format!("{}.{rest}", B64.encode(header));
            assert_eq!(
                verifier.verify(&t, 1000),
                Err(AssertionError::UnsupportedAlgorithm)
            );
        }
    }
}
