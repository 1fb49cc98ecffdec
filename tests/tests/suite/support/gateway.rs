//! The in-process gateway ([`start_gateway`] → [`Gw`]) in front of an echo
//! upstream, and HTTP/1.1 and HTTP/2 clients for it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use oneprotect_identity::revocation::Change;
use oneprotect_identity::{
    AgentIdentity, AgentStatus, Announcement, AssertionVerifier, CertStatus, KeySchema,
};
use oneprotect_testpki::{Leaf, TenantCa, TestPki};
use redis::AsyncCommands;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::{TcpListener, TcpStream};

use super::gateway_toml::{GatewayToml, RouteToml};

pub(crate) const TD: &str = "oneprotect.test";
pub(crate) const EXCHANGE: &str = "/api/v1/agent-enrollment/exchange";

/// Every path any echo upstream of this test process has served (tests put a
/// unique id in a path they need to find or not find here).
pub(crate) fn seen_paths() -> &'static std::sync::Mutex<Vec<String>> {
    static SEEN: std::sync::OnceLock<std::sync::Mutex<Vec<String>>> = std::sync::OnceLock::new();
    SEEN.get_or_init(|| std::sync::Mutex::new(Vec::new()))
}

/// The echo upstreams' answer: the request's path, headers (every copy)
/// and body length as JSON; it reads the whole body first, as a real API
/// would, and records the path in [`seen_paths`].
pub(crate) async fn echo(
    req: hyper::Request<hyper::body::Incoming>,
) -> Result<hyper::Response<Full<Bytes>>, std::convert::Infallible> {
    let mut map = serde_json::Map::new();
    for (k, v) in req.headers() {
        let e = map
            .entry(k.as_str().to_owned())
            .or_insert_with(|| serde_json::Value::Array(vec![]));
        if let serde_json::Value::Array(a) = e {
            a.push(v.to_str().unwrap_or("?").into());
        }
    }
    let path = req.uri().path().to_owned();
    seen_paths()
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push(path.clone());
    let body_len = req
        .into_body()
        .collect()
        .await
        .map_or(0, |b| b.to_bytes().len());
    let body = serde_json::json!({"path": path, "headers": map, "body_len": body_len});
    Ok(hyper::Response::new(Full::new(Bytes::from(
        body.to_string(),
    ))))
}

/// An upstream that answers every request with its path and headers as JSON.
pub(crate) async fn start_echo() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(echo);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                    .await;
            });
        }
    });
    addr
}

pub(crate) struct Gw {
    pub(crate) dir: tempfile::TempDir,
    pub(crate) pki: TestPki,
    pub(crate) ca: TenantCa,
    pub(crate) leaf: Leaf,
    pub(crate) id: AgentIdentity,
    pub(crate) keys: KeySchema,
    pub(crate) redis_url: String,
    pub(crate) addr: SocketAddr,
    pub(crate) admin: SocketAddr,
    pub(crate) trust: Arc<oneprotect_gateway::tls::TrustStore>,
    pub(crate) verifier: AssertionVerifier,
    running: Option<oneprotect_gateway::RunningGateway>,
}

impl Drop for Gw {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.stop();
        }
    }
}

pub(crate) fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

pub(crate) struct Opts {
    pub(crate) redis_url: String,
    pub(crate) max_staleness_ms: u64,
    pub(crate) heartbeat_ms: u64,
    pub(crate) require_client_cert: bool,
    /// Redis is reachable: seed the agent's status and wait for readiness.
    pub(crate) redis_up: bool,
    /// More routes, after the standard ones.
    pub(crate) routes: Vec<RouteToml>,
    /// More TOML appended to the config, after the routes (route keys
    /// [`RouteToml`] does not have, other sections).
    pub(crate) extra_routes: String,
    /// More `[listener]` keys.
    pub(crate) listener_extra: String,
}

impl Opts {
    pub(crate) fn shared_redis() -> Self {
        Self {
            redis_url: oneprotect_tests::require_redis(),
            max_staleness_ms: 5000,
            heartbeat_ms: 1000,
            require_client_cert: false,
            redis_up: true,
            routes: Vec::new(),
            extra_routes: String::new(),
            listener_extra: String::new(),
        }
    }
}

pub(crate) async fn start_gateway(opts: Opts) -> Gw {
    let echo = start_echo().await;
    let dir = tempfile::tempdir().unwrap();
    let pki = TestPki::new(TD);
    let ca = pki.tenant_ca(&uuid::Uuid::new_v4().to_string());
    let leaf = ca.agent(&uuid::Uuid::new_v4().to_string());
    let id = AgentIdentity::from_chain(&leaf.cert_der, &ca.cert_der).unwrap();
    let server = pki.server_cert(&["localhost", "127.0.0.1"]);
    let cert = write(dir.path(), "server.pem", &server.cert_pem);
    let key = write(dir.path(), "server.key", &server.key_pem);
    let bundle = write(dir.path(), "bundle.pem", &pki.root_pem());
    let prefix = oneprotect_tests::unique_redis_prefix("gateway");
    let port = oneprotect_tests::free_port();
    let admin_port = oneprotect_tests::free_port();
    // Nothing listens there: the upstream is down.
    let dead = oneprotect_tests::free_port();
    let mut conf = GatewayToml::new(
        SocketAddr::from(([127, 0, 0, 1], port)),
        SocketAddr::from(([127, 0, 0, 1], admin_port)),
        (cert, key, bundle),
        &opts.redis_url,
        &prefix,
    );
    conf.require_client_cert = Some(opts.require_client_cert);
    conf.listener_extra = opts.listener_extra;
    conf.max_staleness_ms = Some(opts.max_staleness_ms);
    conf.heartbeat_ms = Some(opts.heartbeat_ms);
    if !opts.require_client_cert {
        conf = conf.route(RouteToml::new(EXCHANGE, echo).without_identity());
    }
    conf.extra = opts.extra_routes;
    conf = conf.route(RouteToml::new("/api", echo).named("api")).route(
        RouteToml::new("/dead", format!("127.0.0.1:{dead}"))
            .without_health_check()
            .connect_timeout_ms(500),
    );
    conf.routes.extend(opts.routes);
    let toml = conf.render();
    let cfg_path = write(dir.path(), "gateway.toml", &toml);
    let cfg = oneprotect_gateway::Prepared::load(
        oneprotect_gateway::Config::from_toml(&toml, &cfg_path).unwrap(),
    )
    .unwrap();
    let app = tokio::task::spawn_blocking(move || oneprotect_gateway::build(cfg).unwrap())
        .await
        .unwrap();
    let trust = app.trust.clone();
    // The "/api" route's audience.
    let verifier =
        AssertionVerifier::new("api").add_key(app.assertions.kid(), app.assertions.public_key());
    let running = app.spawn();
    let gw = Gw {
        dir,
        pki,
        ca,
        leaf,
        id,
        keys: KeySchema::new(prefix),
        redis_url: opts.redis_url,
        addr: SocketAddr::from(([127, 0, 0, 1], port)),
        admin: SocketAddr::from(([127, 0, 0, 1], admin_port)),
        trust,
        verifier,
        running: Some(running),
    };
    if opts.redis_up {
        gw.set_active(&gw.id).await;
        gw.wait_ready().await;
    } else {
        for _ in 0..200 {
            if TcpStream::connect(gw.admin).await.is_ok()
                && TcpStream::connect(gw.addr).await.is_ok()
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    gw
}

impl Gw {
    /// The agent's chain and key and the root, as PEM files for an
    /// independent client (`curl --cert/--key/--cacert`).
    pub(crate) fn client_pem_files(&self) -> (PathBuf, PathBuf, PathBuf) {
        let dir = self.dir.path();
        let chain = write(
            dir,
            "agent.pem",
            &format!("{}{}", self.leaf.cert_pem, self.ca.cert_pem),
        );
        let key = write(dir, "agent.key", &self.leaf.key_pem);
        let root = write(dir, "root.pem", &self.pki.root_pem());
        (chain, key, root)
    }

    pub(crate) async fn redis(&self) -> redis::aio::MultiplexedConnection {
        redis::Client::open(self.redis_url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    }

    pub(crate) async fn set_active(&self, id: &AgentIdentity) {
        let mut r = self.redis().await;
        let _: () = r
            .set(
                self.keys.cert_status(&id.tenant(), &id.serial()),
                CertStatus::Active.as_str(),
            )
            .await
            .unwrap();
        let _: () = r
            .set(
                self.keys.agent_status(&id.tenant(), &id.agent()),
                AgentStatus::Active.as_str(),
            )
            .await
            .unwrap();
    }

    /// Writes the new state and announces it, as the enroll-api does.
    pub(crate) async fn announce(&self, key: String, value: &str, change: Change) {
        let mut r = self.redis().await;
        let _: () = r.set(key, value).await.unwrap();
        let seq: u64 = r.incr(self.keys.revocation_seq(), 1).await.unwrap();
        let msg = serde_json::to_string(&Announcement { seq, change }).unwrap();
        let receivers: u64 = r
            .publish(self.keys.revocation_channel(), msg)
            .await
            .unwrap();
        assert!(receivers >= 1, "the gateway is subscribed");
    }

    pub(crate) async fn revoke_cert(&self) {
        let serial = self.id.serial();
        self.announce(
            self.keys.cert_status(&self.id.tenant(), &serial),
            CertStatus::Revoked.as_str(),
            Change::Cert {
                serial,
                status: CertStatus::Revoked,
            },
        )
        .await;
    }

    pub(crate) async fn revoke_agent(&self) {
        self.announce(
            self.keys.agent_status(&self.id.tenant(), &self.id.agent()),
            AgentStatus::Revoked.as_str(),
            Change::Agent {
                tenant_id: self.id.tenant(),
                agent_id: self.id.agent(),
                status: AgentStatus::Revoked,
            },
        )
        .await;
    }

    pub(crate) async fn cleanup(&self) {
        if let Ok(c) = redis::Client::open(self.redis_url.as_str()) {
            if let Ok(mut r) = c.get_multiplexed_async_connection().await {
                let keys: Vec<String> = r
                    .keys(self.keys.all_keys_pattern())
                    .await
                    .unwrap_or_default();
                if !keys.is_empty() {
                    let _: Result<(), _> = r.del(keys).await;
                }
            }
        }
    }

    pub(crate) async fn admin_get(&self, path: &str) -> (u16, String) {
        let stream = TcpStream::connect(self.admin).await.unwrap();
        let (mut s, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
                .await
                .unwrap();
        tokio::spawn(conn);
        let req = hyper::Request::get(path)
            .header("host", "admin")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = s.send_request(req).await.unwrap();
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, String::from_utf8_lossy(&body).into_owned())
    }

    /// Waits (bounded) until `/readyz` is 200 and the mTLS listener accepts:
    /// pingora starts its services independently, so the admin listener can
    /// be up before the proxy's on a loaded machine.
    pub(crate) async fn wait_ready(&self) {
        for _ in 0..400 {
            if TcpStream::connect(self.admin).await.is_ok()
                && self.admin_get("/readyz").await.0 == 200
                && TcpStream::connect(self.addr).await.is_ok()
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("gateway not ready");
    }

    pub(crate) fn client(
        &self,
        cert: Option<(&Leaf, &TenantCa)>,
        alpn: &[u8],
    ) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(CertificateDer::from(self.pki.root_der()))
            .unwrap();
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
        let mut cfg = match cert {
            Some((leaf, ca)) => builder
                .with_client_auth_cert(
                    vec![
                        CertificateDer::from(leaf.cert_der.clone()),
                        CertificateDer::from(ca.cert_der.clone()),
                    ],
                    PrivateKeyDer::try_from(leaf.key_der.clone()).unwrap(),
                )
                .unwrap(),
            None => builder.with_no_client_auth(),
        };
        cfg.alpn_protocols = vec![alpn.to_vec()];
        Arc::new(cfg)
    }

    pub(crate) async fn tls(
        &self,
        cfg: Arc<rustls::ClientConfig>,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(self.addr).await?;
        tokio_rustls::TlsConnector::from(cfg)
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
    }

    /// An HTTP/1.1 connection; the task handle ends when the connection does.
    pub(crate) async fn h1(
        &self,
        cert: Option<(&Leaf, &TenantCa)>,
    ) -> anyhow::Result<(
        hyper::client::conn::http1::SendRequest<Full<Bytes>>,
        tokio::task::JoinHandle<()>,
    )> {
        let stream = self.tls(self.client(cert, b"http/1.1")).await?;
        let (sender, conn) =
            hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        Ok((sender, task))
    }
}

pub(crate) struct Resp {
    pub(crate) status: u16,
    pub(crate) headers: http::HeaderMap,
    pub(crate) body: serde_json::Value,
}

pub(crate) fn request(path: &str, extra: &[(&str, &str)]) -> hyper::Request<Full<Bytes>> {
    let mut b = hyper::Request::get(path).header("host", "localhost");
    for (k, v) in extra {
        b = b.header(*k, *v);
    }
    b.body(Full::new(Bytes::new())).unwrap()
}

pub(crate) async fn h1_send(
    s: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    path: &str,
    extra: &[(&str, &str)],
) -> anyhow::Result<Resp> {
    s.ready().await?;
    let resp = s.send_request(request(path, extra)).await?;
    read(resp).await
}

pub(crate) async fn read(resp: hyper::Response<hyper::body::Incoming>) -> anyhow::Result<Resp> {
    let status = resp.status().as_u16();
    let headers = resp.headers().clone();
    let bytes = resp.into_body().collect().await?.to_bytes();
    let body = serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null);
    Ok(Resp {
        status,
        headers,
        body,
    })
}

pub(crate) fn upstream_headers(r: &Resp) -> &serde_json::Map<String, serde_json::Value> {
    r.body["headers"].as_object().expect("echo body")
}

pub(crate) fn only(r: &Resp, name: &str) -> String {
    let v = upstream_headers(r)
        .get(name)
        .unwrap_or_else(|| panic!("upstream did not get {name}: {}", r.body));
    let a = v.as_array().unwrap();
    assert_eq!(a.len(), 1, "{name} must appear exactly once: {a:?}");
    a[0].as_str().unwrap().to_owned()
}

pub(crate) async fn refused(gw: &Gw, leaf: &Leaf, ca: &TenantCa) -> bool {
    match gw.h1(Some((leaf, ca))).await {
        Err(_) => true,
        Ok((mut s, _t)) => h1_send(&mut s, "/api/x", &[]).await.is_err(),
    }
}
