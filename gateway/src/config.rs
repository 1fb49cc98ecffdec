//! The gateway configuration: a serde struct with safe defaults, loaded from
//! TOML, overridden from the environment, and always checked by
//! [`Config::validate`] (ranges and combinations, no files) before anything
//! is built. The files it names are read once by
//! [`crate::prepare::Prepared::load`].

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("config file {path} is invalid: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// An environment override does not parse.
    #[error("environment variable {var} is invalid: {source}")]
    Env {
        /// The variable.
        var: &'static str,
        /// The cause.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A number is outside its allowed range.
    #[error("{key} must be {allowed}")]
    OutOfRange {
        /// The key (or keys).
        key: &'static str,
        /// The allowed values.
        allowed: std::borrow::Cow<'static, str>,
    },
    /// A required text is empty.
    #[error("{keys} must not be empty")]
    Empty {
        /// The keys.
        keys: &'static str,
    },
    /// `revocation.redis_url` does not parse.
    #[error("revocation.redis_url {url}: {source}")]
    RedisUrl {
        /// The URL, password redacted.
        url: String,
        /// The cause.
        #[source]
        source: oneprotect_redis::UrlError,
    },
    /// `revocation.key_prefix` does not suit the Redis deployment.
    #[error("revocation.key_prefix: {0}")]
    KeyPrefix(#[source] oneprotect_redis::PrefixError),
    /// `revocation.shards` out of range or without a Cluster.
    #[error("revocation.shards: {0}")]
    Shards(#[source] oneprotect_redis::ShardsError),
    /// A route is refused.
    #[error("route {prefix:?}: {problem}")]
    Route {
        /// The route's prefix.
        prefix: String,
        /// Why.
        #[source]
        problem: RouteProblem,
    },
    /// `listener.require_client_cert` with a certificate-less route.
    #[error(
        "listener.require_client_cert = true refuses certificate-less clients at the \
         handshake, so routes with require_identity = false (the enrollment exchange) \
         would be unreachable: front them with a gateway that does not require one"
    )]
    UnreachableRoutes,
    /// The mTLS and admin listeners share an address.
    #[error("listener.listen and admin.listen must differ")]
    SameListenAddress,
    /// `assertion.audience`, which every route signed for, is set.
    #[error(
        "assertion.audience was removed: each route signs for its own audience (routes.audience, \
         default the route's name, itself defaulting to the prefix), so an assertion one upstream \
         saw cannot be replayed to another; move the value to the routes that need it"
    )]
    GlobalAudience,
}

/// Why a route was refused.
#[derive(Debug, thiserror::Error)]
pub enum RouteProblem {
    /// The prefix does not start with `/`.
    #[error("prefix must start with /")]
    RelativePrefix,
    /// Another route has the same prefix.
    #[error("prefix appears twice")]
    DuplicatePrefix,
    /// `upstreams` is empty.
    #[error("has no upstreams")]
    NoUpstreams,
    /// An upstream is not a resolvable `host:port`.
    #[error("upstream {upstream:?} is not host:port ({source})")]
    BadUpstream {
        /// The upstream as configured.
        upstream: String,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `upgrade_protocols` without `require_identity`.
    #[error(
        "upgrade_protocols needs require_identity = true (a tunnel is closed when its \
         certificate is revoked, so it needs one)"
    )]
    UpgradeWithoutIdentity,
    /// An upgrade protocol is not an HTTP token.
    #[error("upgrade protocol {0:?} is not an HTTP token")]
    UpgradeNotAToken(String),
    /// `h2c` among the upgrade protocols.
    #[error(
        "upgrade protocol h2c would carry HTTP/2 requests past the per-request revocation check"
    )]
    UpgradeH2c,
    /// A timeout is zero.
    #[error("timeouts must be positive")]
    ZeroTimeout,
    /// Another route has the same name.
    #[error("name {0:?} appears twice")]
    DuplicateName(String),
    /// `name` or `audience` is empty.
    #[error("name and audience must not be empty")]
    EmptyName,
    /// `tls` without `sni`.
    #[error("tls needs an sni (without one the upstream's certificate would not be verified)")]
    TlsWithoutSni,
    /// An upstream TLS file without `tls`.
    #[error("tls_ca_file, tls_client_cert and tls_client_key need tls = true")]
    TlsFilesWithoutTls,
    /// Only one of `tls_client_cert` and `tls_client_key`.
    #[error("tls_client_cert and tls_client_key go together")]
    HalfClientCert,
}

/// The whole gateway configuration. Every field has a default; see
/// `configs/gateway.full.toml` for each key with its default.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The mTLS listener.
    pub listener: ListenerConfig,
    /// The admin listener (metrics, health).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The signed identity assertion.
    #[serde(default)]
    pub assertion: AssertionConfig,
    /// Headers injected for upstreams.
    #[serde(default)]
    pub headers: HeadersConfig,
    /// The revocation check.
    #[serde(default)]
    pub revocation: RevocationConfig,
    /// Path-prefix routes to upstream pools, matched longest prefix first.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// pingora runtime tuning.
    #[serde(default)]
    pub runtime: RuntimeConfig,
}

/// The mTLS listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// Address of the mTLS listener. Defaults to `0.0.0.0:8443`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The gateway's server certificate chain (PEM, leaf first).
    pub cert: PathBuf,
    /// The gateway's server private key (PEM, PKCS#8, SEC1 or PKCS#1).
    pub key: PathBuf,
    /// The platform trust bundle: root certificates (PEM) that agent chains
    /// must lead to. Reloaded on SIGHUP and when the file changes.
    pub trust_bundle: PathBuf,
    /// The trust domain agent identities must belong to. When unset, any
    /// trust domain that chains to the bundle is accepted.
    #[serde(default)]
    pub trust_domain: Option<oneprotect_identity::TrustDomain>,
    /// Also allow TLS 1.2. Defaults to `false` (TLS 1.3 only).
    #[serde(default)]
    pub tls12: bool,
    /// Refuse the handshake when the client sends no certificate. Defaults to
    /// `false`: the gateway fronts the enrollment exchange, which new agents
    /// call without a certificate, so the check is made per route instead.
    /// Set it for gateways that front no certificate-less route.
    #[serde(default)]
    pub require_client_cert: bool,
    /// How often the trust bundle file is checked for changes, seconds
    /// (0 disables polling; SIGHUP still reloads). Defaults to 10.
    #[serde(default = "default_bundle_poll")]
    pub trust_bundle_poll_secs: u64,
    /// Read buffer between the socket and TLS, per connection, bytes.
    /// rustls keeps its own record buffer above it, so pingora's default of
    /// 65536 mostly cost memory on every idle connection. Defaults to 0 (no
    /// buffer): measured 52 KiB instead of 114 KiB per idle connection and
    /// 8 % more keep-alive requests per CPU-second (`bench/RESULTS.md`).
    #[serde(default = "default_read_buffer")]
    pub read_buffer_bytes: usize,
    /// Write buffer between TLS and the socket, per connection, bytes.
    /// Defaults to 1460 (pingora's default, one TCP segment).
    #[serde(default = "default_write_buffer")]
    pub write_buffer_bytes: usize,
    /// How long a TLS handshake (after the PROXY header of a trusted
    /// balancer, which counts too) may take from the TCP accept,
    /// milliseconds (1 to 60000). The socket is closed then and the failure
    /// counted as `timeout`. Defaults to 10000.
    #[serde(default = "default_handshake_timeout")]
    pub handshake_timeout_ms: u64,
    /// How long a connection may wait for its next request (and for its
    /// first one after the handshake), seconds: HTTP/1.1 and HTTP/2 (no
    /// stream open; a HEADERS frame not completed counts as idle). The
    /// connection is closed without an answer then. Defaults to 60.
    #[serde(default = "default_idle_timeout")]
    pub idle_timeout_secs: u64,
    /// How long an HTTP/1.1 request head (request line and headers) may take
    /// from its first byte to its end, milliseconds: a whole-head deadline,
    /// so a client trickling bytes cannot hold a connection (slowloris).
    /// Too slow: 408 `request_header_timeout`, connection closed. Defaults
    /// to 10000.
    #[serde(default = "default_header_timeout")]
    pub header_timeout_ms: u64,
    /// The largest HTTP/1.1 request head accepted, bytes (1024 to 1048575).
    /// Larger: 431 `request_header_too_large`, connection closed. Defaults
    /// to 32768.
    #[serde(default = "default_max_header")]
    pub max_header_bytes: usize,
    /// The TCP (L4) load balancers in front of the gateway that send a
    /// PROXY protocol v2 header, as networks (`10.0.0.0/8`, `2001:db8::/32`,
    /// or single addresses). A connection from one of them must start with
    /// that header and its source address becomes the client address the
    /// gateway forwards (`x-forwarded-for`, `x-real-ip`, `forwarded`);
    /// without a valid header the connection is closed (handshake failure
    /// `proxy_protocol`). Defaults to empty: the client address is the TCP
    /// peer, so a balancer in front must preserve source addresses (or be
    /// listed here with PROXY protocol v2 enabled). Client-sent forwarding
    /// headers are never trusted.
    #[serde(default)]
    pub trusted_proxies: Vec<crate::proxy_protocol::Cidr>,
    /// How long a connection without a verified client certificate may live
    /// in all, seconds (1 to 3600), whatever it does: such a connection can
    /// only reach the certificate-less routes (the enrollment exchange, one
    /// request). It is closed then. Defaults to 30.
    #[serde(default = "default_unauthenticated_timeout")]
    pub unauthenticated_timeout_secs: u64,
    /// How many connections without a verified client certificate one
    /// source address (the client address, see `trusted_proxies`) may hold
    /// at once (1 to 65535); more are closed right after the handshake.
    /// Defaults to 32.
    #[serde(default = "default_unauthenticated_per_source")]
    pub unauthenticated_max_per_source: u32,
    /// Serve the common HTTP/1.1 request — no body or a `Content-Length`
    /// body, on a route that requires identity, allowed by the revocation
    /// check — on the gateway's own fast path, which rewrites the request
    /// head as bytes in one pass, instead of pingora's per-request session
    /// (ADR-0023). Every other request, and every refusal, takes pingora's
    /// path either way; the headers an upstream receives are the same.
    /// Defaults to `true`; `false` sends everything through pingora.
    #[serde(default = "default_true")]
    pub http1_fast_path: bool,
    /// Serve HTTP/2 connections with a verified client certificate on the
    /// gateway's own HTTP/2 loop (ADR-0028): every stream, refusals
    /// included, is answered there, and requests go to the upstreams as
    /// HTTP/1.1 over the fast path's keep-alive pool. Connections without
    /// a certificate keep pingora's loop. Defaults to `true`; `false` sends
    /// every HTTP/2 connection through pingora.
    #[serde(default = "default_true")]
    pub http2_fast_path: bool,
}

/// The admin listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Address of the admin listener (plain HTTP: keep it on loopback or a
    /// management network). Defaults to `127.0.0.1:9090`.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
        }
    }
}

/// The signed identity assertion.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AssertionConfig {
    /// The Ed25519 signing key, PKCS#8 (DER or PEM). When unset, a fresh key
    /// is generated at start and its public key logged — fine for
    /// development, useless for upstreams that pin keys.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// The key id put in the JWT header. Defaults to the key's RFC 7638
    /// thumbprint, so that a new key always gets a new id and the key file
    /// can be replaced while the gateway runs (SIGHUP, or the
    /// `listener.trust_bundle_poll_secs` poll). With a pinned kid a changed
    /// key file is refused until restart.
    #[serde(default)]
    pub kid: Option<String>,
    /// The `iss` claim. Defaults to `oneprotect-gateway`.
    #[serde(default = "default_issuer")]
    pub issuer: String,
    /// Removed: every route signs for its own audience (`routes.audience`,
    /// default the route's name). Setting it is a configuration error that
    /// says so.
    #[serde(default)]
    pub audience: Option<String>,
    /// Lifetime of an assertion, seconds (1..=60). Defaults to 60.
    #[serde(default = "default_assertion_lifetime")]
    pub lifetime_secs: u64,
    /// Re-sign when fewer than this many seconds remain. Defaults to 20.
    #[serde(default = "default_assertion_refresh")]
    pub refresh_before_secs: u64,
}

impl Default for AssertionConfig {
    fn default() -> Self {
        Self {
            key_file: None,
            kid: None,
            issuer: default_issuer(),
            audience: None,
            lifetime_secs: default_assertion_lifetime(),
            refresh_before_secs: default_assertion_refresh(),
        }
    }
}

/// Headers injected for upstreams (beyond the always-injected identity set).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeadersConfig {
    /// Also inject an Envoy-compatible `x-forwarded-client-cert` element
    /// (`By`, `Hash`, `URI`). Defaults to `false`.
    #[serde(default)]
    pub xfcc: bool,
    /// The `By` value of the XFCC element (the gateway's own identity).
    /// Defaults to `spiffe://oneprotect.local/gateway`.
    #[serde(default)]
    pub xfcc_by: Option<String>,
    /// Keep client headers whose name contains `_`. Defaults to `false`:
    /// they are removed, as nginx does (`underscores_in_headers off`),
    /// because CGI, WSGI, PHP and Rack upstreams read `_` as `-`, so such a
    /// name can pose as a header the gateway vouches for. Identity and
    /// forwarding headers are removed in every spelling either way.
    #[serde(default)]
    pub allow_underscores: bool,
}

/// The per-request revocation check.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationConfig {
    /// The Redis holding the revocation projection. Defaults to
    /// `redis://127.0.0.1:6379`. One node (`redis://host:port[/db]`), a
    /// Sentinel-managed master
    /// (`redis+sentinel://host:port[,host:port…]/master[/db]`) or a Redis
    /// Cluster (`redis+cluster://host:port[,host:port…]`, which needs a hash
    /// tag in `key_prefix` unless `shards > 1`); see [`oneprotect_redis`].
    #[serde(default = "default_redis_url")]
    pub redis_url: String,
    /// The key prefix of the projection. Defaults to `oneprotect:`. With a
    /// Redis Cluster and `shards = 1` it must contain a hash tag, e.g.
    /// `{oneprotect}:`; with `shards > 1` it must not.
    #[serde(default = "default_prefix")]
    pub key_prefix: String,
    /// Shards of the projection (ADR-0024); must equal the enroll-api's
    /// `redis.shards`, which it records in `{prefix}projection:shards`
    /// (checked at every subscription and heartbeat) — a gateway configured
    /// otherwise does not confirm Redis, so fails closed, and logs why. 1 (the default): one channel (`SUBSCRIBE`). N > 1,
    /// only with `redis+cluster://`: `SSUBSCRIBE` to every shard's channel,
    /// a sequence and gap detection per shard. 1 ..= 1024.
    #[serde(default = "default_shards")]
    pub shards: u16,
    /// How long cached answers stay trusted after Redis was last confirmed
    /// (subscription alive and answering pings), milliseconds. After that
    /// the gateway fails closed: 503 `revocation_unavailable`. Defaults to
    /// 5000.
    #[serde(default = "default_max_staleness")]
    pub max_staleness_ms: u64,
    /// Heartbeat (PING on the subscription) interval, milliseconds. Must be
    /// well below `max_staleness_ms`. Defaults to 1000.
    #[serde(default = "default_heartbeat")]
    pub heartbeat_ms: u64,
    /// Timeout of one Redis lookup, milliseconds. Defaults to 250.
    #[serde(default = "default_redis_timeout")]
    pub redis_timeout_ms: u64,
    /// Cache capacity in entries (certificates and agents each). Defaults
    /// to 100000.
    #[serde(default = "default_cache_capacity")]
    pub cache_capacity: u64,
    /// Upper bound on how long one cached answer is kept even while the
    /// subscription is healthy, seconds. Defaults to 300.
    #[serde(default = "default_cache_ttl")]
    pub cache_ttl_secs: u64,
    /// The `Retry-After` of a 503 `revocation_unavailable`, seconds.
    /// Defaults to 1.
    #[serde(default = "default_retry_after")]
    pub retry_after_secs: u64,
    /// This gateway's name in the live set the enroll-api waits on before
    /// answering a revocation (ADR-0022). Defaults to the host name.
    #[serde(default)]
    pub gateway_name: Option<String>,
}

impl Default for RevocationConfig {
    fn default() -> Self {
        Self {
            redis_url: default_redis_url(),
            key_prefix: default_prefix(),
            shards: default_shards(),
            max_staleness_ms: default_max_staleness(),
            heartbeat_ms: default_heartbeat(),
            redis_timeout_ms: default_redis_timeout(),
            cache_capacity: default_cache_capacity(),
            cache_ttl_secs: default_cache_ttl(),
            retry_after_secs: default_retry_after(),
            gateway_name: None,
        }
    }
}

impl RevocationConfig {
    /// `max_staleness_ms` as a duration.
    pub fn max_staleness(&self) -> Duration {
        Duration::from_millis(self.max_staleness_ms)
    }
}

/// One route: a path prefix and the upstream pool it goes to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// The path prefix (starts with `/`). The longest matching prefix wins.
    pub prefix: String,
    /// The route's name, unique among the routes: in logs, metrics and the
    /// default `audience`. Defaults to the prefix.
    #[serde(default)]
    pub name: Option<String>,
    /// The `aud` claim of the identity assertions this route's upstreams
    /// get; each upstream checks it, so an assertion captured by one cannot
    /// be replayed to another. Defaults to the route's name.
    #[serde(default)]
    pub audience: Option<String>,
    /// Upstream addresses (`host:port`), round robin.
    pub upstreams: Vec<String>,
    /// Whether a verified agent identity is required. Defaults to `true`;
    /// set `false` only for the enrollment exchange, which new agents call
    /// without a certificate.
    #[serde(default = "default_true")]
    pub require_identity: bool,
    /// Connect to the upstreams over TLS. Defaults to `false`.
    #[serde(default)]
    pub tls: bool,
    /// SNI (and verified name) for upstream TLS. Defaults to empty; required
    /// with `tls` (pingora skips upstream certificate verification
    /// altogether when the SNI is empty, so the gateway refuses that).
    #[serde(default)]
    pub sni: String,
    /// PEM file of the CA certificates that verify the upstreams'
    /// certificates (with `tls`). Defaults to none: the platform's roots.
    #[serde(default)]
    pub tls_ca_file: Option<PathBuf>,
    /// PEM certificate chain (leaf first) the gateway presents to the
    /// upstreams (mutual TLS, with `tls` and `tls_client_key`). Defaults to
    /// none.
    #[serde(default)]
    pub tls_client_cert: Option<PathBuf>,
    /// PEM private key of `tls_client_cert`. Defaults to none.
    #[serde(default)]
    pub tls_client_key: Option<PathBuf>,
    /// Upstream connect timeout, milliseconds. Defaults to 2000.
    #[serde(default = "default_connect_timeout")]
    pub connect_timeout_ms: u64,
    /// Upstream read/write timeout, milliseconds. Defaults to 30000.
    #[serde(default = "default_io_timeout")]
    pub timeout_ms: u64,
    /// Largest request body accepted, bytes (413 beyond; checked on
    /// Content-Length). Defaults to 1048576.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: u64,
    /// Active TCP health check interval, seconds (0 disables). Defaults to 5.
    #[serde(default = "default_health_check")]
    pub health_check_secs: u64,
    /// Protocols an agent may switch this route's HTTP/1.1 connection to
    /// with `Upgrade` (e.g. `["websocket"]`; compared case-insensitively,
    /// one protocol per request). Defaults to none: every request for a
    /// tunnel gets 400 `upgrade_not_allowed`. Needs `require_identity`:
    /// after the upstream's 101 the gateway watches the connection's
    /// certificate and agent and closes the tunnel when either is revoked
    /// or superseded, or when their state cannot be confirmed for longer
    /// than `revocation.max_staleness_ms`. `h2c` is refused (its requests
    /// would pass the per-request check unseen); `CONNECT` never tunnels.
    #[serde(default)]
    pub upgrade_protocols: Vec<String>,
}

/// RFC 9110 §5.6.2 `tchar` (a protocol name in `Upgrade` is a token,
/// optionally `/version`).
fn is_token_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~/".contains(&b)
}

/// pingora runtime tuning.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Worker threads of the proxy service. Defaults to the number of CPUs
    /// available to the process (like nginx's `worker_processes auto`),
    /// at most 256.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// Seconds to wait for in-flight requests on graceful shutdown.
    /// Defaults to 10.
    #[serde(default = "default_grace")]
    pub graceful_shutdown_secs: u64,
    /// pingora's runtime flavour: `true` (default) one multi-threaded tokio
    /// runtime whose workers steal each other's tasks; `false` one
    /// single-threaded runtime per thread, each connection living on the
    /// thread that accepted it (bench/RESULTS.md compares them).
    #[serde(default = "default_work_stealing")]
    pub work_stealing: bool,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            threads: default_threads(),
            graceful_shutdown_secs: default_grace(),
            work_stealing: default_work_stealing(),
        }
    }
}

fn default_work_stealing() -> bool {
    true
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_read_buffer() -> usize {
    0
}
fn default_write_buffer() -> usize {
    1460
}
fn default_handshake_timeout() -> u64 {
    10_000
}
fn default_idle_timeout() -> u64 {
    60
}
fn default_header_timeout() -> u64 {
    10_000
}
fn default_max_header() -> usize {
    32 * 1024
}
fn default_unauthenticated_timeout() -> u64 {
    30
}
fn default_unauthenticated_per_source() -> u32 {
    32
}
fn default_bundle_poll() -> u64 {
    10
}
fn default_issuer() -> String {
    oneprotect_identity::assertion::DEFAULT_ISSUER.into()
}
fn default_assertion_lifetime() -> u64 {
    60
}
fn default_assertion_refresh() -> u64 {
    20
}
fn default_redis_url() -> String {
    "redis://127.0.0.1:6379".into()
}
fn default_prefix() -> String {
    oneprotect_identity::revocation::DEFAULT_PREFIX.into()
}
fn default_shards() -> u16 {
    1
}
fn default_max_staleness() -> u64 {
    5000
}
fn default_heartbeat() -> u64 {
    1000
}
fn default_redis_timeout() -> u64 {
    250
}
fn default_cache_capacity() -> u64 {
    100_000
}
fn default_cache_ttl() -> u64 {
    300
}
fn default_retry_after() -> u64 {
    1
}
fn default_true() -> bool {
    true
}
fn default_connect_timeout() -> u64 {
    2000
}
fn default_io_timeout() -> u64 {
    30_000
}
fn default_max_body() -> u64 {
    1 << 20
}
fn default_health_check() -> u64 {
    5
}
fn default_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(256))
}
fn default_grace() -> u64 {
    10
}

/// Environment variables that override the file (for containers).
pub const ENV_OVERRIDES: [&str; 5] = [
    "ONEPROTECT_GATEWAY_LISTEN",
    "ONEPROTECT_GATEWAY_ADMIN_LISTEN",
    "ONEPROTECT_GATEWAY_REDIS_URL",
    "ONEPROTECT_GATEWAY_KEY_PREFIX",
    "ONEPROTECT_GATEWAY_THREADS",
];

impl Config {
    /// Parses TOML text (no environment overrides, not validated).
    pub fn from_toml(text: &str, origin: &Path) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_path_buf(),
            source: Box::new(e),
        })
    }

    /// Reads `path` and applies the environment overrides (not validated:
    /// [`crate::prepare::Prepared::load`] validates, then loads the files).
    pub fn read(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut cfg = Self::from_toml(&text, path)?;
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    /// Reads `path`, applies the environment overrides and validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::read(path)?.validate()
    }

    /// Applies the [`ENV_OVERRIDES`] found by `get`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        fn parse<T: std::str::FromStr>(var: &'static str, v: &str) -> Result<T, ConfigError>
        where
            T::Err: std::error::Error + Send + Sync + 'static,
        {
            v.parse().map_err(|e: T::Err| ConfigError::Env {
                var,
                source: e.into(),
            })
        }
        if let Some(v) = get(ENV_OVERRIDES[0]) {
            self.listener.listen = parse(ENV_OVERRIDES[0], &v)?;
        }
        if let Some(v) = get(ENV_OVERRIDES[1]) {
            self.admin.listen = parse(ENV_OVERRIDES[1], &v)?;
        }
        if let Some(v) = get(ENV_OVERRIDES[2]) {
            self.revocation.redis_url = v;
        }
        if let Some(v) = get(ENV_OVERRIDES[3]) {
            self.revocation.key_prefix = v;
        }
        if let Some(v) = get(ENV_OVERRIDES[4]) {
            self.runtime.threads = parse(ENV_OVERRIDES[4], &v)?;
        }
        Ok(())
    }

    /// Checks ranges and combinations; returns the config unchanged when
    /// they are usable. Reads no file: [`crate::prepare::Prepared::load`]
    /// does, once. (Route upstreams are resolved, as the pools will.)
    pub fn validate(self) -> Result<Self, ConfigError> {
        fn range(key: &'static str, allowed: &'static str) -> Result<(), ConfigError> {
            Err(ConfigError::OutOfRange {
                key,
                allowed: allowed.into(),
            })
        }
        let r = &self.revocation;
        if r.max_staleness_ms == 0 || r.max_staleness_ms > 300_000 {
            range("revocation.max_staleness_ms", "1..=300000")?;
        }
        if r.heartbeat_ms == 0 || r.heartbeat_ms * 2 > r.max_staleness_ms {
            range(
                "revocation.heartbeat_ms",
                "at least 1 and at most half of max_staleness_ms",
            )?;
        }
        if r.redis_timeout_ms == 0 || r.redis_timeout_ms > 10_000 {
            range("revocation.redis_timeout_ms", "1..=10000")?;
        }
        if r.cache_capacity == 0 || r.cache_ttl_secs == 0 {
            range("revocation.cache_capacity and cache_ttl_secs", "positive")?;
        }
        let target = oneprotect_redis::RedisTarget::parse(&r.redis_url).map_err(|source| {
            ConfigError::RedisUrl {
                url: redact_url(&r.redis_url),
                source,
            }
        })?;
        target
            .check_shards(r.shards, oneprotect_identity::revocation::MAX_SHARDS)
            .map_err(ConfigError::Shards)?;
        target
            .check_layout(&r.key_prefix, r.shards)
            .map_err(ConfigError::KeyPrefix)?;
        let a = &self.assertion;
        let max = oneprotect_identity::assertion::MAX_LIFETIME_SECS as u64;
        if a.lifetime_secs == 0 || a.lifetime_secs > max {
            return Err(ConfigError::OutOfRange {
                key: "assertion.lifetime_secs",
                allowed: format!("1..={max}").into(),
            });
        }
        if a.refresh_before_secs >= a.lifetime_secs {
            range("assertion.refresh_before_secs", "below lifetime_secs")?;
        }
        if a.audience.is_some() {
            return Err(ConfigError::GlobalAudience);
        }
        if a.kid.as_deref().is_some_and(str::is_empty) || a.issuer.is_empty() {
            return Err(ConfigError::Empty {
                keys: "assertion.kid and issuer",
            });
        }
        let l = &self.listener;
        if l.handshake_timeout_ms == 0 || l.handshake_timeout_ms > 60_000 {
            range("listener.handshake_timeout_ms", "1..=60000")?;
        }
        if l.idle_timeout_secs == 0 || l.idle_timeout_secs > 3600 {
            range("listener.idle_timeout_secs", "1..=3600")?;
        }
        if l.header_timeout_ms == 0 || l.header_timeout_ms > 300_000 {
            range("listener.header_timeout_ms", "1..=300000")?;
        }
        if !(1024..=1_048_575).contains(&l.max_header_bytes) {
            range("listener.max_header_bytes", "1024..=1048575")?;
        }
        if l.unauthenticated_timeout_secs == 0 || l.unauthenticated_timeout_secs > 3600 {
            range("listener.unauthenticated_timeout_secs", "1..=3600")?;
        }
        if l.unauthenticated_max_per_source == 0 || l.unauthenticated_max_per_source > 65_535 {
            range("listener.unauthenticated_max_per_source", "1..=65535")?;
        }
        if l.trusted_proxies.len() > 1024 {
            range("listener.trusted_proxies", "at most 1024 networks")?;
        }
        if self.runtime.threads == 0 || self.runtime.threads > 256 {
            range("runtime.threads", "1..=256")?;
        }
        if self.routes.len() > 4096 {
            range("routes", "at most 4096 routes")?;
        }
        let mut prefixes = std::collections::HashSet::new();
        let mut names = std::collections::HashSet::new();
        for route in &self.routes {
            if !prefixes.insert(route.prefix.as_str()) {
                return Err(ConfigError::Route {
                    prefix: route.prefix.clone(),
                    problem: RouteProblem::DuplicatePrefix,
                });
            }
            if !names.insert(route.name()) {
                return Err(ConfigError::Route {
                    prefix: route.prefix.clone(),
                    problem: RouteProblem::DuplicateName(route.name().to_owned()),
                });
            }
            route.validate().map_err(|problem| ConfigError::Route {
                prefix: route.prefix.clone(),
                problem,
            })?;
        }
        if self.listener.require_client_cert && self.routes.iter().any(|r| !r.require_identity) {
            return Err(ConfigError::UnreachableRoutes);
        }
        if self.listener.listen == self.admin.listen {
            return Err(ConfigError::SameListenAddress);
        }
        Ok(self)
    }
}

impl RouteConfig {
    /// The checks of one route on its own.
    /// The route's name: `name`, or the prefix.
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or(&self.prefix)
    }

    /// The `aud` of this route's assertions: `audience`, or the name.
    pub fn audience(&self) -> &str {
        self.audience.as_deref().unwrap_or_else(|| self.name())
    }

    fn validate(&self) -> Result<(), RouteProblem> {
        if !self.prefix.starts_with('/') {
            return Err(RouteProblem::RelativePrefix);
        }
        if self.name.as_deref().is_some_and(str::is_empty)
            || self.audience.as_deref().is_some_and(str::is_empty)
        {
            return Err(RouteProblem::EmptyName);
        }
        if self.upstreams.is_empty() {
            return Err(RouteProblem::NoUpstreams);
        }
        for u in &self.upstreams {
            std::net::ToSocketAddrs::to_socket_addrs(u.as_str()).map_err(|source| {
                RouteProblem::BadUpstream {
                    upstream: u.clone(),
                    source,
                }
            })?;
        }
        if !self.upgrade_protocols.is_empty() && !self.require_identity {
            return Err(RouteProblem::UpgradeWithoutIdentity);
        }
        for p in &self.upgrade_protocols {
            if p.is_empty() || !p.bytes().all(is_token_byte) {
                return Err(RouteProblem::UpgradeNotAToken(p.clone()));
            }
            if p.eq_ignore_ascii_case("h2c") || p.to_ascii_lowercase().starts_with("h2c/") {
                return Err(RouteProblem::UpgradeH2c);
            }
        }
        if self.connect_timeout_ms == 0 || self.timeout_ms == 0 {
            return Err(RouteProblem::ZeroTimeout);
        }
        if self.tls && self.sni.is_empty() {
            return Err(RouteProblem::TlsWithoutSni);
        }
        let files = [
            &self.tls_ca_file,
            &self.tls_client_cert,
            &self.tls_client_key,
        ];
        if !self.tls && files.iter().any(|f| f.is_some()) {
            return Err(RouteProblem::TlsFilesWithoutTls);
        }
        if self.tls_client_cert.is_some() != self.tls_client_key.is_some() {
            return Err(RouteProblem::HalfClientCert);
        }
        Ok(())
    }

    /// The client certificate and key files, when both are set (after
    /// [`Config::validate`], which refuses one without the other).
    pub fn tls_client_files(&self) -> Option<(&Path, &Path)> {
        self.tls_client_cert
            .as_deref()
            .zip(self.tls_client_key.as_deref())
    }
}

/// A Redis URL with any password replaced, for messages and logs.
pub fn redact_url(url: &str) -> String {
    match url.split_once("://") {
        Some((scheme, rest)) => match rest.rsplit_once('@') {
            Some((_, host)) => format!("{scheme}://[redacted]@{host}"),
            None => url.to_owned(),
        },
        None => "[unparsable]".to_owned(),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The smallest valid configuration; its files do not exist.
    pub(crate) const MINIMAL: &str = r#"
        [listener]
        cert = "/nonexistent/cert.pem"
        key = "/nonexistent/key.pem"
        trust_bundle = "/nonexistent/bundle.pem"
    "#;

    #[test]
    fn minimal_config_gets_safe_defaults() {
        let c = Config::from_toml(MINIMAL, Path::new("t")).unwrap();
        assert!(!c.listener.tls12);
        assert!(!c.listener.require_client_cert);
        assert_eq!(c.revocation.max_staleness_ms, 5000);
        assert_eq!(c.assertion.lifetime_secs, 60);
        assert!(!c.headers.xfcc);
        assert!(!c.headers.allow_underscores);
        assert!(c.listener.trusted_proxies.is_empty());
    }

    #[test]
    fn trusted_proxies_parse_as_networks() {
        let text = format!(
            "{}\ntrusted_proxies = [\"10.0.0.0/8\", \"2001:db8::1\"]\n",
            MINIMAL.trim_end()
        );
        let c = Config::from_toml(&text, Path::new("t")).unwrap();
        assert_eq!(c.listener.trusted_proxies.len(), 2);
        assert!(c.listener.trusted_proxies[0].contains("10.9.8.7".parse().unwrap()));
        let bad = format!(
            "{}\ntrusted_proxies = [\"10.0.0.0/40\"]\n",
            MINIMAL.trim_end()
        );
        let e = Config::from_toml(&bad, Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("10.0.0.0/40"), "{e}");
    }

    #[test]
    fn threads_default_to_the_cpus_available() {
        let c = Config::from_toml(MINIMAL, Path::new("t")).unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get().min(256);
        assert_eq!(c.runtime.threads, cpus);
        let c = Config::from_toml(
            &format!("{MINIMAL}\n[runtime]\nthreads = 1\n"),
            Path::new("t"),
        )
        .unwrap();
        assert_eq!(c.runtime.threads, 1);
    }

    #[test]
    fn shipped_configs_parse_and_validate() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for f in ["gateway.toml", "gateway.full.toml"] {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            Config::from_toml(&text, Path::new(f))
                .and_then(Config::validate)
                .unwrap_or_else(|e| panic!("{f}: {e}"));
        }
        // The commented trust domain, as a domain type.
        let text = std::fs::read_to_string(root.join("gateway.full.toml"))
            .unwrap()
            .replace("# trust_domain = ", "trust_domain = ");
        let c = Config::from_toml(&text, Path::new("full")).unwrap();
        assert_eq!(
            c.listener.trust_domain.map(|t| t.to_string()).as_deref(),
            Some("oneprotect.local")
        );
    }

    #[test]
    fn validate_reads_no_file() {
        let c = Config::from_toml(MINIMAL, Path::new("t")).unwrap();
        c.validate().unwrap();
    }

    #[test]
    fn trust_domain_is_parsed_at_the_edge() {
        let text = format!(
            "{}\ntrust_domain = \"oneprotect.test\"\n",
            MINIMAL.trim_end()
        );
        let c = Config::from_toml(&text, Path::new("t")).unwrap();
        assert_eq!(c.listener.trust_domain.unwrap().as_str(), "oneprotect.test");
        let bad = format!("{}\ntrust_domain = \"Bad Domain\"\n", MINIMAL.trim_end());
        let e = Config::from_toml(&bad, Path::new("t"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("trust_domain") && e.contains("invalid trust domain"),
            "{e}"
        );
    }

    #[test]
    fn every_route_has_its_own_audience() {
        let routes = |extra: &str| {
            let text = format!(
                "{MINIMAL}\n[[routes]]\nprefix = \"/a\"\nupstreams = [\"127.0.0.1:1\"]\n\
                 [[routes]]\nname = \"workers\"\nprefix = \"/b\"\nupstreams = [\"127.0.0.1:1\"]\n{extra}\n"
            );
            Config::from_toml(&text, Path::new("t")).unwrap().validate()
        };
        let c = routes("").unwrap();
        assert_eq!(
            (c.routes[0].audience(), c.routes[1].audience()),
            ("/a", "workers")
        );
        let c = routes("audience = \"billing\"").unwrap();
        assert_eq!(
            (c.routes[1].name(), c.routes[1].audience()),
            ("workers", "billing")
        );
        let dup = format!(
            "{MINIMAL}\n[[routes]]\nname = \"x\"\nprefix = \"/a\"\nupstreams = [\"127.0.0.1:1\"]\n\
             [[routes]]\nname = \"x\"\nprefix = \"/b\"\nupstreams = [\"127.0.0.1:1\"]\n"
        );
        let e = Config::from_toml(&dup, Path::new("t"))
            .unwrap()
            .validate()
            .unwrap_err();
        assert!(e.to_string().contains("name \"x\" appears twice"), "{e}");
        let e = routes("audience = \"\"").unwrap_err().to_string();
        assert!(e.contains("must not be empty"), "{e}");
        // The one audience every route used to share is refused, saying why.
        let global = format!("{MINIMAL}\n[assertion]\naudience = \"x\"\n");
        let e = Config::from_toml(&global, Path::new("t"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("routes.audience"), "{e}");
    }

    #[test]
    fn upstream_tls_files_need_tls_and_each_other() {
        let route = |extra: &str| {
            let text = format!(
                "{MINIMAL}\n[[routes]]\nprefix = \"/x\"\nupstreams = [\"127.0.0.1:1\"]\n{extra}\n"
            );
            Config::from_toml(&text, Path::new("t")).unwrap().validate()
        };
        let tls = "tls = true\nsni = \"up.test\"\n";
        let e = route(&format!("{tls}tls_client_cert = \"/c.pem\"")).unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
        let e = route(&format!("{tls}tls_client_key = \"/k.pem\"")).unwrap_err();
        assert!(e.to_string().contains("go together"), "{e}");
        let e = route("tls_ca_file = \"/ca.pem\"").unwrap_err().to_string();
        assert!(
            e.contains("route \"/x\"") && e.contains("need tls = true"),
            "{e}"
        );
        let e = route("tls = true").unwrap_err().to_string();
        assert!(e.contains("needs an sni"), "{e}");
        let c = route(&format!(
            "{tls}tls_client_cert = \"/c.pem\"\ntls_client_key = \"/k.pem\""
        ))
        .unwrap();
        let (cert, key) = c.routes[0].tls_client_files().unwrap();
        assert_eq!((cert, key), (Path::new("/c.pem"), Path::new("/k.pem")));
    }

    #[test]
    fn upgrade_protocols_need_identity_and_exclude_h2c() {
        let valid = |extra: &str| {
            let text = format!(
                "{MINIMAL}\n[[routes]]\nprefix = \"/ws\"\nupstreams = [\"127.0.0.1:1\"]\n{extra}\n"
            );
            Config::from_toml(&text, Path::new("t"))
                .unwrap()
                .validate()
                .map_err(|e| e.to_string())
        };
        let route = |extra: &str| valid(extra).unwrap_err();
        // Valid upgrade settings pass (the files are checked later).
        assert!(valid("upgrade_protocols = [\"websocket\"]").is_ok());
        assert!(valid("upgrade_protocols = [\"WebSocket/13\"]").is_ok());
        let e = route("upgrade_protocols = [\"websocket\"]\nrequire_identity = false");
        assert!(e.contains("require_identity"), "{e}");
        let e = route("upgrade_protocols = [\"H2C\"]");
        assert!(e.contains("h2c"), "{e}");
        let e = route("upgrade_protocols = [\"web socket\"]");
        assert!(e.contains("not an HTTP token"), "{e}");
        assert!(Config::from_toml(MINIMAL, Path::new("t"))
            .unwrap()
            .routes
            .iter()
            .all(|r| r.upgrade_protocols.is_empty()));
    }

    #[test]
    fn unknown_keys_are_refused() {
        let text = format!("{MINIMAL}\n[revocation]\nmax_stale = 3\n");
        assert!(Config::from_toml(&text, Path::new("t")).is_err());
    }

    #[test]
    fn env_overrides_apply() {
        let mut c = Config::from_toml(MINIMAL, Path::new("t")).unwrap();
        c.apply_env(|k| match k {
            "ONEPROTECT_GATEWAY_REDIS_URL" => Some("redis://10.0.0.1:6380".into()),
            "ONEPROTECT_GATEWAY_LISTEN" => Some("127.0.0.1:1234".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.revocation.redis_url, "redis://10.0.0.1:6380");
        assert_eq!(c.listener.listen.port(), 1234);
        assert!(c
            .apply_env(|k| (k == "ONEPROTECT_GATEWAY_THREADS").then(|| "x".into()))
            .is_err());
    }

    #[test]
    fn mandatory_client_cert_and_certificate_less_routes_conflict() {
        let text = format!(
            "{}\nrequire_client_cert = true\n[[routes]]\nprefix = \"/x\"\nupstreams = [\"127.0.0.1:1\"]\nrequire_identity = false\n",
            MINIMAL.trim_end()
        );
        let e = Config::from_toml(&text, Path::new("t"))
            .unwrap()
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains("require_client_cert"), "{e}");
    }

    #[test]
    fn shards_are_validated_with_the_topology_and_prefix() {
        let check = |url: &str, prefix: &str, shards: u16| {
            let text = format!(
                "{MINIMAL}\n[revocation]\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\nshards = {shards}\n"
            );
            Config::from_toml(&text, Path::new("t"))
                .unwrap()
                .validate()
                .map(|c| c.revocation.shards)
                .map_err(|e| e.to_string())
        };
        assert_eq!(check("redis+cluster://10.0.0.1:7000", "op:", 12), Ok(12));
        let e = check("redis+cluster://10.0.0.1:7000", "{op}:", 12).unwrap_err();
        assert!(
            e.contains("revocation.key_prefix") && e.contains("must not"),
            "{e}"
        );
        let e = check("redis://127.0.0.1:6379", "op:", 2).unwrap_err();
        assert!(
            e.contains("revocation.shards") && e.contains("Cluster"),
            "{e}"
        );
        let e = check("redis+cluster://10.0.0.1:7000", "op:", 0).unwrap_err();
        assert!(e.contains("revocation.shards: must be 1..=1024"), "{e}");
    }

    #[test]
    fn sentinel_and_cluster_urls_are_validated_at_startup() {
        let check = |url: &str, prefix: &str| {
            let text = format!(
                "{MINIMAL}\n[revocation]\nredis_url = \"{url}\"\nkey_prefix = \"{prefix}\"\n"
            );
            Config::from_toml(&text, Path::new("t"))
                .unwrap()
                .validate()
                .map_err(|e| e.to_string())
        };
        // Valid Redis settings pass.
        check(
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster",
            "op:",
        )
        .unwrap();
        check("redis+cluster://10.0.0.1:7000,10.0.0.2:7000", "{op}:").unwrap();
        let check = |url: &str, prefix: &str| check(url, prefix).unwrap_err();
        // A Cluster without a hash tag in the prefix.
        let e = check("redis+cluster://10.0.0.1:7000", "op:");
        assert!(
            e.contains("revocation.key_prefix") && e.contains("hash tag"),
            "{e}"
        );
        // Malformed: the message names the problem, never the password.
        let e = check("redis+sentinel://:s3cret@10.0.0.1:26379", "op:");
        assert!(e.contains("master name") && !e.contains("s3cret"), "{e}");
        let e = check("redis+cluster://10.0.0.1", "{op}:");
        assert!(e.contains("no port"), "{e}");
        let e = check("http://10.0.0.1", "op:");
        assert!(e.contains("not a Redis URL"), "{e}");
    }

    #[test]
    fn redacts_passwords() {
        assert_eq!(
            redact_url("redis://:secret@host:6379/0"),
            "redis://[redacted]@host:6379/0"
        );
        assert_eq!(redact_url("redis://host"), "redis://host");
    }
}
