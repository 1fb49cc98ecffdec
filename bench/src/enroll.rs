//! The real enroll-api for the revocation scenario (`--revoke-via
//! enroll-api`, the default): the `oneprotect-enroll-api` binary next to this
//! one, on SQLite in the run's directory, writing the revocation projection
//! to the bench's Redis prefix. Agents enroll through the real exchange and
//! are revoked through the admin API, so the measured time covers the whole
//! path: API commit → outbox relay → Redis → announcement → gateway.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use http::Method;
use oneprotect_agent::client::Endpoint;
use oneprotect_agent::enroll::{enroll, AgentMetadata, Enrolled};
use oneprotect_identity::{AgentId, TokenSecret};

use crate::child::{free_port, sibling_binary, Server};

/// A started enroll-api with one tenant and an admin key.
pub struct EnrollApi {
    /// The process.
    pub server: Server,
    /// Its HTTPS listener.
    pub https: SocketAddr,
    client: Endpoint,
    admin_key: String,
}

fn run_cli(bin: &Path, conf: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new(bin)
        .arg("-c")
        .arg(conf)
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .with_context(|| format!("run {}", bin.display()))?;
    anyhow::ensure!(
        out.status.success(),
        "oneprotect-enroll-api {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

impl EnrollApi {
    /// Starts it in `dir` with Redis at `redis_url` under `prefix`.
    pub fn start(dir: &Path, redis_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let bin = sibling_binary("oneprotect-enroll-api")?;
        std::fs::create_dir_all(dir)?;
        let data: PathBuf = dir.join("data");
        let https: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let conf = dir.join("enroll-api.toml");
        std::fs::write(
            &conf,
            format!(
                r#"trust_domain = "{td}"
data_dir = "{data}"
[listen]
https = "{https}"
http = ""
[limits]
exchange_per_address_per_minute = 1000000
exchange_per_address_burst = 100000
exchange_per_token_per_minute = 1000000
exchange_per_token_burst = 100000
[redis]
url = "{redis_url}"
key_prefix = "{prefix}"
relay_poll_interval_ms = 200
"#,
                td = crate::pki::TRUST_DOMAIN,
                data = data.display(),
            ),
        )?;
        let tenant = run_cli(&bin, &conf, &["tenant", "create", "--name", "bench"])?;
        let tenant = tenant
            .split_whitespace()
            .find(|w| uuid::Uuid::parse_str(w).is_ok())
            .context("tenant create printed no id")?
            .to_owned();
        let key = run_cli(
            &bin,
            &conf,
            &[
                "admin-key",
                "create",
                "--tenant",
                &tenant,
                "--name",
                "bench",
            ],
        )?;
        let admin_key = key
            .split_whitespace()
            .find(|w| w.starts_with("opak_"))
            .context("admin-key create printed no key")?
            .to_owned();
        let mut cmd = Command::new(&bin);
        cmd.arg("-c")
            .arg(&conf)
            .arg("serve")
            .env("RUST_LOG", "warn");
        let log = dir.join("enroll-api.log");
        let mut server = Server::spawn("enroll-api", cmd, &log)?;
        server.wait_ready(https, Duration::from_secs(30), &log)?;
        let ca = std::fs::read(data.join("tls/dev-cert.pem")).context("enroll-api dev cert")?;
        let roots = oneprotect_agent::tls::roots_from_pem(&ca)?;
        let client = Endpoint::new(
            &format!("https://{https}"),
            oneprotect_agent::tls::server_only(roots)?,
        )?;
        Ok(Self {
            server,
            https,
            client,
            admin_key,
        })
    }

    async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> anyhow::Result<serde_json::Value> {
        let auth = format!("Bearer {}", self.admin_key);
        let mut headers = vec![("authorization", auth.as_str())];
        if body.is_some() {
            headers.push(("content-type", "application/json"));
        }
        let r = self
            .client
            .request(
                method,
                path,
                &headers,
                body.map(|b| b.to_string().into_bytes()),
            )
            .await?;
        anyhow::ensure!(r.status.is_success(), "{path}: {}", r.status);
        Ok(serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null))
    }

    /// The platform trust bundle (PEM) its agent certificates chain to.
    pub async fn trust_bundle(&self) -> anyhow::Result<String> {
        let r = self
            .client
            .request(Method::GET, "/api/v1/trust-bundle", &[], None)
            .await?;
        anyhow::ensure!(r.status.is_success(), "trust bundle: {}", r.status);
        Ok(String::from_utf8(r.body.to_vec())?)
    }

    /// Enrolls `n` agents through the real exchange (one token, `n` uses).
    pub async fn enroll_agents(&self, n: usize) -> anyhow::Result<Vec<Enrolled>> {
        let created = self
            .call(
                Method::POST,
                "/api/v1/agent-enrollment/tokens",
                Some(serde_json::json!({"ttl_seconds": 3600, "max_uses": n.max(1)})),
            )
            .await?;
        let token = TokenSecret::new(created["token"].as_str().context("token")?);
        let meta = AgentMetadata::this_host();
        let mut out = Vec::with_capacity(n);
        for _ in 0..n {
            out.push(enroll(&self.client, &token, &meta).await?);
        }
        Ok(out)
    }

    /// Revokes `agent` through the admin API; returns once it answered 200.
    /// Revokes `agent` through the admin API, waiting for the gateways
    /// (ADR-0022); returns the answer's `enforcement.outcome`.
    pub async fn revoke(&self, agent: AgentId) -> anyhow::Result<String> {
        let body = self
            .call(
                Method::POST,
                &format!("/api/v1/agents/{agent}/revoke"),
                Some(serde_json::json!({"reason": "bench revocation"})),
            )
            .await?;
        Ok(body["enforcement"]["outcome"]
            .as_str()
            .unwrap_or("missing")
            .to_owned())
    }
}
