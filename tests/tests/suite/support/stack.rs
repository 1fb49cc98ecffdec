//! The in-process enroll-api on its own PostgreSQL schema and Redis key
//! prefix, optionally behind the in-process gateway: [`Stack::builder`]
//! states what a test's stack differs in, [`StackBuilder::start`] starts it
//! and the [`Stack`] drops the schema and the keys when it goes.
//!
//! ```ignore
//! let stack = Stack::builder("rotation").gateway().grace_secs(10).start().await?;
//! ```
//!
//! An area's own helpers over a stack stay in its file (`impl Stack` there).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, Result};
use oneprotect_agent::client::Endpoint;
use oneprotect_enroll_api::config::{Config, TrustedKey};
use oneprotect_enroll_api::{cli, service};
use oneprotect_identity::{AssertionSigner, KeySchema, TenantId};
use oneprotect_testpki::TestPki;
use redis::AsyncCommands;

use super::enroll::{base_config, create_schema, Client};
use super::gateway::TD;
use super::gateway_toml::{GatewayToml, RouteToml};

/// The kid of a stack gateway's assertion key (the one the enroll-api pins).
pub(crate) const GATEWAY_KID: &str = "gw-rotation-test";
/// Poll attempts (50 ms apart) before the gateway is given up on.
const POLLS: usize = 600;

type Tweak = Box<dyn FnOnce(&mut Config) + Send>;

/// What a [`Stack`] differs in; see [`Stack::builder`].
pub(crate) struct StackBuilder {
    label: String,
    redis_url: Option<String>,
    gateway: bool,
    grace_secs: Option<u64>,
    leaf_lifetime_secs: u64,
    tweaks: Vec<Tweak>,
    routes: Vec<RouteToml>,
    rotatable_key: bool,
}

/// A running enroll-api (and gateway, if asked for), its admin client and
/// the tenant and admin key made for the test.
pub(crate) struct Stack {
    _tmp: tempfile::TempDir,
    /// The enroll-api's data directory; the gateway's files are here too.
    pub(crate) dir: PathBuf,
    pub(crate) cfg: Config,
    pub(crate) running: Option<service::Running>,
    /// HTTPS to the enroll-api, trusting its dev certificate.
    pub(crate) client: Client,
    /// The tenant `acme`.
    pub(crate) tenant: TenantId,
    /// An admin key of [`Stack::tenant`].
    pub(crate) key: String,
    pub(crate) keys: KeySchema,
    pub(crate) redis_url: String,
    schema: String,
    gateway: Option<StackGateway>,
}

/// The in-process gateway in front of a [`Stack`]'s enroll-api.
pub(crate) struct StackGateway {
    running: Option<oneprotect_gateway::RunningGateway>,
    /// The mTLS listener.
    pub(crate) addr: SocketAddr,
    /// `https://{addr}`.
    pub(crate) url: String,
    /// The admin listener (`/metrics`, `/readyz`).
    pub(crate) admin: SocketAddr,
    /// The roots (PEM file) that the gateway's server certificate chains to.
    pub(crate) roots: PathBuf,
    /// The enroll-api's plain loopback listener the gateway routes to.
    pub(crate) upstream: SocketAddr,
    /// The gateway's signing key, to forge what a gateway with a stale
    /// cache would send.
    pub(crate) signer: AssertionSigner,
    /// The file the gateway loads its signing key from.
    pub(crate) key_file: PathBuf,
}

impl Drop for Stack {
    fn drop(&mut self) {
        if let Some(g) = self.gateway.as_mut().and_then(|g| g.running.take()) {
            g.stop();
        }
        oneprotect_tests::drop_schema_and_keys(
            &self.schema,
            &self.redis_url,
            &self.keys.all_keys_pattern(),
        );
    }
}

impl Stack {
    /// A stack for the test `label` (in its schema and prefix names): the
    /// enroll-api on PostgreSQL and the shared Redis with the suite's
    /// defaults ([`base_config`], 16 connections, the relay polling every
    /// 200 ms), the tenant's leaves living 3600 s; no gateway.
    pub(crate) fn builder(label: &str) -> StackBuilder {
        StackBuilder {
            label: label.to_owned(),
            redis_url: None,
            gateway: false,
            grace_secs: None,
            leaf_lifetime_secs: 3600,
            tweaks: Vec::new(),
            routes: Vec::new(),
            rotatable_key: false,
        }
    }

    /// The gateway; panics on a stack built without [`StackBuilder::gateway`].
    pub(crate) fn gateway(&self) -> &StackGateway {
        self.gateway
            .as_ref()
            .expect("a stack built with .gateway()")
    }

    /// The value of `key` in the stack's Redis.
    pub(crate) async fn redis_get(&self, key: &str) -> Result<Option<String>> {
        Ok(redis_conn(&self.redis_url).await?.get(key).await?)
    }
}

/// A connection to the Redis at `url`.
pub(crate) async fn redis_conn(url: &str) -> Result<redis::aio::MultiplexedConnection> {
    Ok(redis::Client::open(url)?
        .get_multiplexed_async_connection()
        .await?)
}

impl StackBuilder {
    /// The Redis at `url` instead of the shared one (the enroll-api's and
    /// the stack's; the gateway's too).
    pub(crate) fn redis_url(mut self, url: &str) -> Self {
        self.redis_url = Some(url.to_owned());
        self
    }

    /// The in-process gateway in front: the exchange (without identity),
    /// `/api/v1/agents` and `/healthz` routed to the enroll-api's plain
    /// loopback listener, signing identity assertions with a key the
    /// enroll-api pins ([`GATEWAY_KID`]).
    pub(crate) fn gateway(mut self) -> Self {
        self.gateway = true;
        self
    }

    /// The gateway's assertion key replaceable while it runs: no pinned
    /// kid (the key's thumbprint, which the enroll-api pins), the key file
    /// polled every second, assertions living 4 s (re-signed 1 s before).
    pub(crate) fn rotatable_assertion_key(mut self) -> Self {
        self.rotatable_key = true;
        self
    }

    /// One more gateway route (after the enroll-api's).
    pub(crate) fn gateway_route(mut self, route: RouteToml) -> Self {
        self.routes.push(route);
        self
    }

    /// Rotation: the previous certificate superseded `secs` after a
    /// rotation unless confirmed sooner, the sweep every 200 ms.
    pub(crate) fn grace_secs(mut self, secs: u64) -> Self {
        self.grace_secs = Some(secs);
        self
    }

    /// The tenant's certificate lifetime (default 3600 s).
    pub(crate) fn leaf_lifetime_secs(mut self, secs: u64) -> Self {
        self.leaf_lifetime_secs = secs;
        self
    }

    /// `tweak` applied to the enroll-api's configuration, after all else.
    pub(crate) fn config(mut self, tweak: impl FnOnce(&mut Config) + Send + 'static) -> Self {
        self.tweaks.push(Box::new(tweak));
        self
    }

    /// Creates the schema, starts the enroll-api with tenant `acme` and an
    /// admin key, then the gateway (if asked for) and waits until it
    /// listens.
    pub(crate) async fn start(self) -> Result<Stack> {
        let tmp = tempfile::tempdir()?;
        let dir = tmp.path().to_owned();
        let url = oneprotect_tests::require_postgres();
        let redis_url = self
            .redis_url
            .unwrap_or_else(oneprotect_tests::require_redis);
        let schema = oneprotect_tests::unique_name(&self.label);
        create_schema(&url, &schema).await?;
        let prefix = oneprotect_tests::unique_redis_prefix(&self.label);

        let mut cfg = base_config(&dir);
        cfg.database.max_connections = 16;
        cfg.database.url = Some(url);
        cfg.database.schema = Some(schema.clone());
        cfg.redis.url = Some(redis_url.clone());
        cfg.redis.key_prefix = prefix.clone();
        cfg.redis.relay_poll_interval_ms = 200;
        if let Some(secs) = self.grace_secs {
            cfg.rotation.grace_secs = secs;
            cfg.rotation.sweep_interval_ms = 200;
        }
        let assertion = if self.gateway {
            // The gateway's assertion key: its public half is what the
            // enroll-api pins.
            let (signer, pkcs8) = AssertionSigner::generate(GATEWAY_KID)
                .map_err(|_| anyhow::anyhow!("generate key"))?;
            let signer = if self.rotatable_key {
                AssertionSigner::from_pkcs8_thumbprint_kid(&pkcs8)
                    .map_err(|_| anyhow::anyhow!("load key"))?
            } else {
                signer
            };
            let key_file = dir.join("assertion.pk8");
            std::fs::write(&key_file, pkcs8)?;
            cfg.listen.http = "127.0.0.1:0".into();
            cfg.rotation.assertion.keys = vec![trusted_key(&signer)];
            Some((signer, key_file))
        } else {
            None
        };
        for tweak in self.tweaks {
            tweak(&mut cfg);
        }
        let cfg = cfg.validate()?;
        let tenant = cli::tenant_create(&cfg, "acme", Some(self.leaf_lifetime_secs)).await?;
        let key = cli::admin_key_create(&cfg, tenant, "e2e").await?;
        let state = service::build_state(&cfg, service::system_clock()).await?;
        let running = service::start(&cfg, state).await?;
        let addr = running.https_addr.context("no https listener")?;
        let http = running.http_addr;
        let client = Client::new(addr, &dir.join("tls/dev-cert.pem"))?;
        let mut stack = Stack {
            _tmp: tmp,
            dir,
            cfg,
            running: Some(running),
            client,
            tenant,
            key: key.expose_secret().to_owned(),
            keys: KeySchema::new(prefix),
            redis_url,
            schema,
            gateway: None,
        };
        if let Some((signer, key_file)) = assertion {
            let upstream = http.context("no http listener")?;
            let key = GatewayKey {
                signer,
                file: key_file,
                rotatable: self.rotatable_key,
            };
            stack.gateway = Some(start_gateway(&stack, upstream, key, self.routes).await?);
            stack.wait_gateway().await?;
        }
        Ok(stack)
    }
}

/// The enroll-api's entry for the gateway key of `signer`.
pub(crate) fn trusted_key(signer: &AssertionSigner) -> TrustedKey {
    use base64::Engine as _;
    TrustedKey {
        kid: signer.kid().to_owned(),
        public_key: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signer.public_key()),
    }
}

/// A stack gateway's assertion key.
struct GatewayKey {
    signer: AssertionSigner,
    file: PathBuf,
    rotatable: bool,
}

/// The in-process gateway for `stack`, trusting its enroll-api's bundle,
/// routing to `upstream`, signing with `key`.
async fn start_gateway(
    stack: &Stack,
    upstream: SocketAddr,
    key: GatewayKey,
    routes: Vec<RouteToml>,
) -> Result<StackGateway> {
    let dir = &stack.dir;
    let bundle = stack
        .client
        .send("GET", "/api/v1/trust-bundle", None, None)
        .await?;
    let bundle = bundle.body.as_str().context("trust bundle")?.to_owned();
    let pki = TestPki::new(TD);
    let server = pki.server_cert(&["localhost", "127.0.0.1"]);
    let write = |name: &str, data: &str| -> Result<PathBuf> {
        let p = dir.join(name);
        std::fs::write(&p, data)?;
        Ok(p)
    };
    let cert = write("server.pem", &server.cert_pem)?;
    let server_key = write("server.key", &server.key_pem)?;
    let trust = write("agents-bundle.pem", &bundle)?;
    let roots = write("gateway-roots.pem", &pki.root_pem())?;
    let addr = SocketAddr::from(([127, 0, 0, 1], oneprotect_tests::free_port()));
    let admin = SocketAddr::from(([127, 0, 0, 1], oneprotect_tests::free_port()));
    let mut conf = GatewayToml::new(
        addr,
        admin,
        (cert, server_key, trust),
        &stack.redis_url,
        stack.keys.prefix(),
    )
    .route(RouteToml::new("/api/v1/agent-enrollment/exchange", upstream).without_identity())
    .route(RouteToml::new("/api/v1/agents", upstream).named("enroll-api"))
    .route(RouteToml::new("/healthz", upstream));
    conf.routes.extend(routes);
    if key.rotatable {
        conf.assertion = Some((key.file.clone(), String::new()));
        conf.assertion_extra = "lifetime_secs = 4\nrefresh_before_secs = 1".into();
        conf.bundle_poll_secs = 1;
    } else {
        conf.assertion = Some((key.file.clone(), GATEWAY_KID.to_owned()));
    }
    let toml = conf.render();
    let cfg_path = write("gateway.toml", &toml)?;
    let gcfg = oneprotect_gateway::Prepared::load(oneprotect_gateway::Config::from_toml(
        &toml, &cfg_path,
    )?)?;
    let app = tokio::task::spawn_blocking(move || oneprotect_gateway::build(gcfg)).await??;
    Ok(StackGateway {
        running: Some(app.spawn()),
        addr,
        url: format!("https://{addr}"),
        admin,
        roots,
        upstream,
        signer: key.signer,
        key_file: key.file,
    })
}

impl Stack {
    /// Stops the enroll-api and starts it again on the same addresses with
    /// `tweak` applied to its configuration (a new set of gateway keys).
    pub(crate) async fn restart_enroll_api(
        &mut self,
        tweak: impl FnOnce(&mut Config),
    ) -> Result<()> {
        let running = self
            .running
            .take()
            .context("the enroll-api is not running")?;
        let (https, http) = (running.https_addr, running.http_addr);
        running.shutdown().await;
        let mut cfg = self.cfg.clone();
        if let Some(a) = https {
            cfg.listen.https = a.to_string();
        }
        if let Some(a) = http {
            cfg.listen.http = a.to_string();
        }
        tweak(&mut cfg);
        let cfg = cfg.validate()?;
        let state = service::build_state(&cfg, service::system_clock()).await?;
        self.running = Some(service::start(&cfg, state).await?);
        self.cfg = cfg;
        Ok(())
    }

    /// Waits (bounded) until the gateway's mTLS listener accepts.
    async fn wait_gateway(&self) -> Result<()> {
        let addr = self.gateway().addr;
        for _ in 0..POLLS {
            if tokio::net::TcpStream::connect(addr).await.is_ok() {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        anyhow::bail!("gateway did not start listening")
    }
}

/// An agent enrolled through a stack's gateway, its identity in a state
/// directory as the agent keeps it.
pub(crate) struct Device {
    pub(crate) state: oneprotect_agent::state::StateDir,
    roots: rustls::RootCertStore,
    url: String,
}

impl Stack {
    /// A one-use enrollment token of the stack's tenant.
    pub(crate) async fn token(&self) -> Result<String> {
        let (_, token) = self
            .client
            .create_token(&self.key, serde_json::json!({"ttl_seconds": 600}))
            .await?;
        Ok(token)
    }

    /// Enrolls a device through the gateway; stores its identity in `dir`.
    pub(crate) async fn device(&self, dir: &std::path::Path) -> Result<Device> {
        use oneprotect_agent::enroll::{enroll, AgentMetadata};
        use oneprotect_agent::state::{AgentConfig, StateDir};
        let roots_pem = std::fs::read(&self.gateway().roots)?;
        let roots = oneprotect_agent::tls::roots_from_pem(&roots_pem)?;
        let server = Endpoint::new(
            &self.gateway().url,
            oneprotect_agent::tls::server_only(roots.clone())?,
        )?;
        let token = oneprotect_identity::TokenSecret::new(self.token().await?);
        let enrolled = enroll(&server, &token, &AgentMetadata::this_host()).await?;
        let state = StateDir::open(dir)?;
        state.store_config(
            &AgentConfig {
                enroll_url: self.gateway().url.clone(),
                gateway_url: self.gateway().url.clone(),
            },
            &roots_pem,
        )?;
        state.store(&enrolled)?;
        Ok(Device {
            state,
            roots,
            url: self.gateway().url.clone(),
        })
    }
}

impl Device {
    /// The stored identity.
    pub(crate) fn identity(&self) -> Result<oneprotect_agent::state::Identity> {
        Ok(self.state.load()?)
    }

    /// An endpoint presenting the stored identity.
    pub(crate) fn endpoint(&self) -> Result<Endpoint> {
        let id = self.identity()?;
        self.endpoint_of(&id)
    }

    /// An endpoint presenting `id`.
    pub(crate) fn endpoint_of(&self, id: &oneprotect_agent::state::Identity) -> Result<Endpoint> {
        Ok(Endpoint::new(
            &self.url,
            id.mtls_config(self.roots.clone())?,
        )?)
    }
}

/// A plain-HTTP/1.1 request to a loopback listener; the status and the body
/// as JSON (a string when it is not JSON).
pub(crate) async fn plain(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, String)],
    body: Option<serde_json::Value>,
) -> Result<(u16, serde_json::Value)> {
    use http_body_util::BodyExt as _;
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tcp)).await?;
    tokio::spawn(conn);
    let mut req = http::Request::builder()
        .method(method)
        .uri(path)
        .header("host", "localhost");
    for (k, v) in headers {
        req = req.header(*k, v);
    }
    let bytes = match body {
        Some(v) => {
            req = req.header("content-type", "application/json");
            bytes::Bytes::from(v.to_string())
        }
        None => bytes::Bytes::new(),
    };
    let resp = sender
        .send_request(req.body(http_body_util::Full::new(bytes))?)
        .await?;
    let status = resp.status().as_u16();
    let raw = resp.into_body().collect().await?.to_bytes();
    let body = serde_json::from_slice(&raw)
        .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(&raw).into_owned()));
    Ok((status, body))
}
