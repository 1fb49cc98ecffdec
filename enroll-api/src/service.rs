//! Assembling and running the service: state from configuration, the HTTPS
//! listener (rustls, ring provider) and the optional loopback HTTP listener.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tower::ServiceExt;

use crate::ca::{Ca, CaError};
use crate::clock::{SharedClock, SystemClock};
use crate::config::Config;
use crate::http::{self, AppState, Inner};
use crate::projection::{Projection, ProjectionError};
use crate::ratelimit::RateLimiter;
use crate::relay::RelaySettings;
use crate::secrets::{Pepper, SecretError};
use crate::store::postgres::PgOptions;
use crate::store::{AnyStore, StoreError};

/// Rate-limiter key tables are bounded to this many entries each.
const RATE_LIMIT_KEYS: usize = 100_000;
/// A TLS handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// A request's headers must arrive within this time (slow-loris guard).
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);
/// At most this many HTTPS connections are served at once; further accepts
/// wait for a slot.
const MAX_CONNECTIONS: usize = 10_000;

/// Why the service could not start. The commands in [`crate::cli`] report
/// store, CA and pepper failures through it too.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Storage could not be opened or migrated.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The CA could not be opened.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The pepper could not be loaded.
    #[error(transparent)]
    Secret(#[from] SecretError),
    /// A listener could not be bound, or a file read.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// A TLS certificate or key file could not be read as PEM.
    #[error("TLS: {}: {source}", path.display())]
    TlsFile {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    /// The TLS certificate file holds no certificate.
    #[error("TLS: {}: no certificate", path.display())]
    NoCertificate {
        /// The file.
        path: PathBuf,
    },
    /// The self-signed dev certificate could not be generated.
    #[error("TLS: {0}")]
    DevCertificate(#[source] rcgen::Error),
    /// rustls refused the protocol versions or the certificate and key.
    #[error("TLS: {0}")]
    Tls(#[source] rustls::Error),
    /// The Redis settings are unusable.
    #[error("redis: {0}")]
    Redis(#[source] ProjectionError),
}

/// Opens the configured store (running migrations).
pub async fn open_store(cfg: &Config) -> Result<AnyStore, StoreError> {
    let url = cfg.database_url();
    if let Some(path) = url.strip_prefix("sqlite:") {
        let path = path.strip_prefix("//").unwrap_or(path);
        if let Some(dir) = Path::new(path).parent() {
            if !dir.as_os_str().is_empty() {
                std::fs::create_dir_all(dir)
                    .map_err(|e| StoreError::Database(sqlx::Error::Io(e)))?;
            }
        }
        AnyStore::open_sqlite(Path::new(path), cfg.database.max_connections).await
    } else {
        AnyStore::open_postgres(&PgOptions {
            url,
            schema: cfg.database.schema.clone(),
            app_role: cfg.database.app_role.clone(),
            max_connections: cfg.database.max_connections,
        })
        .await
    }
}

/// Opens the CA directory (generating the root when `ca.auto_init`).
pub fn open_ca(cfg: &Config, clock: SharedClock) -> Result<Ca, CaError> {
    Ca::open(
        &cfg.ca_dir(),
        cfg.trust_domain.clone(),
        clock,
        cfg.ca.auto_init,
    )
}

/// Builds the shared state from configuration with the given clock.
pub async fn build_state(cfg: &Config, clock: SharedClock) -> Result<AppState, StartError> {
    let projection = match &cfg.redis.url {
        Some(url) => {
            let p = Projection::new(url, &cfg.redis.key_prefix, cfg.redis.shards)
                .map_err(StartError::Redis)?;
            tracing::info!(prefix = %cfg.redis.key_prefix, "revocation projection and event relay: Redis configured");
            Some(p)
        }
        None => {
            tracing::warn!(
                "NO REDIS CONFIGURED (redis.url): the revocation projection is not written, so \
                 gateways refuse every agent (fail closed), and lifecycle events stay in the \
                 outbox unpublished. Set redis.url for anything but a store-only test."
            );
            None
        }
    };
    build_state_with_projection(cfg, clock, projection).await
}

/// Builds the shared state with the given projection instead of the
/// configured one (`redis.url` is ignored). The one-process dev stack passes
/// [`Projection::memory`].
pub async fn build_state_with_projection(
    cfg: &Config,
    clock: SharedClock,
    projection: Option<Projection>,
) -> Result<AppState, StartError> {
    let store = open_store(cfg).await?;
    let pepper = Pepper::load(&cfg.pepper_file(), cfg.secrets.generate_pepper)?;
    let ca_cfg = cfg.clone();
    let ca_clock = clock.clone();
    let ca = tokio::task::spawn_blocking(move || open_ca(&ca_cfg, ca_clock))
        .await
        .map_err(|e| StartError::Io("CA task".into(), std::io::Error::other(e)))??;
    let l = &cfg.limits;
    let trust = &cfg.rotation.assertion;
    let mut assertions = oneprotect_identity::AssertionVerifier::new(trust.audience.clone())
        .with_issuer(trust.issuer.clone());
    for k in &trust.keys {
        if let Some(key) = k.key_bytes() {
            assertions = assertions.add_key(k.kid.clone(), key);
        }
    }
    if !cfg.forwarded.trusted_proxies.is_empty() {
        tracing::info!(
            trusted_proxies = ?cfg.forwarded.trusted_proxies,
            "X-Forwarded-For is believed from these peers only (right-most entry)"
        );
    }
    if trust.keys.is_empty() {
        tracing::warn!(
            "no rotation.assertion.keys: the agent endpoints (certificate rotate/confirm) refuse \
             every call with 401 identity_required until a gateway key is configured"
        );
    }
    Ok(AppState::new(Inner {
        store,
        ca: Arc::new(ca),
        pepper,
        clock,
        per_address: RateLimiter::new(
            l.exchange_per_address_per_minute,
            l.exchange_per_address_burst,
            RATE_LIMIT_KEYS,
        ),
        per_token: RateLimiter::new(
            l.exchange_per_token_per_minute,
            l.exchange_per_token_burst,
            RATE_LIMIT_KEYS,
        ),
        token_cache: Default::default(),
        max_body_bytes: l.max_body_bytes,
        body_read_timeout: Duration::from_millis(l.body_read_timeout_ms),
        trusted_proxies: cfg.forwarded.trusted(),
        enforcer: crate::enforce::Enforcer::new(
            projection.clone(),
            Duration::from_millis(cfg.redis.enforcement_deadline_ms),
        ),
        projection,
        assertions,
        jwks: crate::http::keys::PublishedKeys::new(&trust.keys),
        rotation_grace: time::Duration::seconds(
            i64::try_from(cfg.rotation.grace_secs).unwrap_or(i64::MAX),
        ),
        reuse_window: Duration::from_secs(cfg.rotation.reuse_window_secs),
        metrics: crate::metrics::Metrics::new(),
    }))
}

/// The HTTPS certificate and key: the configured files, or a self-signed dev
/// certificate for `localhost` and `127.0.0.1` kept in `data_dir/tls/`.
pub fn tls_material(
    cfg: &Config,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), StartError> {
    let (cert_path, key_path) = match (&cfg.tls.cert_path, &cfg.tls.key_path) {
        (Some(c), Some(k)) => (c.clone(), k.clone()),
        _ => {
            let dir = cfg.data_dir.join("tls");
            let (c, k) = (dir.join("dev-cert.pem"), dir.join("dev-key.pem"));
            if !c.is_file() || !k.is_file() {
                generate_dev_cert(&dir, &c, &k)?;
            }
            (c, k)
        }
    };
    let certs = CertificateDer::pem_file_iter(&cert_path)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|source| StartError::TlsFile {
            path: cert_path.clone(),
            source,
        })?;
    if certs.is_empty() {
        return Err(StartError::NoCertificate { path: cert_path });
    }
    let key = PrivateKeyDer::from_pem_file(&key_path).map_err(|source| StartError::TlsFile {
        path: key_path.clone(),
        source,
    })?;
    Ok((certs, key))
}

fn generate_dev_cert(dir: &Path, cert: &Path, key: &Path) -> Result<(), StartError> {
    let io = |what: &Path| {
        let what = what.display().to_string();
        move |e| StartError::Io(what, e)
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .map_err(StartError::DevCertificate)?;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    use std::io::Write;
    opts.open(key)
        .and_then(|mut f| f.write_all(ck.signing_key.serialize_pem().as_bytes()))
        .map_err(io(key))?;
    std::fs::write(cert, ck.cert.pem()).map_err(io(cert))?;
    tracing::warn!(cert = %cert.display(), "generated a self-signed dev TLS certificate; configure tls.cert_path/key_path in production");
    Ok(())
}

/// A running service.
#[derive(Debug)]
pub struct Running {
    /// The bound HTTPS address.
    pub https_addr: Option<SocketAddr>,
    /// The bound plain HTTP address (loopback).
    pub http_addr: Option<SocketAddr>,
    /// The state the handlers share.
    pub state: AppState,
    shutdown: watch::Sender<bool>,
    tasks: JoinSet<()>,
}

impl Running {
    /// Stops accepting and waits for the listeners to end.
    pub async fn shutdown(mut self) {
        let _ = self.shutdown.send(true);
        while self.tasks.join_next().await.is_some() {}
    }

    /// Waits until a listener ends (they run until shutdown).
    pub async fn wait(mut self) {
        self.tasks.join_next().await;
    }
}

/// Binds the configured listeners and serves `state` on them.
pub async fn start(cfg: &Config, state: AppState) -> Result<Running, StartError> {
    let app = http::router(state.clone());
    let (tx, rx) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let mut https_addr = None;
    let mut http_addr = None;
    if let Some(addr) = cfg.https_addr() {
        let (certs, key) = tls_material(cfg)?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(StartError::Tls)?
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .map_err(StartError::Tls)?;
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        // No resumption: an agent connects here once, for its exchange (its
        // renewals go through the gateway), and the gateway and operators'
        // tools keep their connections. Tickets would cost every exchange
        // two more records, a session-cache entry and the client's work.
        tls.send_tls13_tickets = 0;
        tls.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| StartError::Io(format!("bind {addr}"), e))?;
        https_addr = Some(
            listener
                .local_addr()
                .map_err(|e| StartError::Io("local_addr".into(), e))?,
        );
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
        tasks.spawn(serve_tls(listener, acceptor, app.clone(), rx.clone()));
    }
    if let Some(addr) = cfg.http_addr() {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| StartError::Io(format!("bind {addr}"), e))?;
        http_addr = Some(
            listener
                .local_addr()
                .map_err(|e| StartError::Io("local_addr".into(), e))?,
        );
        let mut rx = rx.clone();
        let app = app.clone();
        tasks.spawn(async move {
            use axum::serve::ListenerExt as _;
            // Nagle off, as on the HTTPS listener.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            let served = axum::serve(
                listener,
                app.into_make_service_with_connect_info::<SocketAddr>(),
            )
            .with_graceful_shutdown(async move {
                let _ = rx.wait_for(|stop| *stop).await;
            })
            .await;
            if let Err(e) = served {
                tracing::error!(error = %e, "HTTP listener failed");
            }
        });
    }
    if let Some(projection) = state.projection.clone() {
        tasks.spawn(crate::relay::run(
            state.store.clone(),
            projection.clone(),
            state.clock.clone(),
            RelaySettings {
                poll_interval: Duration::from_millis(cfg.redis.relay_poll_interval_ms),
                rebuild_if_missing: cfg.redis.rebuild_if_missing,
                wait_replicas: cfg.redis.wait_replicas,
                wait_timeout: Duration::from_millis(cfg.redis.wait_timeout_ms),
            },
            rx.clone(),
        ));
        tasks.spawn(
            crate::reports::Consumer {
                store: state.store.clone(),
                projection,
                clock: state.clock.clone(),
                metrics: state.metrics.clone(),
                window: state.reuse_window,
                name: format!("enroll-api-{}", uuid::Uuid::new_v4().simple()),
            }
            .run(rx.clone()),
        );
    }
    tasks.spawn(crate::sweep::run(
        state.store.clone(),
        state.clock.clone(),
        state.metrics.clone(),
        Duration::from_millis(cfg.rotation.sweep_interval_ms),
        rx.clone(),
    ));
    for a in https_addr.iter() {
        tracing::info!(addr = %a, "listening (HTTPS)");
    }
    for a in http_addr.iter() {
        tracing::info!(addr = %a, "listening (plain HTTP, loopback)");
    }
    Ok(Running {
        https_addr,
        http_addr,
        state,
        shutdown: tx,
        tasks,
    })
}

async fn serve_tls(
    listener: TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    app: Router,
    mut stop: watch::Receiver<bool>,
) {
    let mut conns = JoinSet::new();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        tokio::select! {
            _ = async { stop.wait_for(|s| *s).await.map(|_| ()) } => break,
            accepted = listener.accept() => {
                let (tcp, peer) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Without it, a response written after the TLS 1.3 session
                // tickets waits for their ACK, which the client delays by up
                // to 40 ms (Nagle × delayed ACK): every call took 40 ms more.
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let app = app.clone();
                conns.spawn(async move {
                    let _slot = slot;
                    let Ok(Ok(tls)) = tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await else {
                        return;
                    };
                    let svc = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
                        req.extensions_mut().insert(ConnectInfo(peer));
                        app.clone().oneshot(req)
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .timer(hyper_util::rt::TokioTimer::new())
                        .header_read_timeout(HEADER_READ_TIMEOUT)
                        .serve_connection(hyper_util::rt::TokioIo::new(tls), svc);
                    if let Err(e) = conn.await {
                        tracing::debug!(error = %e, "connection ended with an error");
                    }
                });
            }
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
}

/// The system clock, shared.
pub fn system_clock() -> SharedClock {
    Arc::new(SystemClock)
}

#[cfg(test)]
mod tests {
    use std::error::Error as _;

    use super::*;

    #[test]
    fn tls_file_errors_name_the_file_and_keep_their_cause() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        generate_dev_cert(dir.path(), &cert, &key).unwrap();
        let not_pem = dir.path().join("not.pem");
        std::fs::write(&not_pem, "no PEM here\n").unwrap();
        let with = |c: &Path, k: &Path| {
            let mut cfg = Config::default();
            cfg.tls.cert_path = Some(c.to_owned());
            cfg.tls.key_path = Some(k.to_owned());
            tls_material(&cfg)
        };
        with(&cert, &key).unwrap();

        let e = with(&not_pem, &key).unwrap_err();
        assert!(matches!(&e, StartError::NoCertificate { path } if *path == not_pem));
        assert!(e.to_string().contains("no certificate"), "{e}");

        let missing = dir.path().join("missing-key.pem");
        let e = with(&cert, &missing).unwrap_err();
        assert!(matches!(&e, StartError::TlsFile { path, .. } if *path == missing));
        assert!(e.to_string().contains("missing-key.pem"), "{e}");
        assert!(
            e.source()
                .is_some_and(|s| s.is::<rustls_pki_types::pem::Error>()),
            "{e:?}"
        );
    }
}
