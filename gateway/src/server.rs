//! Assembles the pingora server: the mTLS proxy service, the admin service,
//! upstream health checks, the revocation subscriber and the trust bundle
//! reloader.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::connectors::{ConnectorOptions, TransportConnector};
use pingora::listeners::tls::TlsSettings;
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;
use pingora::services::{ServiceReadyNotifier, ServiceWithDependents};

use crate::admin::AdminApp;
use crate::assertion::AssertionService;
use crate::conn::IdentityContext;
use crate::fast::FastPath;
use crate::files::FileError;
use crate::handshake::Handshaker;
use crate::headers::StripPolicy;
use crate::metrics::Metrics;
use crate::prepare::Prepared;
use crate::proxy::Gateway;
use crate::revocation::Revocation;
use crate::routes::{Route, RouteError, Router};
use crate::serve::{ConnLimits, GatewayApp};
use crate::tls::{AgentCertVerifier, ChainValidator, IdentityCallback, TrustStore};

/// Why the gateway could not be built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A route's upstreams were refused.
    #[error(transparent)]
    Route(#[from] RouteError),
    /// No ephemeral assertion signing key could be generated.
    #[error("cannot generate an ephemeral assertion signing key: {0}")]
    EphemeralKey(#[source] oneprotect_identity::assertion::KeyError),
    /// The Redis URL was refused by the client.
    #[error("redis client: {0}")]
    Redis(#[from] oneprotect_redis::OpenError),
    /// pingora refused a setting.
    #[error("pingora: {0}")]
    Pingora(#[from] Box<pingora::Error>),
}

/// A built gateway, ready to run.
pub struct App {
    server: Server,
    /// The trust store (reload it to swap the bundle).
    pub trust: Arc<TrustStore>,
    /// The revocation checker.
    pub revocation: Arc<Revocation>,
    /// The assertion signer (its public key verifies injected assertions).
    pub assertions: Arc<AssertionService>,
    /// The metrics.
    pub metrics: Metrics,
}

/// The mTLS listening service, reporting when its socket is bound.
///
/// pingora binds a service's listeners inside `start_service`, on that
/// service's own runtime, and tells nobody when it has; the admin service
/// may already answer by then. A `/readyz` that said "ready" in that window
/// sent a balancer (or a test) to a port that refused the connection. The
/// bound socket appears in pingora's listening-descriptor table (the one
/// handed to the next process on a zero-downtime upgrade), so this wrapper
/// watches that table for its address, then sets `bound` and tells
/// pingora the service is ready.
struct ReportsBound<A: pingora::apps::ServerApp + Send + Sync + 'static> {
    inner: Service<A>,
    addr: String,
    bound: Arc<AtomicBool>,
}

#[async_trait]
impl<A: pingora::apps::ServerApp + Send + Sync + 'static> ServiceWithDependents
    for ReportsBound<A>
{
    async fn start_service(
        &mut self,
        #[cfg(unix)] fds: Option<pingora::server::ListenFds>,
        shutdown: ShutdownWatch,
        listeners_per_fd: usize,
        ready: ServiceReadyNotifier,
    ) {
        let bound = self.bound.clone();
        match fds.clone() {
            Some(table) => {
                let addr = self.addr.clone();
                let mut stop = shutdown.clone();
                tokio::spawn(async move {
                    // Startup only: the bind follows within milliseconds,
                    // or start_service panics ("Failed to build listeners").
                    while table.lock().get(&addr).is_none() {
                        tokio::select! {
                            _ = tokio::time::sleep(Duration::from_millis(5)) => {}
                            _ = stop.changed() => return,
                        }
                    }
                    bound.store(true, Ordering::Release);
                    ready.notify_ready();
                });
            }
            // Without a descriptor table there is nothing to watch: the
            // bind is at most a poll away (previous behaviour).
            None => {
                bound.store(true, Ordering::Release);
                ready.notify_ready();
            }
        }
        pingora::services::Service::start_service(
            &mut self.inner,
            #[cfg(unix)]
            fds,
            shutdown,
            listeners_per_fd,
        )
        .await
    }

    fn name(&self) -> &str {
        pingora::services::Service::name(&self.inner)
    }

    fn threads(&self) -> Option<usize> {
        pingora::services::Service::threads(&self.inner)
    }

    fn listen_addresses(&self) -> Option<Vec<String>> {
        pingora::services::Service::listen_addresses(&self.inner)
    }
}

/// Installs the process-wide rustls crypto provider (ring). Without TLS 1.2
/// only the TLS 1.3 suites are installed, which is how TLS 1.2 is turned
/// off: pingora's rustls `TlsSettings` always offers both versions. The
/// provider is per process: the first gateway built decides.
pub fn install_crypto_provider(tls12: bool) {
    let mut provider = rustls::crypto::ring::default_provider();
    if !tls12 {
        provider
            .cipher_suites
            .retain(|s| matches!(s, rustls::SupportedCipherSuite::Tls13(_)));
    }
    if provider.install_default().is_err() {
        let has12 = rustls::crypto::CryptoProvider::get_default().is_some_and(|p| {
            p.cipher_suites
                .iter()
                .any(|s| matches!(s, rustls::SupportedCipherSuite::Tls12(_)))
        });
        if has12 != tls12 {
            tracing::warn!(
                tls12,
                "a crypto provider was already installed; listener.tls12 not applied"
            );
        }
    }
}

struct Subscriber(Arc<Revocation>);

#[async_trait]
impl BackgroundService for Subscriber {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.run_subscriber(shutdown).await;
    }
}

/// Reloads the files that may change while the gateway runs: the trust
/// bundle and the assertion signing key. On SIGHUP, and every `poll` when
/// set (the trust bundle when its file changed; the key file is small and
/// is compared by its public key).
struct FileReloader {
    trust: Arc<TrustStore>,
    assertions: Arc<AssertionService>,
    poll: Option<Duration>,
    metrics: Metrics,
}

impl FileReloader {
    fn record_trust(&self, res: Result<usize, FileError>) {
        match res {
            Ok(n) => {
                self.metrics
                    .trust_bundle_reloads
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!(anchors = n, "trust bundle reloaded");
            }
            Err(e) => {
                self.metrics
                    .trust_bundle_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(error = %e, "trust bundle reload failed; keeping the old bundle");
            }
        }
    }

    fn reload_key(&self) {
        match self.assertions.reload() {
            Ok(None) => {}
            Ok(Some(kid)) => {
                self.metrics
                    .assertion_key_reloads
                    .with_label_values(&["ok"])
                    .inc();
                tracing::info!(%kid, "assertion signing key replaced: new assertions use it");
            }
            Err(e) => {
                self.metrics
                    .assertion_key_reloads
                    .with_label_values(&["error"])
                    .inc();
                tracing::error!(error = %e, "assertion key reload refused; signing with the old key");
            }
        }
    }
}

#[async_trait]
impl BackgroundService for FileReloader {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let poll = self.poll.unwrap_or(Duration::from_secs(3600));
        let mut tick = tokio::time::interval(poll);
        tick.tick().await;
        loop {
            tokio::select! {
                _ = async { match hup.as_mut() { Some(h) => { h.recv().await; } None => std::future::pending().await } } => {
                    self.record_trust(self.trust.reload());
                    self.reload_key();
                }
                _ = tick.tick(), if self.poll.is_some() => {
                    if let Some(res) = self.trust.reload_if_changed() {
                        self.record_trust(res);
                    }
                    self.reload_key();
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Builds the gateway from prepared material ([`Prepared::load`]).
pub fn build(prepared: Prepared) -> Result<App, BuildError> {
    build_inner(prepared, None)
}

/// Builds the gateway reading revocation state from an in-process bus
/// instead of Redis (`revocation.redis_url` is not used). For the
/// one-process dev stack, where the enroll-api writes the same bus.
pub fn build_with_memory_bus(
    prepared: Prepared,
    bus: oneprotect_revocation_bus::MemoryBus,
) -> Result<App, BuildError> {
    build_inner(prepared, Some(bus))
}

fn build_inner(
    prepared: Prepared,
    bus: Option<oneprotect_revocation_bus::MemoryBus>,
) -> Result<App, BuildError> {
    let Prepared {
        config: cfg,
        server_key,
        trust,
        signer,
        upstream_tls,
    } = prepared;
    install_crypto_provider(cfg.listener.tls12);
    let metrics = Metrics::new();

    let conf = ServerConf {
        threads: cfg.runtime.threads,
        work_stealing: cfg.runtime.work_stealing,
        grace_period_seconds: Some(cfg.runtime.graceful_shutdown_secs),
        graceful_shutdown_timeout_seconds: Some(cfg.runtime.graceful_shutdown_secs),
        ..ServerConf::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();

    let signer = match signer {
        Some(signer) => signer,
        None => {
            let (_, pkcs8) = oneprotect_identity::AssertionSigner::generate("ephemeral")
                .map_err(BuildError::EphemeralKey)?;
            let signer = match &cfg.assertion.kid {
                Some(kid) => oneprotect_identity::AssertionSigner::from_pkcs8(kid.clone(), &pkcs8),
                None => oneprotect_identity::AssertionSigner::from_pkcs8_thumbprint_kid(&pkcs8),
            }
            .map_err(BuildError::EphemeralKey)?;
            tracing::warn!(
                kid = %signer.kid(),
                "no assertion.key_file: generated an ephemeral signing key (development only)"
            );
            signer
        }
    };
    let assertions = Arc::new(AssertionService::new(signer, &cfg.assertion));
    let revocation = Arc::new(match &bus {
        Some(bus) => Revocation::with_memory_bus(&cfg.revocation, bus.clone(), metrics.clone()),
        None => Revocation::new(&cfg.revocation, metrics.clone())?,
    });
    // The reports go under the revocation state's key schema.
    let report_keys = revocation.keys().clone();
    let (reporter, report_sender) = match bus {
        Some(bus) => crate::reports::on_memory_bus(bus, report_keys, metrics.clone()),
        None => crate::reports::on_redis(&cfg.revocation.redis_url, report_keys, metrics.clone())?,
    };
    server.add_service(background_service(
        "superseded-certificate reports",
        report_sender,
    ));
    let trust = Arc::new(trust);
    let validator = Arc::new(ChainValidator::new(
        trust.clone(),
        cfg.listener.trust_domain.clone(),
    ));
    let verifier = Arc::new(AgentCertVerifier::new(
        validator,
        cfg.listener.require_client_cert,
        metrics.clone(),
    ));
    let id_ctx = Arc::new(IdentityContext {
        keys: revocation.keys().clone(),
        assertions: assertions.clone(),
        xfcc_by: cfg.headers.xfcc.then(|| {
            cfg.headers
                .xfcc_by
                .clone()
                .unwrap_or_else(|| "spiffe://oneprotect.local/gateway".into())
        }),
    });

    let mut routes = Vec::new();
    for (index, (rc, upstream_tls)) in cfg.routes.iter().zip(upstream_tls).enumerate() {
        // validate() allows at most 4096 routes.
        let route = Route::new(rc, index as u32, upstream_tls)?;
        if rc.health_check_secs > 0 {
            let pool = route.pool.clone();
            server.add_service(background_service(
                &format!("health check {}", rc.prefix),
                ArcTask(pool),
            ));
        }
        routes.push(Arc::new(route));
    }
    let router = Arc::new(Router::new(routes));

    let strip = StripPolicy {
        drop_underscored: !cfg.headers.allow_underscores,
    };
    let (http1, http2) = (cfg.listener.http1_fast_path, cfg.listener.http2_fast_path);
    let fast = (http1 || http2).then(|| {
        FastPath::new(
            router.clone(),
            revocation.clone(),
            assertions.clone(),
            metrics.clone(),
            reporter.clone(),
            strip,
            TransportConnector::new(Some(ConnectorOptions::from_server_conf(
                &server.configuration,
            ))),
        )
        .protocols(http1, http2)
    });
    let gateway = Gateway::new(
        router,
        revocation.clone(),
        reporter,
        assertions.clone(),
        metrics.clone(),
        strip,
    );
    let limits = ConnLimits {
        idle: Duration::from_secs(cfg.listener.idle_timeout_secs),
        header: Duration::from_millis(cfg.listener.header_timeout_ms),
        max_header_bytes: cfg.listener.max_header_bytes,
        unauthenticated_life: Duration::from_secs(cfg.listener.unauthenticated_timeout_secs),
        unauthenticated_per_source: cfg.listener.unauthenticated_max_per_source,
    };
    let mut tls =
        TlsSettings::with_callbacks(Box::new(IdentityCallback::new(verifier.clone(), id_ctx)))?;
    // The chain and key loaded by Prepared::load: pingora's own file loading
    // would read them again, and panic on a bad file.
    tls.set_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(server_key)));
    tls.enable_h2();
    tls.set_client_cert_verifier(verifier);
    // The listener itself is plain TCP: the gateway runs the handshake
    // (crate::handshake) so it can bound, count and rate-limit-log every
    // failure, and read a PROXY header from trusted balancers first.
    let handshaker = Arc::new(Handshaker::new(
        tls.build(),
        Duration::from_millis(cfg.listener.handshake_timeout_ms),
        cfg.listener.trusted_proxies.clone(),
        metrics.clone(),
    ));
    let mut http = pingora::proxy::http_proxy(&server.configuration, gateway);
    // HTTP/2 connections (pingora's loop) close after the same idle time as
    // HTTP/1.1 ones, counted from the handshake too: a connection that never
    // completes a HEADERS frame is idle.
    let mut options = pingora::apps::HttpServerOptions::default();
    options.h2_idle_timeout = Some(limits.idle);
    http.server_options = Some(options);
    let mut proxy = Service::new(
        "oneprotect-gateway".to_string(),
        GatewayApp::new(
            http,
            limits,
            handshaker,
            metrics.clone(),
            cfg.routes
                .iter()
                .any(|r| !r.upgrade_protocols.is_empty())
                .then(|| revocation.clone()),
            fast,
        ),
    );
    proxy.add_listener(
        pingora::listeners::ListenerConfig::tcp(cfg.listener.listen.to_string()).l4_buffer(
            pingora::protocols::l4::stream::L4BufferSettings::new(
                cfg.listener.read_buffer_bytes,
                cfg.listener.write_buffer_bytes,
            ),
        ),
    );
    let listening = Arc::new(AtomicBool::new(false));
    server.add_service(ReportsBound {
        inner: proxy,
        addr: cfg.listener.listen.to_string(),
        bound: listening.clone(),
    });

    revocation.set_gateway_addr(cfg.listener.listen.to_string());
    server.add_service(background_service(
        "revocation subscriber",
        Subscriber(revocation.clone()),
    ));
    server.add_service(background_service(
        "trust bundle and assertion key reloader",
        FileReloader {
            trust: trust.clone(),
            assertions: assertions.clone(),
            poll: (cfg.listener.trust_bundle_poll_secs > 0)
                .then(|| Duration::from_secs(cfg.listener.trust_bundle_poll_secs)),
            metrics: metrics.clone(),
        },
    ));

    let mut admin = Service::new(
        "oneprotect-gateway admin".to_string(),
        AdminApp::new(
            metrics.clone(),
            revocation.clone(),
            trust.clone(),
            listening,
        ),
    );
    admin.add_tcp(&cfg.admin.listen.to_string());
    server.add_service(admin);

    Ok(App {
        server,
        trust,
        revocation,
        assertions,
        metrics,
    })
}

/// Runs a shared load balancer's background work (health checks).
struct ArcTask<T>(Arc<T>);

#[async_trait]
impl<T: BackgroundService + Send + Sync> BackgroundService for ArcTask<T> {
    async fn start(&self, shutdown: ShutdownWatch) {
        self.0.start(shutdown).await;
    }
}

struct ChannelSignal(tokio::sync::Mutex<Option<tokio::sync::oneshot::Receiver<()>>>);

#[async_trait]
impl ShutdownSignalWatch for ChannelSignal {
    async fn recv(&self) -> ShutdownSignal {
        if let Some(rx) = self.0.lock().await.take() {
            let _ = rx.await;
        }
        ShutdownSignal::FastShutdown
    }
}

/// A gateway running on its own thread (for tests and embedding).
pub struct RunningGateway {
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl RunningGateway {
    /// Stops the gateway and waits for its thread.
    pub fn stop(mut self) {
        self.stop_inner();
    }

    fn stop_inner(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for RunningGateway {
    fn drop(&mut self) {
        self.stop_inner();
    }
}

impl App {
    /// Runs until SIGTERM (graceful) / SIGINT (fast) and exits the process.
    pub fn run_forever(self) -> ! {
        self.server.run_forever()
    }

    /// Runs on a new thread until [`RunningGateway::stop`] (or drop).
    pub fn spawn(self) -> RunningGateway {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let server = self.server;
        let thread = std::thread::Builder::new()
            .name("oneprotect-gateway".into())
            .spawn(move || {
                server.run(RunArgs {
                    shutdown_signal: Box::new(ChannelSignal(tokio::sync::Mutex::new(Some(rx)))),
                });
            })
            .expect("spawn the gateway thread");
        RunningGateway {
            stop: Some(tx),
            thread: Some(thread),
        }
    }
}
