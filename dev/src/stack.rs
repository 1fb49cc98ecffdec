//! The stack's ports and the facts `up` prints and writes to
//! `<data-dir>/stack.json` (read back by `demo` and by tests).

use std::io::Write;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// The default data directory, relative to the working directory.
pub const DEFAULT_DATA_DIR: &str = ".data/dev";
/// The default port base: the gateway listens on it, the rest follow.
pub const DEFAULT_PORT_BASE: u16 = 8443;
/// The name of the facts file in the data directory.
pub const STACK_FILE: &str = "stack.json";

/// Every listen port, derived from one base so `--port-base` moves them all.
///
/// | offset | listener | default |
/// |---|---|---|
/// | +0 | gateway, mTLS (agents call this) | 8443 |
/// | +1 | enroll-api HTTPS (admin API, enrollment) | 8444 |
/// | +2 | gateway admin: `/metrics`, `/healthz`, `/readyz` | 8445 |
/// | +3 | enroll-api plain HTTP, loopback (the gateway's upstream) | 8446 |
/// | +4 | demo upstream, loopback (the gateway's upstream) | 8447 |
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ports {
    /// The gateway's mTLS listener.
    pub gateway: u16,
    /// The enroll-api's HTTPS listener.
    pub enroll_api: u16,
    /// The gateway's admin listener.
    pub gateway_admin: u16,
    /// The enroll-api's loopback HTTP listener.
    pub enroll_api_http: u16,
    /// The demo upstream.
    pub upstream: u16,
}

impl Ports {
    /// How many consecutive ports the stack uses.
    pub const COUNT: u16 = 5;

    /// The ports starting at `base`; `None` when they would pass 65535 or
    /// `base` is 0.
    pub fn from_base(base: u16) -> Option<Self> {
        if base == 0 || base.checked_add(Self::COUNT - 1).is_none() {
            return None;
        }
        Some(Self {
            gateway: base,
            enroll_api: base + 1,
            gateway_admin: base + 2,
            enroll_api_http: base + 3,
            upstream: base + 4,
        })
    }

    /// Each port with what listens on it.
    pub fn all(&self) -> [(&'static str, u16); 5] {
        [
            ("gateway", self.gateway),
            ("enroll-api", self.enroll_api),
            ("gateway admin", self.gateway_admin),
            ("enroll-api http", self.enroll_api_http),
            ("demo upstream", self.upstream),
        ]
    }
}

/// Every listen address of the stack.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Listen {
    /// The gateway's mTLS listener.
    pub gateway: SocketAddr,
    /// The enroll-api's HTTPS listener (admin API and enrollment).
    pub enroll_api_https: SocketAddr,
    /// The enroll-api's loopback plain HTTP listener (behind the gateway).
    pub enroll_api_http: SocketAddr,
    /// The gateway's admin listener (metrics, health).
    pub gateway_admin: SocketAddr,
    /// The demo upstream (behind the gateway).
    pub upstream: SocketAddr,
}

/// What `up` started, as written to `stack.json` (mode 0600: it holds the
/// admin key).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StackInfo {
    /// The data directory (absolute).
    pub data_dir: PathBuf,
    /// Every listen address.
    pub listen: Listen,
    /// The gateway's URL: agents enroll, call and rotate here.
    pub gateway_url: String,
    /// The enroll-api's base URL: the admin API.
    pub enroll_api_url: String,
    /// The gateway's admin base URL.
    pub admin_url: String,
    /// The gateway's Prometheus metrics.
    pub metrics_url: String,
    /// The bootstrap tenant.
    pub tenant_id: String,
    /// The bootstrap tenant's admin key (`Authorization: Bearer …`).
    pub admin_key: String,
    /// The platform root(s) agent certificates chain to (PEM).
    pub trust_bundle: PathBuf,
    /// The CA that verifies both servers' TLS certificates (PEM; the dev
    /// certificate is self-signed).
    pub server_ca: PathBuf,
    /// `sqlite` or `postgres`.
    pub database: String,
    /// `memory` (the in-process bus) or `redis`.
    pub revocation_bus: String,
    /// The key prefix of the revocation projection.
    pub key_prefix: String,
    /// The gateway's assertion signing key id, issuer and audience.
    pub assertion_kid: String,
    /// The `iss` of identity assertions.
    pub assertion_issuer: String,
    /// The `aud` of the demo route's identity assertions (every route signs
    /// for its own audience, by default its name).
    pub assertion_audience: String,
    /// The gateways' assertion verification keys as a JWK Set, on the
    /// enroll-api's plain-HTTP listener (what upstreams fetch).
    pub jwks_url: String,
    /// The process id of `up`.
    pub pid: u32,
}

impl StackInfo {
    /// `<data_dir>/stack.json`.
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(STACK_FILE)
    }

    /// Reads `<data_dir>/stack.json`.
    pub fn load(data_dir: &Path) -> anyhow::Result<Self> {
        let path = Self::path(data_dir);
        let text = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "cannot read {} — is `oneprotect-dev up` running with this --data-dir?",
                path.display()
            )
        })?;
        serde_json::from_str(&text).with_context(|| format!("{} is not valid", path.display()))
    }

    /// Writes `<data_dir>/stack.json` (0600), atomically.
    pub fn store(&self, data_dir: &Path) -> anyhow::Result<()> {
        let json = serde_json::to_vec_pretty(self)?;
        write_private(&Self::path(data_dir), &json)
    }
}

/// Writes `bytes` to `path` with mode 0600 via a temporary file and a
/// rename, so readers never see a partial file.
pub fn write_private(path: &Path, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    let mut f = opts
        .open(&tmp)
        .with_context(|| format!("create {}", tmp.display()))?;
    #[cfg(unix)]
    {
        // An existing file keeps its old mode through `open`; force it.
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    }
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path).with_context(|| format!("write {}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_follow_the_base_and_stay_in_range() {
        let p = Ports::from_base(DEFAULT_PORT_BASE).unwrap();
        assert_eq!(
            p.all().map(|(_, port)| port),
            [8443, 8444, 8445, 8446, 8447]
        );
        assert_eq!(Ports::from_base(20000).unwrap().upstream, 20004);
        assert!(Ports::from_base(65532).is_none());
        assert!(Ports::from_base(65531).is_some());
        assert!(Ports::from_base(0).is_none());
    }

    #[test]
    fn private_files_are_0600_and_replace_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.json");
        write_private(&path, b"one").unwrap();
        write_private(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
