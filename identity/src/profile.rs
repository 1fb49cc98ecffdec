//! The certificate profile: what the CA issues and what the gateway accepts.
//!
//! Agent leaves follow SPIFFE's X509-SVID rules: exactly one URI SAN, CA=false,
//! key usage digitalSignature only, extended key usage clientAuth. Tenant
//! issuing CAs carry their own URI SAN and pathlen 0, so a tenant CA can issue
//! agents and nothing else.

use std::time::Duration;

/// Default lifetime of an agent leaf certificate: 30 days. Configurable per
/// tenant in the enroll-api.
pub const DEFAULT_LEAF_LIFETIME: Duration = Duration::from_secs(30 * 24 * 3600);
/// Shortest leaf lifetime the enroll-api accepts in configuration: 60 seconds
/// (tests and demos rotate fast; production should not go below hours).
pub const MIN_LEAF_LIFETIME: Duration = Duration::from_secs(60);
/// Longest leaf lifetime the enroll-api accepts in configuration: 398 days.
pub const MAX_LEAF_LIFETIME: Duration = Duration::from_secs(398 * 24 * 3600);
/// Lifetime of a tenant issuing CA: 5 years.
pub const TENANT_CA_LIFETIME: Duration = Duration::from_secs(5 * 365 * 24 * 3600);
/// Lifetime of the platform root CA: 10 years.
pub const ROOT_CA_LIFETIME: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// NotBefore is set this far in the past, so a device whose clock runs a
/// little behind still accepts a freshly issued certificate.
pub const NOT_BEFORE_CUSHION: Duration = Duration::from_secs(5 * 60);
/// The agent rotates when this fraction of its certificate's lifetime has
/// passed (numerator, denominator): two thirds.
pub const ROTATE_AT_FRACTION: (u32, u32) = (2, 3);
/// Smallest RSA modulus accepted in a CSR.
pub const MIN_RSA_BITS: usize = 2048;
/// Largest RSA modulus accepted in a CSR (bounds the verification cost).
pub const MAX_RSA_BITS: usize = 8192;
/// Size of a certificate serial number in bytes (128 random bits).
pub const SERIAL_BYTES: usize = 16;

/// A public key algorithm accepted for agent keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyAlgorithm {
    /// ECDSA on NIST P-256 with SHA-256 (the default the agent generates).
    EcdsaP256,
    /// ECDSA on NIST P-384 with SHA-384.
    EcdsaP384,
    /// Ed25519.
    Ed25519,
    /// RSA with at least [`MIN_RSA_BITS`] bits (PKCS#1 v1.5 or PSS signatures).
    Rsa,
}

impl KeyAlgorithm {
    /// Every accepted algorithm.
    pub const ALL: [KeyAlgorithm; 4] = [
        KeyAlgorithm::EcdsaP256,
        KeyAlgorithm::EcdsaP384,
        KeyAlgorithm::Ed25519,
        KeyAlgorithm::Rsa,
    ];
}

/// When an agent should rotate a certificate valid from `not_before` to
/// `not_after` (unix seconds): at [`ROTATE_AT_FRACTION`] of its lifetime.
pub fn rotate_after(not_before: i64, not_after: i64) -> i64 {
    let (num, den) = ROTATE_AT_FRACTION;
    let lifetime = (not_after - not_before).max(0);
    not_before + lifetime * i64::from(num) / i64::from(den)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_after_is_two_thirds() {
        assert_eq!(rotate_after(0, 300), 200);
        assert_eq!(rotate_after(1000, 1000), 1000);
        assert_eq!(rotate_after(1000, 900), 1000);
    }
}
