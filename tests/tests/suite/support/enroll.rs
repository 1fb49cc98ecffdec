//! The in-process enroll-api ([`start_with`] → [`Env`]), its admin HTTPS
//! [`Client`], and CSRs and keys made by the `openssl` CLI.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use oneprotect_enroll_api::config::Config;
use oneprotect_enroll_api::store::Store;
use oneprotect_enroll_api::{cli, service};
use oneprotect_identity::TenantId;
use serde_json::{json, Value};
use sqlx::Connection;
use tokio::net::TcpStream;

use super::gateway::TD;

/// The database an [`Env`] runs on.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Db {
    Sqlite,
    Postgres,
}

pub(crate) struct Env {
    _dir: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) cfg: Config,
    pub(crate) running: Option<service::Running>,
    pub(crate) client: Client,
    pub(crate) tenant: TenantId,
    pub(crate) key: String,
    pub(crate) schema: Option<String>,
}

impl Drop for Env {
    fn drop(&mut self) {
        if let Some(schema) = self.schema.take() {
            // Best effort: drop the test's schema on a side thread.
            let url = oneprotect_tests::require_postgres();
            std::thread::spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build();
                if let Ok(rt) = rt {
                    rt.block_on(async {
                        if let Ok(mut c) = sqlx::PgConnection::connect(&url).await {
                            let _ = sqlx::query(&format!("DROP SCHEMA \"{schema}\" CASCADE"))
                                .execute(&mut c)
                                .await;
                        }
                    });
                }
            })
            .join()
            .ok();
        }
    }
}

/// Creates the PostgreSQL schema `schema` at `url` (the test drops it).
pub(crate) async fn create_schema(url: &str, schema: &str) -> Result<()> {
    let mut conn = sqlx::PgConnection::connect(url).await?;
    sqlx::query(&format!("CREATE SCHEMA \"{schema}\""))
        .execute(&mut conn)
        .await?;
    conn.close().await?;
    Ok(())
}

/// An enroll-api configuration for tests: trust domain [`TD`], data in
/// `dir`, HTTPS on a free loopback port, exchange rate limits (10 000) no
/// test reaches; the rest as [`Config::default`].
pub(crate) fn base_config(dir: &Path) -> Config {
    let mut cfg = Config {
        trust_domain: TD.parse().expect("a valid trust domain"),
        data_dir: dir.to_owned(),
        ..Config::default()
    };
    cfg.listen.https = "127.0.0.1:0".into();
    cfg.limits.exchange_per_address_burst = 10_000;
    cfg.limits.exchange_per_address_per_minute = 10_000;
    cfg.limits.exchange_per_token_burst = 10_000;
    cfg.limits.exchange_per_token_per_minute = 10_000;
    cfg
}

async fn new_schema(label: &str) -> Result<(String, String)> {
    let url = oneprotect_tests::require_postgres();
    let schema = oneprotect_tests::unique_name(label);
    create_schema(&url, &schema).await?;
    Ok((url, schema))
}

fn config(
    dir: &Path,
    db: Db,
    pg: Option<&(String, String)>,
    tweak: impl FnOnce(&mut Config),
) -> Result<Config> {
    let mut cfg = base_config(dir);
    cfg.database.max_connections = 16;
    if let (Db::Postgres, Some((url, schema))) = (db, pg) {
        cfg.database.url = Some(url.clone());
        cfg.database.schema = Some(schema.clone());
    }
    tweak(&mut cfg);
    Ok(cfg.validate()?)
}

/// A service on `db` with `clock`, its config changed by `tweak` (after the
/// test defaults: generous rate limits, HTTPS on a free port).
pub(crate) async fn start_with(
    db: Db,
    clock: oneprotect_enroll_api::clock::SharedClock,
    tweak: impl FnOnce(&mut Config),
) -> Result<Env> {
    let tmp = tempfile::tempdir()?;
    let dir = tmp.path().to_owned();
    let pg = match db {
        Db::Postgres => Some(new_schema("enroll_e2e").await?),
        Db::Sqlite => None,
    };
    let cfg = config(&dir, db, pg.as_ref(), tweak)?;
    // Tenant and admin key through the CLI's functions, as an operator would.
    let tenant = cli::tenant_create(&cfg, "acme", Some(3600)).await?;
    let key = cli::admin_key_create(&cfg, tenant, "e2e").await?;
    let state = service::build_state(&cfg, clock).await?;
    let running = service::start(&cfg, state).await?;
    let addr = running.https_addr.context("no https listener")?;
    let client = Client::new(addr, &dir.join("tls/dev-cert.pem"))?;
    Ok(Env {
        _dir: tmp,
        dir,
        cfg,
        running: Some(running),
        client,
        tenant,
        key: key.expose_secret().to_owned(),
        schema: pg.map(|(_, s)| s),
    })
}

/// A minimal HTTPS client: one connection per request, trusting only the
/// service's dev certificate.
#[derive(Clone)]
pub(crate) struct Client {
    addr: SocketAddr,
    tls: tokio_rustls::TlsConnector,
}

pub(crate) struct Reply {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: Value,
}

impl Client {
    pub(crate) fn new(addr: SocketAddr, ca: &Path) -> Result<Self> {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_file_iter(ca)? {
            roots.add(cert?)?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots)
            .with_no_client_auth();
        Ok(Self {
            addr,
            tls: tokio_rustls::TlsConnector::from(Arc::new(cfg)),
        })
    }

    /// Creates an enrollment token with the admin key `key` (`body`: TTL,
    /// uses, …); returns its id and secret.
    pub(crate) async fn create_token(&self, key: &str, body: Value) -> Result<(String, String)> {
        let r = self
            .send(
                "POST",
                "/api/v1/agent-enrollment/tokens",
                Some(key),
                Some(body),
            )
            .await?;
        ensure!(r.status == 201, "token create: {} {}", r.status, r.body);
        Ok((
            r.body["token_id"].as_str().context("token_id")?.to_owned(),
            r.body["token"].as_str().context("token")?.to_owned(),
        ))
    }

    /// Enrolls one agent as a device would: a token (600 s) made with the
    /// admin key `key`, then the exchange of `csr` as host `hostname`.
    /// Returns the exchange's 201 body (agent id, serial, certificate…).
    pub(crate) async fn enroll(&self, key: &str, hostname: &str, csr: &str) -> Result<Value> {
        let (_, token) = self.create_token(key, json!({"ttl_seconds": 600})).await?;
        let r = self
            .send(
                "POST",
                "/api/v1/agent-enrollment/exchange",
                None,
                Some(exchange_body_as(&token, csr, hostname)),
            )
            .await?;
        ensure!(r.status == 201, "exchange: {} {}", r.status, r.body);
        Ok(r.body)
    }

    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Result<Reply> {
        let mut headers = Vec::new();
        if let Some(k) = key {
            headers.push(("authorization".to_owned(), format!("Bearer {k}")));
        }
        let bytes = match body {
            Some(v) => {
                headers.push(("content-type".to_owned(), "application/json".to_owned()));
                Bytes::from(v.to_string())
            }
            None => Bytes::new(),
        };
        self.send_raw(method, path, &headers, bytes).await
    }

    /// Sends `body` as is, with exactly `headers` (plus `host`).
    pub(crate) async fn send_raw(
        &self,
        method: &str,
        path: &str,
        headers: &[(String, String)],
        bytes: Bytes,
    ) -> Result<Reply> {
        let tcp = TcpStream::connect(self.addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost")?;
        let tls = self.tls.connect(name, tcp).await?;
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(conn);
        let mut req = http::Request::builder()
            .method(method)
            .uri(path)
            .header("host", "localhost");
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let resp = sender.send_request(req.body(Full::new(bytes))?).await?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let raw = resp.into_body().collect().await?.to_bytes();
        let body = serde_json::from_slice(&raw)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&raw).into_owned()));
        Ok(Reply {
            status,
            headers,
            body,
        })
    }
}

pub(crate) fn openssl(args: &[&str], dir: &Path) -> Result<String> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("run the openssl CLI")?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// A P-256 CSR made by the openssl CLI (an independent implementation).
pub(crate) fn openssl_csr(dir: &Path, name: &str) -> Result<String> {
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    openssl(
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-subj",
            "/CN=x",
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
        dir,
    )?;
    Ok(std::fs::read_to_string(dir.join(csr))?)
}

/// An exchange request body: `token`, `csr` and host `e2e-host`.
pub(crate) fn exchange_body(token: &str, csr: &str) -> Value {
    exchange_body_as(token, csr, "e2e-host")
}

fn exchange_body_as(token: &str, csr: &str, hostname: &str) -> Value {
    json!({"token": token, "csr_pem": csr,
           "agent": {"hostname": hostname, "os": "linux", "agent_version": "0.1.0"}})
}

/// [`Client::create_token`] with the environment's admin key.
pub(crate) async fn create_token(env: &Env, body: Value) -> Result<(String, String)> {
    env.client.create_token(&env.key, body).await
}

/// Polls the outbox (bounded: 400 × 50 ms) until no row is pending;
/// returns how many still are.
pub(crate) async fn outbox_pending_after_drain(
    store: &oneprotect_enroll_api::store::AnyStore,
) -> Result<usize> {
    let mut pending = usize::MAX;
    for _ in 0..400 {
        pending = store.list_pending_events(1000).await?.len();
        if pending == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(pending)
}
