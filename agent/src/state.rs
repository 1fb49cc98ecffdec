//! The agent's state directory: its key, certificate, chain and bundles.
//!
//! Layout (directory mode 0700, key files 0600):
//!
//! ```text
//! DIR/config.json              where to reach the servers (written at enroll)
//! DIR/server-ca.pem            roots that verify the servers' certificates
//! DIR/current -> generations/<serial>
//! DIR/generations/<serial>/key.pem        private key (0600)
//!                          cert.pem       leaf certificate
//!                          chain.pem      tenant issuing CA
//!                          bundle.pem     platform root(s)
//!                          identity.json  ids, serial, validity, rotate_after
//! ```
//!
//! A new identity is written completely into its own generation directory,
//! fsynced, and then published by atomically replacing the `current` symlink
//! (`rename(2)`), so a crash at any point leaves either the old identity or
//! the new one — never a key from one and a certificate from the other. The
//! previous generation is kept (the old certificate stays valid until the new
//! one is in use); older ones are removed.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::enroll::{Enrolled, IssuedCertificate};
use crate::AgentError;

const CURRENT: &str = "current";
const GENERATIONS: &str = "generations";
const CONFIG: &str = "config.json";
const SERVER_CA: &str = "server-ca.pem";
const KEY: &str = "key.pem";
const CERT: &str = "cert.pem";
const CHAIN: &str = "chain.pem";
const BUNDLE: &str = "bundle.pem";
const IDENTITY: &str = "identity.json";

/// Where the agent reaches its servers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentConfig {
    /// The URL enrollment went to.
    pub enroll_url: String,
    /// The gateway URL for calls and rotation.
    pub gateway_url: String,
}

/// The current identity as loaded from disk.
pub struct Identity {
    /// What the service issued.
    pub issued: IssuedCertificate,
    /// The private key, PEM.
    pub key_pem: String,
    /// The generation directory it was loaded from.
    pub dir: PathBuf,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("issued", &self.issued)
            .field("key_pem", &"[redacted]")
            .field("dir", &self.dir)
            .finish()
    }
}

impl Identity {
    /// The rustls client configuration presenting this identity, trusting
    /// `server_roots` for the server.
    pub fn mtls_config(
        &self,
        server_roots: rustls::RootCertStore,
    ) -> Result<std::sync::Arc<rustls::ClientConfig>, AgentError> {
        let mut chain = crate::tls::certs_from_pem(self.issued.certificate_pem.as_bytes())?;
        chain.extend(crate::tls::certs_from_pem(
            self.issued.chain_pem.as_bytes(),
        )?);
        let key = crate::tls::key_from_pem(self.key_pem.as_bytes())?;
        crate::tls::mutual(server_roots, chain, key)
    }
}

/// An agent state directory.
#[derive(Debug, Clone)]
pub struct StateDir {
    root: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |e| AgentError::state(path, e)
}

/// Writes `data` to `path` atomically: a temporary file in the same
/// directory with `mode`, fsync, rename over `path`.
fn write_atomic(path: &Path, data: &[u8], mode: u32) -> Result<(), AgentError> {
    let tmp = path.with_extension("tmp");
    let mut f = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(io(&tmp))?;
    // `mode` only applies to a newly created file; enforce it either way.
    f.set_permissions(fs::Permissions::from_mode(mode))
        .map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    fs::rename(&tmp, path).map_err(io(path))?;
    Ok(())
}

fn sync_dir(dir: &Path) -> Result<(), AgentError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

impl StateDir {
    /// Opens (creating with mode 0700 if needed) the state directory `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, AgentError> {
        let root = root.into();
        fs::create_dir_all(root.join(GENERATIONS)).map_err(io(&root))?;
        fs::set_permissions(&root, fs::Permissions::from_mode(0o700)).map_err(io(&root))?;
        Ok(Self { root })
    }

    /// The directory.
    pub fn path(&self) -> &Path {
        &self.root
    }

    /// Stores the server configuration and the roots that verify servers.
    pub fn store_config(
        &self,
        config: &AgentConfig,
        server_ca_pem: &[u8],
    ) -> Result<(), AgentError> {
        crate::tls::roots_from_pem(server_ca_pem)?;
        write_atomic(&self.root.join(SERVER_CA), server_ca_pem, 0o644)?;
        let json =
            serde_json::to_vec_pretty(config).map_err(|e| AgentError::Protocol(e.to_string()))?;
        write_atomic(&self.root.join(CONFIG), &json, 0o644)?;
        sync_dir(&self.root)
    }

    /// The stored server configuration.
    pub fn config(&self) -> Result<AgentConfig, AgentError> {
        let path = self.root.join(CONFIG);
        let bytes = fs::read(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => AgentError::NotEnrolled(self.root.clone()),
            _ => AgentError::state(&path, e),
        })?;
        serde_json::from_slice(&bytes)
            .map_err(|e| AgentError::state(&path, std::io::Error::other(e)))
    }

    /// The roots that verify the servers' certificates.
    pub fn server_roots(&self) -> Result<rustls::RootCertStore, AgentError> {
        let path = self.root.join(SERVER_CA);
        let pem = fs::read(&path).map_err(io(&path))?;
        crate::tls::roots_from_pem(&pem)
    }

    /// Stores a new identity and makes it current, atomically.
    pub fn store(&self, enrolled: &Enrolled) -> Result<PathBuf, AgentError> {
        let gens = self.root.join(GENERATIONS);
        let name = enrolled.issued.serial.to_string();
        let dir = gens.join(&name);
        if dir.exists() {
            fs::remove_dir_all(&dir).map_err(io(&dir))?;
        }
        fs::create_dir(&dir).map_err(io(&dir))?;
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        write_atomic(&dir.join(KEY), enrolled.key_pem.as_bytes(), 0o600)?;
        let issued = &enrolled.issued;
        write_atomic(&dir.join(CERT), issued.certificate_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join(CHAIN), issued.chain_pem.as_bytes(), 0o644)?;
        write_atomic(&dir.join(BUNDLE), issued.trust_bundle_pem.as_bytes(), 0o644)?;
        let json =
            serde_json::to_vec_pretty(issued).map_err(|e| AgentError::Protocol(e.to_string()))?;
        write_atomic(&dir.join(IDENTITY), &json, 0o644)?;
        sync_dir(&dir)?;

        let previous = fs::read_link(self.root.join(CURRENT)).ok();
        let tmp_link = self.root.join("current.tmp");
        let _ = fs::remove_file(&tmp_link);
        std::os::unix::fs::symlink(Path::new(GENERATIONS).join(&name), &tmp_link)
            .map_err(io(&tmp_link))?;
        fs::rename(&tmp_link, self.root.join(CURRENT)).map_err(io(&self.root))?;
        sync_dir(&self.root)?;

        self.prune(&name, previous.as_deref());
        Ok(dir)
    }

    /// Removes generations other than `keep` and `previous`. Best effort: a
    /// leftover directory is harmless.
    fn prune(&self, keep: &str, previous: Option<&Path>) {
        let prev_name = previous
            .and_then(|p| p.file_name())
            .and_then(|n| n.to_str());
        let Ok(entries) = fs::read_dir(self.root.join(GENERATIONS)) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name != keep && Some(name.as_ref()) != prev_name {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Loads the current identity.
    pub fn load(&self) -> Result<Identity, AgentError> {
        let dir = self.root.join(CURRENT);
        if fs::symlink_metadata(&dir).is_err() {
            return Err(AgentError::NotEnrolled(self.root.clone()));
        }
        let read = |name: &str| {
            let p = dir.join(name);
            fs::read_to_string(&p).map_err(|e| AgentError::state(&p, e))
        };
        let key_path = dir.join(KEY);
        let mode = fs::metadata(&key_path)
            .map_err(io(&key_path))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            return Err(AgentError::state(
                &key_path,
                std::io::Error::new(
                    std::io::ErrorKind::PermissionDenied,
                    format!(
                        "private key is readable by others (mode {:o}); expected 0600",
                        mode & 0o777
                    ),
                ),
            ));
        }
        let issued: IssuedCertificate = serde_json::from_str(&read(IDENTITY)?)
            .map_err(|e| AgentError::state(dir.join(IDENTITY), std::io::Error::other(e)))?;
        Ok(Identity {
            key_pem: read(KEY)?,
            issued,
            dir: fs::canonicalize(&dir).map_err(io(&dir))?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_identity::SerialNumber;

    fn enrolled(serial: &str) -> Enrolled {
        let now = time::OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        Enrolled {
            key_pem: format!("KEY {serial}"),
            issued: IssuedCertificate {
                agent_id: "0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b".parse().unwrap(),
                tenant_id: "6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10".parse().unwrap(),
                spiffe_id: "spiffe://x/tenant/6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10/agent/0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b".into(),
                serial: serial.parse::<SerialNumber>().unwrap(),
                certificate_pem: format!("CERT {serial}"),
                chain_pem: "CHAIN".into(),
                trust_bundle_pem: "BUNDLE".into(),
                not_before: now,
                not_after: now + time::Duration::days(30),
                rotate_after: now + time::Duration::days(20),
            },
        }
    }

    #[test]
    fn store_then_load_with_private_key_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path().join("s")).unwrap();
        assert!(matches!(state.load(), Err(AgentError::NotEnrolled(_))));
        let dir = state.store(&enrolled("01")).unwrap();
        let mode = fs::metadata(dir.join(KEY)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let root_mode = fs::metadata(state.path()).unwrap().permissions().mode();
        assert_eq!(root_mode & 0o777, 0o700);
        let id = state.load().unwrap();
        assert_eq!(id.key_pem, "KEY 01");
        assert_eq!(id.issued.certificate_pem, "CERT 01");
        assert!(!format!("{id:?}").contains("KEY 01"));
    }

    #[test]
    fn rotation_switches_current_and_keeps_one_previous_generation() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        state.store(&enrolled("01")).unwrap();
        state.store(&enrolled("02")).unwrap();
        state.store(&enrolled("03")).unwrap();
        assert_eq!(state.load().unwrap().issued.certificate_pem, "CERT 03");
        let mut gens: Vec<String> = fs::read_dir(tmp.path().join(GENERATIONS))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        gens.sort();
        assert_eq!(gens.len(), 2);
        assert!(gens[0].ends_with("02") && gens[1].ends_with("03"));
    }

    #[test]
    fn a_half_written_generation_never_becomes_current() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        state.store(&enrolled("01")).unwrap();
        // Simulate a crash after writing part of a new generation.
        let partial = tmp.path().join(GENERATIONS).join("partial");
        fs::create_dir(&partial).unwrap();
        fs::write(partial.join(KEY), "half").unwrap();
        assert_eq!(state.load().unwrap().key_pem, "KEY 01");
        // The next store cleans it up.
        state.store(&enrolled("02")).unwrap();
        assert!(!partial.exists());
    }

    #[test]
    fn refuses_a_key_readable_by_others() {
        let tmp = tempfile::tempdir().unwrap();
        let state = StateDir::open(tmp.path()).unwrap();
        let dir = state.store(&enrolled("01")).unwrap();
        fs::set_permissions(dir.join(KEY), fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(state.load(), Err(AgentError::State { .. })));
    }
}
