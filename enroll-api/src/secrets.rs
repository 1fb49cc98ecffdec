//! Bearer secrets: enrollment tokens (`opet_…`) and admin keys (`opak_…`).
//!
//! A secret is a prefix (so secret scanners can spot it) and 32 random bytes
//! in unpadded base64url (43 characters, 256 bits). The store keeps only
//! HMAC-SHA256(pepper, secret): a leaked database does not reveal a usable
//! secret, and without the pepper the hashes cannot be brute-forced offline.
//! Look-ups go by the keyed hash, so the database compares HMAC outputs,
//! never secrets; an attacker cannot steer those bytes without the pepper,
//! which makes index-compare timing useless to them.

use std::io::Write;
use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::hmac;
use ring::rand::{SecureRandom, SystemRandom};

use oneprotect_identity::AdminKeySecret;

/// Prefix of an admin API key.
pub const ADMIN_KEY_PREFIX: &str = "opak_";
const SECRET_BYTES: usize = 32;
const ENCODED_LEN: usize = 43;
const PEPPER_BYTES: usize = 32;

/// Why a pepper could not be loaded or a secret generated.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// Reading or writing the pepper file failed.
    #[error("pepper file {path}: {source}")]
    Io {
        /// The file.
        path: std::path::PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The pepper file is not at least 32 bytes of base64url.
    #[error("pepper file {0} must hold at least 32 bytes, base64url encoded")]
    BadPepper(std::path::PathBuf),
    /// The pepper file does not exist and generation is off.
    #[error("pepper file {0} is missing")]
    Missing(std::path::PathBuf),
    /// The system random number generator failed.
    #[error("random number generator failed")]
    Random,
}

/// The server-side HMAC key for secret hashes. `Debug` prints nothing of it.
#[derive(Clone)]
pub struct Pepper(hmac::Key);

impl std::fmt::Debug for Pepper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Pepper([redacted])")
    }
}

impl Pepper {
    /// A pepper from raw bytes.
    pub fn from_bytes(bytes: &[u8]) -> Self {
        Self(hmac::Key::new(hmac::HMAC_SHA256, bytes))
    }

    /// Loads the pepper from `path` (base64url text). With `generate`, a
    /// missing file is created with a fresh random pepper, mode 0600.
    pub fn load(path: &Path, generate: bool) -> Result<Self, SecretError> {
        let io = |source| SecretError::Io {
            path: path.to_owned(),
            source,
        };
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = URL_SAFE_NO_PAD
                    .decode(text.trim())
                    .map_err(|_| SecretError::BadPepper(path.to_owned()))?;
                if bytes.len() < PEPPER_BYTES {
                    return Err(SecretError::BadPepper(path.to_owned()));
                }
                Ok(Self::from_bytes(&bytes))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && generate => {
                let bytes = random_bytes::<PEPPER_BYTES>()?;
                if let Some(dir) = path.parent() {
                    std::fs::create_dir_all(dir).map_err(io)?;
                }
                let mut opts = std::fs::OpenOptions::new();
                opts.write(true).create_new(true);
                #[cfg(unix)]
                {
                    use std::os::unix::fs::OpenOptionsExt;
                    opts.mode(0o600);
                }
                match opts.open(path) {
                    Ok(mut f) => {
                        f.write_all(URL_SAFE_NO_PAD.encode(bytes).as_bytes())
                            .map_err(io)?;
                        f.sync_all().map_err(io)?;
                        Ok(Self::from_bytes(&bytes))
                    }
                    // Another process created it first: use theirs.
                    Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                        Self::load(path, false)
                    }
                    Err(e) => Err(io(e)),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Err(SecretError::Missing(path.to_owned()))
            }
            Err(e) => Err(io(e)),
        }
    }

    /// HMAC-SHA256 of `secret`.
    pub fn hash(&self, secret: &str) -> Vec<u8> {
        hmac::sign(&self.0, secret.as_bytes()).as_ref().to_vec()
    }

    /// Constant-time check that `hash` is the keyed hash of `secret`.
    pub fn verify(&self, secret: &str, hash: &[u8]) -> bool {
        hmac::verify(&self.0, secret.as_bytes(), hash).is_ok()
    }
}

fn random_bytes<const N: usize>() -> Result<[u8; N], SecretError> {
    let mut b = [0u8; N];
    SystemRandom::new()
        .fill(&mut b)
        .map_err(|_| SecretError::Random)?;
    Ok(b)
}

/// `prefix` and 32 random bytes, base64url (tokens: [`crate::token::new_secret`]).
pub(crate) fn generate(prefix: &str) -> Result<String, SecretError> {
    let bytes = random_bytes::<SECRET_BYTES>()?;
    Ok(format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes)))
}

/// A new admin key.
pub fn new_admin_key() -> Result<AdminKeySecret, SecretError> {
    generate(ADMIN_KEY_PREFIX).map(AdminKeySecret::new)
}

/// Whether `s` has the shape of a secret with `prefix` (cheap pre-check
/// before hashing and a database round trip).
pub fn well_formed(s: &str, prefix: &str) -> bool {
    s.strip_prefix(prefix).is_some_and(|rest| {
        rest.len() == ENCODED_LEN
            && rest
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_have_prefix_and_256_bits() {
        let t = crate::token::new_secret().unwrap();
        assert!(well_formed(t.expose_secret(), crate::token::TOKEN_PREFIX));
        assert_eq!(t.expose_secret().len(), 5 + 43);
        assert_ne!(crate::token::new_secret().unwrap(), t);
        let k = new_admin_key().unwrap();
        assert!(well_formed(k.expose_secret(), ADMIN_KEY_PREFIX));
        assert!(!well_formed(k.expose_secret(), crate::token::TOKEN_PREFIX));
        assert!(!well_formed("opet_short", crate::token::TOKEN_PREFIX));
    }

    #[test]
    fn pepper_is_generated_once_and_keys_the_hash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pepper");
        assert!(matches!(
            Pepper::load(&path, false),
            Err(SecretError::Missing(_))
        ));
        let a = Pepper::load(&path, true).unwrap();
        let b = Pepper::load(&path, true).unwrap();
        assert_eq!(a.hash("opet_x"), b.hash("opet_x"));
        assert!(a.verify("opet_x", &b.hash("opet_x")));
        assert!(!a.verify("opet_y", &b.hash("opet_x")));
        assert_ne!(
            Pepper::from_bytes(&[1; 32]).hash("opet_x"),
            a.hash("opet_x")
        );
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
