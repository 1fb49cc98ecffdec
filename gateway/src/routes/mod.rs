//! Path-prefix routing to upstream pools, and each route's upstream TLS
//! material ([`upstream_tls`]).

use std::sync::Arc;
use std::time::Duration;

use pingora::lb::selection::RoundRobin;
use pingora::lb::LoadBalancer;

use crate::config::RouteConfig;

pub mod upstream_tls;

pub use upstream_tls::{load_upstream_tls, UpstreamTls};

/// A route's upstreams were refused by the pool (an address that does not
/// resolve).
#[derive(Debug, thiserror::Error)]
#[error("route {prefix:?}: upstreams: {source}")]
pub struct RouteError {
    /// The route's prefix.
    pub prefix: String,
    /// The cause.
    #[source]
    pub source: std::io::Error,
}

/// One configured route with its pool.
pub struct Route {
    /// The path prefix (also the metrics label).
    pub prefix: String,
    /// The route's position in the configuration (keys its assertions).
    pub index: u32,
    /// The `aud` of this route's identity assertions.
    pub audience: String,
    /// Whether a verified identity is required.
    pub require_identity: bool,
    /// Upstream TLS.
    pub tls: bool,
    /// Upstream SNI.
    pub sni: String,
    /// Upstream CA roots and client certificate.
    pub upstream_tls: UpstreamTls,
    /// Connect timeout.
    pub connect_timeout: Duration,
    /// Read/write timeout.
    pub timeout: Duration,
    /// Largest accepted request body (by Content-Length).
    pub max_body_bytes: u64,
    /// Protocols a client may `Upgrade` to, lower-case (empty: none).
    pub upgrade_protocols: Vec<String>,
    /// The round-robin pool (health-checked in the background).
    pub pool: Arc<LoadBalancer<RoundRobin>>,
}

impl std::fmt::Debug for Route {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Route")
            .field("prefix", &self.prefix)
            .field("require_identity", &self.require_identity)
            .finish_non_exhaustive()
    }
}

impl Route {
    /// The upstream peer for `backend` with this route's timeouts and TLS
    /// (CA roots, client certificate, pool group), for pingora's proxy and
    /// connector alike.
    pub fn peer(&self, backend: pingora::lb::Backend) -> pingora::upstreams::peer::HttpPeer {
        let mut peer =
            pingora::upstreams::peer::HttpPeer::new(backend.addr, self.tls, self.sni.clone());
        peer.options.connection_timeout = Some(self.connect_timeout);
        peer.options.read_timeout = Some(self.timeout);
        peer.options.write_timeout = Some(self.timeout);
        // Arc clones: the material was loaded and checked at start.
        peer.options.ca = self.upstream_tls.ca.clone();
        peer.client_cert_key = self.upstream_tls.client.clone();
        // Keeps connections verified against different CA sets apart in the
        // pool (pingora's pool key leaves the CA list out).
        peer.group_key = self.upstream_tls.pool_group;
        peer
    }

    /// Builds the route and its pool (not yet health-checked) over the
    /// route's loaded upstream TLS material.
    pub fn new(
        cfg: &RouteConfig,
        index: u32,
        upstream_tls: UpstreamTls,
    ) -> Result<Self, RouteError> {
        let mut pool =
            LoadBalancer::<RoundRobin>::try_from_iter(cfg.upstreams.iter().map(String::as_str))
                .map_err(|source| RouteError {
                    prefix: cfg.prefix.clone(),
                    source,
                })?;
        if cfg.health_check_secs > 0 {
            let mut hc = if cfg.tls {
                pingora::lb::health_check::TcpHealthCheck::new_tls(&cfg.sni)
            } else {
                pingora::lb::health_check::TcpHealthCheck::new()
            };
            hc.peer_template.options.connection_timeout =
                Some(Duration::from_millis(cfg.connect_timeout_ms));
            pool.set_health_check(hc);
            pool.health_check_frequency = Some(Duration::from_secs(cfg.health_check_secs));
        }
        Ok(Self {
            prefix: cfg.prefix.clone(),
            index,
            audience: cfg.audience().to_owned(),
            require_identity: cfg.require_identity,
            tls: cfg.tls,
            sni: cfg.sni.clone(),
            upstream_tls,
            connect_timeout: Duration::from_millis(cfg.connect_timeout_ms),
            timeout: Duration::from_millis(cfg.timeout_ms),
            max_body_bytes: cfg.max_body_bytes,
            upgrade_protocols: cfg
                .upgrade_protocols
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect(),
            pool: Arc::new(pool),
        })
    }
}

/// Whether `path` falls under `prefix` on a segment boundary (`/api` matches
/// `/api`, `/api/x`, not `/apix`).
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if !path.starts_with(prefix) {
        return false;
    }
    prefix.ends_with('/') || path.len() == prefix.len() || path.as_bytes()[prefix.len()] == b'/'
}

/// The routes, longest prefix first.
#[derive(Debug, Default)]
pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// A router over `routes`.
    pub fn new(mut routes: Vec<Arc<Route>>) -> Self {
        routes.sort_by_key(|r| std::cmp::Reverse(r.prefix.len()));
        Self { routes }
    }

    /// The route for `path`, if any.
    pub fn route(&self, path: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| prefix_matches(&r.prefix, path))
    }

    /// Every route.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(prefix: &str) -> Arc<Route> {
        Arc::new(
            Route::new(
                &RouteConfig {
                    prefix: prefix.into(),
                    name: None,
                    audience: None,
                    upstreams: vec!["127.0.0.1:1".into()],
                    require_identity: true,
                    tls: false,
                    sni: String::new(),
                    tls_ca_file: None,
                    tls_client_cert: None,
                    tls_client_key: None,
                    connect_timeout_ms: 100,
                    timeout_ms: 100,
                    max_body_bytes: 10,
                    health_check_secs: 0,
                    upgrade_protocols: Vec::new(),
                },
                0,
                UpstreamTls::default(),
            )
            .unwrap(),
        )
    }

    #[test]
    fn longest_prefix_on_segment_boundaries() {
        let r = Router::new(vec![
            route("/"),
            route("/api"),
            route("/api/v1/agent-enrollment/exchange"),
        ]);
        assert_eq!(
            r.route("/api/v1/agent-enrollment/exchange").unwrap().prefix,
            "/api/v1/agent-enrollment/exchange"
        );
        assert_eq!(r.route("/api/x").unwrap().prefix, "/api");
        assert_eq!(r.route("/api").unwrap().prefix, "/api");
        assert_eq!(r.route("/apix").unwrap().prefix, "/");
        let r = Router::new(vec![route("/api")]);
        assert!(r.route("/other").is_none());
        assert!(r.route("/apix").is_none());
    }
}
