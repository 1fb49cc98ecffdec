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
            let key_file = dir.join("assertion.pk8");
            std::fs::write(&key_file, pkcs8)?;
            use base64::Engine as _;
            let public =
                base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signer.public_key());
            cfg.listen.http = "127.0.0.1:0".into();
            cfg.rotation.assertion.keys = vec![TrustedKey {
                kid: GATEWAY_KID.into(),
                public_key: public,
            }];
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
            stack.gateway = Some(start_gateway(&stack, upstream, signer, key_file).await?);
            stack.wait_gateway().await?;
        }
        Ok(stack)
    }
}

/// The in-process gateway for `stack`, trusting its enroll-api's bundle,
/// routing to `upstream`, signing with `signer` (its key in `key_file`).
async fn start_gateway(
    stack: &Stack,
    upstream: SocketAddr,
    signer: AssertionSigner,
    key_file: PathBuf,
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
    .route(RouteToml::new("/api/v1/agents", upstream))
    .route(RouteToml::new("/healthz", upstream));
    conf.assertion = Some((key_file, GATEWAY_KID.to_owned()));
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
        signer,
    })
}

impl Stack {
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
