//! JSON Web Keys (RFC 7517) for the assertion verification keys.
//!
//! The gateways sign identity assertions with Ed25519; upstreams verify them
//! with the public keys the enroll-api publishes as a JWK Set. Each key is an
//! `OKP` key (RFC 8037) with `crv: Ed25519`, `alg: EdDSA`, `use: sig` and a
//! `kid`. A key id left to default is the key's RFC 7638 thumbprint, so a new
//! key always gets a new id.

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

/// The longest JWK Set document a reader will parse (bounds work and memory).
pub const MAX_JWKS_BYTES: usize = 64 * 1024;

/// One Ed25519 verification key as a JWK.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Jwk {
    /// Key type; `OKP` for the keys this crate writes.
    pub kty: String,
    /// Curve; `Ed25519` for the keys this crate writes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crv: Option<String>,
    /// The public key, unpadded base64url.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub x: Option<String>,
    /// The key id the assertion header names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kid: Option<String>,
    /// Algorithm; `EdDSA`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alg: Option<String>,
    /// Public key use; `sig`.
    #[serde(rename = "use", default, skip_serializing_if = "Option::is_none")]
    pub use_: Option<String>,
}

/// A JWK Set (RFC 7517 §5).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JwkSet {
    /// The keys.
    pub keys: Vec<Jwk>,
}

/// Why a JWK Set could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwkError {
    /// Larger than [`MAX_JWKS_BYTES`].
    #[error("JWK Set is larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    /// Not a JSON object with a `keys` array of objects.
    #[error("JWK Set is not valid JSON of the RFC 7517 shape")]
    Malformed,
    /// An Ed25519 entry without a usable `kid` or 32-byte `x`.
    #[error("JWK {0:?} is not a usable Ed25519 key")]
    BadKey(String),
    /// Two usable keys share a `kid`.
    #[error("JWK Set names kid {0:?} twice")]
    DuplicateKid(String),
}

impl Jwk {
    /// The JWK of the raw Ed25519 public key `public_key` under `kid`.
    pub fn ed25519(kid: impl Into<String>, public_key: &[u8; 32]) -> Self {
        Self {
            kty: "OKP".into(),
            crv: Some("Ed25519".into()),
            x: Some(B64.encode(public_key)),
            kid: Some(kid.into()),
            alg: Some("EdDSA".into()),
            use_: Some("sig".into()),
        }
    }

    /// Whether this entry is meant as an Ed25519 signature key: `OKP`,
    /// `Ed25519`, and neither `alg` nor `use` naming something else.
    /// Other entries are skipped by readers, not refused (a set may carry
    /// keys for other consumers).
    fn is_ed25519_sig(&self) -> bool {
        self.kty == "OKP"
            && self.crv.as_deref() == Some("Ed25519")
            && self.alg.as_deref().is_none_or(|a| a == "EdDSA")
            && self.use_.as_deref().is_none_or(|u| u == "sig")
    }

    /// The key id and raw public key of an Ed25519 signature key.
    fn ed25519_key(&self) -> Result<(String, [u8; 32]), JwkError> {
        let kid = self.kid.clone().unwrap_or_default();
        let bad = || JwkError::BadKey(kid.clone());
        if kid.is_empty() || kid.len() > 128 {
            return Err(bad());
        }
        let x = self.x.as_deref().ok_or_else(bad)?;
        let raw = B64.decode(x).map_err(|_| bad())?;
        let key = <[u8; 32]>::try_from(raw).map_err(|_| bad())?;
        Ok((kid, key))
    }
}

impl JwkSet {
    /// Parses a JWK Set document and checks every Ed25519 signature entry.
    pub fn parse(bytes: &[u8]) -> Result<Self, JwkError> {
        if bytes.len() > MAX_JWKS_BYTES {
            return Err(JwkError::TooLarge);
        }
        let set: JwkSet = serde_json::from_slice(bytes).map_err(|_| JwkError::Malformed)?;
        set.ed25519_keys()?;
        Ok(set)
    }

    /// The Ed25519 signature keys, by key id; other entries are skipped.
    pub fn ed25519_keys(&self) -> Result<Vec<(String, [u8; 32])>, JwkError> {
        let mut out: Vec<(String, [u8; 32])> = Vec::new();
        for jwk in self.keys.iter().filter(|k| k.is_ed25519_sig()) {
            let (kid, key) = jwk.ed25519_key()?;
            if out.iter().any(|(k, _)| *k == kid) {
                return Err(JwkError::DuplicateKid(kid));
            }
            out.push((kid, key));
        }
        Ok(out)
    }
}

/// The RFC 7638 thumbprint of an Ed25519 public key (RFC 8037 §2): the
/// unpadded base64url SHA-256 of `{"crv":"Ed25519","kty":"OKP","x":"…"}`.
/// The default key id, so that a new key always gets a new id.
pub fn thumbprint(public_key: &[u8; 32]) -> String {
    let canonical = format!(
        r#"{{"crv":"Ed25519","kty":"OKP","x":"{}"}}"#,
        B64.encode(public_key)
    );
    B64.encode(ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 8037 Appendix A.2/A.3.
    const RFC8037_X: &str = "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo";

    fn rfc_key() -> [u8; 32] {
        B64.decode(RFC8037_X).unwrap().try_into().unwrap()
    }

    #[test]
    fn thumbprint_matches_rfc8037() {
        assert_eq!(
            thumbprint(&rfc_key()),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn round_trips_and_skips_foreign_entries() {
        let set = JwkSet {
            keys: vec![Jwk::ed25519("k1", &rfc_key())],
        };
        let json = serde_json::to_string(&set).unwrap();
        assert!(json.contains(r#""use":"sig""#), "{json}");
        let mixed = format!(
            r#"{{"keys":[{{"kty":"RSA","n":"x","e":"AQAB","kid":"r"}},{}, {{"kty":"OKP","crv":"X25519","x":"{RFC8037_X}","kid":"dh"}}]}}"#,
            &json[9..json.len() - 2]
        );
        let parsed = JwkSet::parse(mixed.as_bytes()).unwrap();
        assert_eq!(
            parsed.ed25519_keys().unwrap(),
            vec![("k1".to_string(), rfc_key())]
        );
    }

    #[test]
    fn refuses_bad_sets() {
        for (doc, want) in [
            ("[]", JwkError::Malformed),
            (r#"{"keys":{}}"#, JwkError::Malformed),
            (
                r#"{"keys":[{"kty":"OKP","crv":"Ed25519","x":"AAAA","kid":"short"}]}"#,
                JwkError::BadKey("short".into()),
            ),
            (
                &format!(r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{RFC8037_X}"}}]}}"#),
                JwkError::BadKey(String::new()),
            ),
            (
                &format!(
                    r#"{{"keys":[{{"kty":"OKP","crv":"Ed25519","x":"{RFC8037_X}","kid":"a"}},{{"kty":"OKP","crv":"Ed25519","x":"{RFC8037_X}","kid":"a"}}]}}"#
                ),
                JwkError::DuplicateKid("a".into()),
            ),
        ] {
            assert_eq!(JwkSet::parse(doc.as_bytes()), Err(want), "{doc}");
        }
        let big = vec![b' '; MAX_JWKS_BYTES + 1];
        assert_eq!(JwkSet::parse(&big), Err(JwkError::TooLarge));
    }
}
