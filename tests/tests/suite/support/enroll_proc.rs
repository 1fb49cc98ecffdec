//! The real `oneprotect-enroll-api` binary as a child process
//! ([`EnrollFixture`] → [`EnrollProc`]), configured through its TOML file
//! and CLI.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::enroll::{create_schema, Client};
use super::fleet::POLLS;
use super::gateway::TD;

/// The real `oneprotect-enroll-api` process on PostgreSQL (own schema) and
/// Redis (own prefix): killed with SIGKILL and started again on the same
/// port, data dir and database.
pub(crate) struct EnrollProc {
    pub(crate) bin: std::path::PathBuf,
    pub(crate) conf: std::path::PathBuf,
    pub(crate) log: std::path::PathBuf,
    pub(crate) https: SocketAddr,
    pub(crate) child: Option<tokio::process::Child>,
    /// `RUST_LOG` of the service.
    pub(crate) rust_log: &'static str,
}

impl EnrollProc {
    pub(crate) fn cli(&self, args: &[&str]) -> Result<String> {
        let out = std::process::Command::new(&self.bin)
            .arg("-c")
            .arg(&self.conf)
            .args(args)
            .env("RUST_LOG", "warn")
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "oneprotect-enroll-api {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Starts `serve` and waits (bounded) until the HTTPS listener accepts.
    pub(crate) async fn start(&mut self) -> Result<Duration> {
        let t0 = Instant::now();
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)?;
        self.child = Some(
            tokio::process::Command::new(&self.bin)
                .arg("-c")
                .arg(&self.conf)
                .arg("serve")
                .env("RUST_LOG", self.rust_log)
                .stdout(std::process::Stdio::null())
                .stderr(log)
                .kill_on_drop(true)
                .spawn()?,
        );
        for _ in 0..POLLS {
            if tokio::net::TcpStream::connect(self.https).await.is_ok() {
                return Ok(t0.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        let log = std::fs::read_to_string(&self.log).unwrap_or_default();
        anyhow::bail!("enroll-api did not listen on {}:\n{log}", self.https)
    }

    /// SIGKILL: no shutdown path runs.
    pub(crate) async fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.start_kill().unwrap();
            c.wait().await.unwrap();
        }
    }
}

/// What became of one exchange or revocation that was in flight while the
/// service was killed.
/// Drops the test's schema and Redis keys at the end, pass or fail.
pub(crate) struct Cleanup {
    pub(crate) schema: String,
    pub(crate) redis_url: String,
    pub(crate) pattern: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        oneprotect_tests::drop_schema_and_keys(&self.schema, &self.redis_url, &self.pattern);
    }
}

/// An enroll-api binary set up on a fresh PostgreSQL schema and Redis key
/// prefix, with one tenant and admin key made through its CLI; not started.
/// The schema and keys are dropped with it.
pub(crate) struct EnrollFixture {
    pub(crate) proc: EnrollProc,
    pub(crate) dir: std::path::PathBuf,
    pub(crate) tenant: oneprotect_identity::TenantId,
    pub(crate) admin_key: String,
    pub(crate) keys: oneprotect_identity::KeySchema,
    pub(crate) redis_url: String,
    _cleanup: Cleanup,
    _tmp: tempfile::TempDir,
}

impl EnrollFixture {
    /// `http`: the plain listener's address (`""` for none); `extra`: more
    /// TOML appended to the configuration; `rust_log`: the service's level.
    pub(crate) async fn new(
        label: &str,
        http: &str,
        extra: &str,
        rust_log: &'static str,
    ) -> Result<Self> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_owned();
        let pg = oneprotect_tests::require_postgres();
        let redis_url = oneprotect_tests::require_redis();
        let schema = oneprotect_tests::unique_name(label);
        let keys =
            oneprotect_identity::KeySchema::new(oneprotect_tests::unique_redis_prefix(label));
        let cleanup = Cleanup {
            schema: schema.clone(),
            redis_url: redis_url.clone(),
            pattern: keys.all_keys_pattern(),
        };
        create_schema(&pg, &schema).await?;
        let https = SocketAddr::from(([127, 0, 0, 1], oneprotect_tests::free_port()));
        let conf = dir.join("enroll-api.toml");
        std::fs::write(
            &conf,
            format!(
                r#"trust_domain = "{td}"
data_dir = "{data}"
[listen]
https = "{https}"
http = "{http}"
[database]
url = "{pg}"
schema = "{schema}"
max_connections = 8
[limits]
exchange_per_address_per_minute = 1000000
exchange_per_address_burst = 100000
exchange_per_token_per_minute = 1000000
exchange_per_token_burst = 100000
[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
relay_poll_interval_ms = 100
{extra}"#,
                td = TD,
                data = dir.join("data").display(),
                prefix = keys.prefix(),
            ),
        )?;
        let proc = EnrollProc {
            bin: oneprotect_tests::ensure_binary("oneprotect-enroll-api", "oneprotect-enroll-api"),
            conf,
            log: dir.join("enroll-api.log"),
            https,
            child: None,
            rust_log,
        };
        let out = proc.cli(&["tenant", "create", "--name", label])?;
        let tenant: oneprotect_identity::TenantId = out
            .split_whitespace()
            .find_map(|w| w.parse().ok())
            .context("tenant create printed no id")?;
        let tenant_s = tenant.to_string();
        let out = proc.cli(&[
            "admin-key",
            "create",
            "--tenant",
            &tenant_s,
            "--name",
            label,
        ])?;
        let admin_key = out
            .split_whitespace()
            .find(|w| w.starts_with("opak_"))
            .context("admin-key create printed no key")?
            .to_owned();
        Ok(Self {
            proc,
            dir,
            tenant,
            admin_key,
            keys,
            redis_url,
            _cleanup: cleanup,
            _tmp: tmp,
        })
    }

    /// An admin client for the HTTPS listener (trusting the dev certificate).
    pub(crate) fn client(&self) -> Result<Client> {
        Client::new(self.proc.https, &self.dir.join("data/tls/dev-cert.pem"))
    }
}
