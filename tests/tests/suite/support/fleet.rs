//! Several gateways on one Redis ([`Fleet`]): real `oneprotect-gateway`
//! processes, one in-process enroll-api on PostgreSQL (own schema) writing
//! the revocation projection to Redis (own key prefix), agents enrolled
//! through the real exchange, and bounded load through every gateway
//! ([`Sender`], [`Load`]).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use http_body_util::Full;
use oneprotect_enroll_api::{cli, service};
use oneprotect_identity::{KeySchema, TenantId};
use oneprotect_testpki::TestPki;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde_json::json;
use tokio::net::TcpStream;

use super::enroll::{base_config, create_schema, openssl_csr, Client, Reply};
use super::gateway::{read, request, start_echo, write, TD};
use super::gateway_toml::{GatewayToml, RouteToml};

/// Poll attempts (25 ms apart) before a wait gives up: 20 s.
pub(crate) const POLLS: usize = 800;

/// One enrolled agent: its ids and a client TLS config with its key.
#[derive(Clone)]
pub(crate) struct Agent {
    pub(crate) id: String,
    /// The agent's tenant.
    pub(crate) tenant: TenantId,
    pub(crate) serial: String,
    pub(crate) tls: Arc<rustls::ClientConfig>,
}

/// A gateway child process (the real `oneprotect-gateway` binary).
pub(crate) struct GatewayProc {
    pub(crate) addr: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) child: Option<tokio::process::Child>,
}

impl GatewayProc {
    /// The process id, while it runs.
    pub(crate) fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(|c| c.id())
    }
}

impl Drop for GatewayProc {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Our own child, by its handle.
            let _ = c.start_kill();
        }
    }
}

/// enroll-api + gateways + echo upstream around one Redis URL.
pub(crate) struct Fleet {
    _tmp: tempfile::TempDir,
    pub(crate) dir: PathBuf,
    pub(crate) running: Option<service::Running>,
    pub(crate) client: Client,
    pub(crate) tenant: TenantId,
    pub(crate) key: String,
    pub(crate) keys: KeySchema,
    pub(crate) redis_url: String,
    /// The enroll-api's configuration (validated): more tenants are made
    /// with it.
    cfg: oneprotect_enroll_api::config::Config,
    /// Reads keys through whatever topology `redis_url` names.
    redis: oneprotect_redis::RedisClient,
    schema: String,
    server_pki: TestPki,
    echo: SocketAddr,
    pub(crate) gateways: Vec<GatewayProc>,
    n_gateways: usize,
    /// With rotation: the gateway's assertion key file and the enroll-api's
    /// plain loopback listener the gateways route `/api/v1/agents` to.
    rotation: Option<(PathBuf, SocketAddr)>,
}

/// The kid of a rotation fleet's gateway assertion key.
const FLEET_KID: &str = "gw-fleet";

impl Drop for Fleet {
    fn drop(&mut self) {
        self.gateways.clear();
        oneprotect_tests::drop_schema_and_keys(
            &self.schema,
            &self.redis_url,
            &self.keys.all_keys_pattern(),
        );
    }
}

/// Gateway settings of a fleet.
#[derive(Clone, Copy)]
pub(crate) struct GwTuning {
    pub(crate) max_staleness_ms: u64,
    pub(crate) heartbeat_ms: u64,
}

impl Fleet {
    /// Starts the enroll-api on PostgreSQL with `redis_url`; no gateway yet.
    pub(crate) async fn start(label: &str, redis_url: &str) -> Result<Self> {
        Self::start_with_db(label, redis_url, &oneprotect_tests::require_postgres()).await
    }

    /// [`Fleet::start`] with the PostgreSQL URL `url` (e.g. with an
    /// `application_name` to find the service's backends by).
    pub(crate) async fn start_with_db(label: &str, redis_url: &str, url: &str) -> Result<Self> {
        Self::start_inner(label, redis_url, url, None, None).await
    }

    /// [`Fleet::start`] with the key prefix `prefix` (e.g. one with a hash
    /// tag, which a Redis Cluster requires).
    pub(crate) async fn start_with_prefix(
        label: &str,
        redis_url: &str,
        prefix: &str,
    ) -> Result<Self> {
        let url = oneprotect_tests::require_postgres();
        Self::start_inner(label, redis_url, &url, Some(prefix), None).await
    }

    /// [`Fleet::start_with_prefix`] with a projection in `shards` shards
    /// (ADR-0024: a Cluster, a prefix without a hash tag) and the relay
    /// waiting for `wait_replicas` replicas of every write.
    pub(crate) async fn start_sharded(
        label: &str,
        redis_url: &str,
        prefix: &str,
        shards: u16,
        wait_replicas: u32,
    ) -> Result<Self> {
        let url = oneprotect_tests::require_postgres();
        Self::start_opts(
            label,
            redis_url,
            &url,
            Some(prefix),
            None,
            (shards, wait_replicas),
        )
        .await
    }

    /// [`Fleet::start`] with rotation through the gateways: the enroll-api
    /// pins the gateways' assertion key and supersedes a rotated
    /// certificate after `grace_secs` unless the agent confirms sooner.
    pub(crate) async fn start_with_rotation(
        label: &str,
        redis_url: &str,
        grace_secs: u64,
    ) -> Result<Self> {
        let url = oneprotect_tests::require_postgres();
        Self::start_inner(label, redis_url, &url, None, Some(grace_secs)).await
    }

    async fn start_inner(
        label: &str,
        redis_url: &str,
        url: &str,
        prefix: Option<&str>,
        rotation_grace_secs: Option<u64>,
    ) -> Result<Self> {
        Self::start_opts(label, redis_url, url, prefix, rotation_grace_secs, (1, 0)).await
    }

    async fn start_opts(
        label: &str,
        redis_url: &str,
        url: &str,
        prefix: Option<&str>,
        rotation_grace_secs: Option<u64>,
        (shards, wait_replicas): (u16, u32),
    ) -> Result<Self> {
        let url = url.to_owned();
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_owned();
        let schema = oneprotect_tests::unique_name(label);
        create_schema(&url, &schema).await?;
        let prefix = prefix.map_or_else(
            || oneprotect_tests::unique_redis_prefix(label),
            str::to_owned,
        );
        let mut cfg = base_config(&dir);
        cfg.database.max_connections = 8;
        cfg.database.url = Some(url);
        cfg.database.schema = Some(schema.clone());
        cfg.redis.url = Some(redis_url.to_owned());
        cfg.redis.key_prefix = prefix.clone();
        cfg.redis.shards = shards;
        cfg.redis.wait_replicas = wait_replicas;
        cfg.redis.relay_poll_interval_ms = 200;
        // Revocations wait up to 2 s for the gateways (ADR-0022): a loaded
        // machine may starve a gateway process for a moment.
        cfg.redis.enforcement_deadline_ms = 2000;
        let mut assertion_key = None;
        if let Some(grace) = rotation_grace_secs {
            use base64::Engine as _;
            let (signer, pkcs8) = oneprotect_identity::AssertionSigner::generate(FLEET_KID)
                .map_err(|_| anyhow::anyhow!("generate assertion key"))?;
            std::fs::write(dir.join("assertion.pk8"), pkcs8)?;
            assertion_key = Some(dir.join("assertion.pk8"));
            cfg.listen.http = "127.0.0.1:0".into();
            cfg.rotation.grace_secs = grace;
            cfg.rotation.sweep_interval_ms = 200;
            cfg.rotation.assertion.keys = vec![oneprotect_enroll_api::config::TrustedKey {
                kid: FLEET_KID.into(),
                public_key: base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .encode(signer.public_key()),
            }];
        }
        let cfg = cfg.validate()?;
        let tenant = cli::tenant_create(&cfg, "acme", Some(3600)).await?;
        let key = cli::admin_key_create(&cfg, tenant, "fleet").await?;
        let state = service::build_state(&cfg, service::system_clock()).await?;
        let running = service::start(&cfg, state).await?;
        let addr = running.https_addr.context("no https listener")?;
        let rotation = match assertion_key {
            Some(k) => Some((k, running.http_addr.context("no http listener")?)),
            None => None,
        };
        let client = Client::new(addr, &dir.join("tls/dev-cert.pem"))?;
        let bundle = client
            .send("GET", "/api/v1/trust-bundle", None, None)
            .await?;
        ensure!(bundle.status == 200, "trust bundle: {}", bundle.status);
        write(&dir, "bundle.pem", bundle.body.as_str().context("PEM")?);
        let server_pki = TestPki::new(TD);
        let server = server_pki.server_cert(&["localhost", "127.0.0.1"]);
        write(&dir, "server.pem", &server.cert_pem);
        write(&dir, "server.key", &server.key_pem);
        let echo = start_echo().await;
        Ok(Self {
            _tmp: tmp,
            dir,
            running: Some(running),
            client,
            tenant,
            key: key.expose_secret().to_owned(),
            keys: KeySchema::sharded(prefix, shards),
            redis_url: redis_url.to_owned(),
            cfg,
            redis: oneprotect_redis::RedisClient::open(redis_url, Duration::from_secs(1))?,
            schema,
            server_pki,
            echo,
            gateways: Vec::new(),
            n_gateways: 0,
            rotation,
        })
    }

    /// Starts one more `oneprotect-gateway` process and waits until it is
    /// ready (Redis confirmed). Returns its index.
    pub(crate) async fn add_gateway(&mut self, t: GwTuning) -> Result<usize> {
        let bin = oneprotect_tests::ensure_binary("oneprotect-gateway", "oneprotect-gateway");
        let n = self.n_gateways;
        self.n_gateways += 1;
        let port = oneprotect_tests::free_port();
        let admin_port = oneprotect_tests::free_port();
        let mut conf = GatewayToml::new(
            SocketAddr::from(([127, 0, 0, 1], port)),
            SocketAddr::from(([127, 0, 0, 1], admin_port)),
            (
                self.dir.join("server.pem"),
                self.dir.join("server.key"),
                self.dir.join("bundle.pem"),
            ),
            &self.redis_url,
            self.keys.prefix(),
        )
        .route(RouteToml::new("/api", self.echo));
        conf.max_staleness_ms = Some(t.max_staleness_ms);
        conf.heartbeat_ms = Some(t.heartbeat_ms);
        if self.keys.is_sharded() {
            conf.shards = Some(self.keys.shards());
        }
        conf.threads = Some(1);
        if let Some((key, http)) = &self.rotation {
            conf.assertion = Some((key.clone(), FLEET_KID.to_owned()));
            conf = conf.route(RouteToml::new("/api/v1/agents", http).named("enroll-api"));
        }
        let toml = conf.render();
        let cfg_path = write(&self.dir, &format!("gateway-{n}.toml"), &toml);
        let log = std::fs::File::create(self.dir.join(format!("gateway-{n}.log")))?;
        let child = tokio::process::Command::new(bin)
            .arg("--config")
            .arg(&cfg_path)
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .context("spawn oneprotect-gateway")?;
        let gw = GatewayProc {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
            child: Some(child),
        };
        self.gateways.push(gw);
        let i = self.gateways.len() - 1;
        self.wait_ready(i).await?;
        Ok(i)
    }

    /// Waits (bounded) until gateway `i` answers `/readyz` with 200.
    pub(crate) async fn wait_ready(&self, i: usize) -> Result<()> {
        for _ in 0..POLLS {
            if admin_status(self.gateways[i].admin, "/readyz").await == Some(200) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        anyhow::bail!("gateway {i} not ready:\n{}", self.gateway_log(i))
    }

    /// What gateway `i` has logged so far.
    pub(crate) fn gateway_log(&self, i: usize) -> String {
        std::fs::read_to_string(self.dir.join(format!("gateway-{i}.log"))).unwrap_or_default()
    }

    /// Makes one more tenant (as `enroll-api tenant create` does) and an
    /// admin key of it.
    pub(crate) async fn add_tenant(&self, name: &str) -> Result<(TenantId, String)> {
        let tenant = cli::tenant_create(&self.cfg, name, Some(3600)).await?;
        let key = cli::admin_key_create(&self.cfg, tenant, "fleet").await?;
        Ok((tenant, key.expose_secret().to_owned()))
    }

    /// Enrolls one agent through the real exchange (openssl key and CSR).
    pub(crate) async fn enroll(&self, name: &str) -> Result<Agent> {
        self.enroll_in(self.tenant, &self.key, name).await
    }

    /// [`Fleet::enroll`] in `tenant`, with its admin key `key`.
    pub(crate) async fn enroll_in(&self, tenant: TenantId, key: &str, name: &str) -> Result<Agent> {
        let csr = openssl_csr(&self.dir, name)?;
        let body = self.client.enroll(key, name, &csr).await?;
        let pem = format!(
            "{}{}",
            body["certificate_pem"].as_str().context("cert")?,
            body["chain_pem"].as_str().context("chain")?
        );
        let key = std::fs::read_to_string(self.dir.join(format!("{name}.key")))?;
        Ok(Agent {
            id: body["agent_id"].as_str().context("agent_id")?.to_owned(),
            tenant,
            serial: body["serial"].as_str().context("serial")?.to_owned(),
            tls: self.agent_tls(&pem, &key)?,
        })
    }

    /// A client config presenting `chain_pem` (leaf first) with `key_pem`,
    /// trusting the gateways' server certificate.
    pub(crate) fn agent_tls(
        &self,
        chain_pem: &str,
        key_pem: &str,
    ) -> Result<Arc<rustls::ClientConfig>> {
        let chain: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(chain_pem.as_bytes()).collect::<Result<_, _>>()?;
        let key = PrivateKeyDer::from_pem_slice(key_pem.as_bytes())?;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from(self.server_pki.root_der()))?;
        let mut tls = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Arc::new(tls))
    }

    pub(crate) fn agent_key(&self, a: &Agent) -> String {
        self.keys
            .agent_status(&a.tenant, &a.id.parse().expect("agent id"))
    }

    pub(crate) fn cert_key(&self, a: &Agent) -> String {
        self.keys
            .cert_status(&a.tenant, &a.serial.parse().expect("serial"))
    }

    /// A key's value, read through the same topology (None when missing or
    /// unreachable).
    pub(crate) async fn redis_get(&self, key: &str) -> Option<String> {
        let fut = async {
            let mut c = self.redis.connect().await.ok()?;
            redis::cmd("GET")
                .arg(key)
                .query_async::<Option<String>>(&mut c)
                .await
                .ok()?
        };
        tokio::time::timeout(Duration::from_secs(2), fut)
            .await
            .ok()
            .flatten()
    }

    /// Waits (bounded) until both of the agent's keys hold `want`; returns
    /// the instant it was first seen.
    pub(crate) async fn wait_projection(&self, a: &Agent, want: &str) -> Result<Instant> {
        let (ak, ck) = (self.agent_key(a), self.cert_key(a));
        for _ in 0..POLLS * 4 {
            if self.redis_get(&ak).await.as_deref() == Some(want)
                && self.redis_get(&ck).await.as_deref() == Some(want)
            {
                return Ok(Instant::now());
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        anyhow::bail!("{} never became {want} in Redis", a.id)
    }

    /// The live gateways' presences (`{prefix}gateways`, ADR-0022): those
    /// whose `confirmed_until_ms` is still ahead; empty when Redis does not
    /// answer.
    pub(crate) async fn live_gateways(&self) -> Vec<oneprotect_identity::GatewayPresence> {
        let fut = async {
            let mut c = self.redis.connect().await.ok()?;
            redis::cmd("HGETALL")
                .arg(self.keys.gateways())
                .query_async::<Vec<(String, String)>>(&mut c)
                .await
                .ok()
        };
        let raw = tokio::time::timeout(Duration::from_secs(2), fut)
            .await
            .ok()
            .flatten()
            .unwrap_or_default();
        let now = oneprotect_identity::revocation::unix_ms_now();
        raw.into_iter()
            .filter_map(|(_, json)| serde_json::from_str(&json).ok())
            .filter(|p: &oneprotect_identity::GatewayPresence| p.is_live(now))
            .collect()
    }

    pub(crate) async fn revoke(&self, a: &Agent) -> Result<Reply> {
        self.revoke_with(&self.key, a).await
    }

    /// [`Fleet::revoke`] with the admin key `key` of the agent's tenant.
    pub(crate) async fn revoke_with(&self, key: &str, a: &Agent) -> Result<Reply> {
        self.client
            .send(
                "POST",
                &format!("/api/v1/agents/{}/revoke", a.id),
                Some(key),
                Some(json!({"reason": "device lost"})),
            )
            .await
    }
}

/// GET on a gateway's admin listener; None when it does not answer.
pub(crate) async fn admin_status(admin: SocketAddr, path: &str) -> Option<u16> {
    let fut = async {
        let stream = TcpStream::connect(admin).await.ok()?;
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .ok()?;
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .ok()?;
        Some(s.send_request(req).await.ok()?.status().as_u16())
    };
    tokio::time::timeout(Duration::from_secs(2), fut)
        .await
        .ok()
        .flatten()
}

/// One request's outcome: when it was sent and what came back (0 = the
/// connection failed).
#[derive(Debug, Clone)]
pub(crate) struct Sample {
    pub(crate) agent: usize,
    pub(crate) gateway: usize,
    pub(crate) sent: Instant,
    pub(crate) status: u16,
    pub(crate) code: String,
}

/// A keep-alive sender: reconnects when the gateway closes the connection.
pub(crate) struct Sender {
    tls: Arc<rustls::ClientConfig>,
    addr: SocketAddr,
    s: Option<hyper::client::conn::http1::SendRequest<Full<Bytes>>>,
}

impl Sender {
    pub(crate) fn new(agent: &Agent, addr: SocketAddr) -> Self {
        Self {
            tls: agent.tls.clone(),
            addr,
            s: None,
        }
    }

    async fn connect(&self) -> Result<hyper::client::conn::http1::SendRequest<Full<Bytes>>> {
        let tcp = TcpStream::connect(self.addr).await?;
        let tls = tokio_rustls::TlsConnector::from(self.tls.clone())
            .connect(ServerName::try_from("localhost")?, tcp)
            .await?;
        let (s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls)).await?;
        tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok(s)
    }

    /// Sends one GET; (status, problem code). Status 0: no answer.
    pub(crate) async fn send(&mut self, path: &str) -> (u16, String) {
        let fut = async {
            if self.s.as_ref().is_none_or(|s| s.is_closed()) {
                self.s = Some(self.connect().await?);
            }
            let s = self.s.as_mut().context("sender")?;
            s.ready().await?;
            let resp = s.send_request(request(path, &[])).await?;
            let r = read(resp).await?;
            anyhow::Ok((r.status, r.body["code"].as_str().unwrap_or("").to_owned()))
        };
        match tokio::time::timeout(Duration::from_secs(10), fut).await {
            Ok(Ok(x)) => x,
            _ => {
                self.s = None;
                (0, String::new())
            }
        }
    }
}

/// Bounded load: every agent sends through every gateway (one keep-alive
/// connection each, one request per `pause`) until `stop` or `max` requests
/// per pair.
pub(crate) struct Load {
    pub(crate) stop: Arc<AtomicBool>,
    pub(crate) samples: Arc<Mutex<Vec<Sample>>>,
    tasks: tokio::task::JoinSet<()>,
}

impl Load {
    pub(crate) fn start(
        agents: &[Agent],
        gateways: &[SocketAddr],
        pause: Duration,
        max: usize,
    ) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let samples = Arc::new(Mutex::new(Vec::new()));
        let mut tasks = tokio::task::JoinSet::new();
        for (ai, a) in agents.iter().enumerate() {
            for (gi, g) in gateways.iter().enumerate() {
                let mut sender = Sender::new(a, *g);
                let stop = stop.clone();
                let samples = samples.clone();
                tasks.spawn(async move {
                    for _ in 0..max {
                        if stop.load(Ordering::Relaxed) {
                            return;
                        }
                        let sent = Instant::now();
                        let (status, code) = sender.send("/api/load").await;
                        samples.lock().unwrap().push(Sample {
                            agent: ai,
                            gateway: gi,
                            sent,
                            status,
                            code,
                        });
                        tokio::time::sleep(pause).await;
                    }
                });
            }
        }
        Self {
            stop,
            samples,
            tasks,
        }
    }

    pub(crate) async fn finish(mut self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        let s = self.samples.lock().unwrap().clone();
        s
    }

    pub(crate) fn len(&self) -> usize {
        self.samples.lock().unwrap().len()
    }

    /// Waits until `n` more samples than now were taken (bounded).
    pub(crate) async fn more(&self, n: usize) {
        let start = self.len();
        for _ in 0..POLLS * 4 {
            if self.len() >= start + n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        panic!("load stalled");
    }
}
