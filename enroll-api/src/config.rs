//! Configuration: a TOML file, then environment overrides, then
//! [`Config::validate`], which checks everything up front.
//!
//! See `configs/enroll-api.toml` (minimal) and `configs/enroll-api.full.toml`
//! (every key with its default).

use std::borrow::Cow;
use std::net::SocketAddr;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use oneprotect_identity::profile::{DEFAULT_LEAF_LIFETIME, MAX_LEAF_LIFETIME, MIN_LEAF_LIFETIME};
use oneprotect_identity::TrustDomain;

/// Why the configuration is not usable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("parsing {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: Box<toml::de::Error>,
    },
    /// An environment override does not parse.
    #[error("environment variable {0} has an invalid value")]
    Env(&'static str),
    /// A number is outside its allowed range.
    #[error("{key} must be {allowed}")]
    OutOfRange {
        /// The key.
        key: &'static str,
        /// The allowed values, e.g. `10..=604800`.
        allowed: Cow<'static, str>,
    },
    /// A listen address is not `ip:port`.
    #[error("{key}: {value:?} is not an ip:port address")]
    Address {
        /// The key.
        key: &'static str,
        /// The value as configured.
        value: String,
        /// The cause.
        #[source]
        source: std::net::AddrParseError,
    },
    /// Neither `listen.https` nor `listen.http` is set.
    #[error("no listener: set listen.https and/or listen.http")]
    NoListener,
    /// `listen.http` is not a loopback address.
    #[error(
        "listen.http must be a loopback address (plain HTTP is only for a co-located gateway)"
    )]
    PlainHttpOffLoopback,
    /// Only one of `tls.cert_path` and `tls.key_path` is set.
    #[error("tls.cert_path and tls.key_path go together")]
    TlsPathsApart,
    /// A configured TLS file does not exist.
    #[error("TLS file {} does not exist", path.display())]
    MissingFile {
        /// The file.
        path: PathBuf,
    },
    /// `listen.https` with no certificate and no dev certificate allowed.
    #[error(
        "listen.https is set but there is no tls.cert_path/key_path and dev_self_signed is false"
    )]
    NoTlsCertificate,
    /// An entry of `forwarded.trusted_proxies` is not an address or network.
    #[error("forwarded.trusted_proxies: {0}")]
    TrustedProxy(#[source] oneprotect_identity::net::CidrError),
    /// `database.url` names a database this service does not speak. The
    /// message never repeats the URL (it may carry a password).
    #[error("database.url must start with sqlite: or postgres://")]
    DatabaseScheme,
    /// `redis.url` does not parse. The message never repeats the URL (it
    /// may carry a password).
    #[error("redis.url: {0}")]
    RedisUrl(#[source] oneprotect_redis::UrlError),
    /// `redis.key_prefix` does not suit the Redis deployment.
    #[error("redis.key_prefix: {0}")]
    RedisPrefix(#[source] oneprotect_redis::PrefixError),
    /// `redis.shards` out of range or without a Cluster.
    #[error("redis.shards: {0}")]
    RedisShards(#[source] oneprotect_redis::ShardsError),
    /// A required text is empty.
    #[error("{keys} must not be empty")]
    Empty {
        /// The keys.
        keys: &'static str,
    },
    /// A `rotation.assertion.keys` entry is unusable.
    #[error("rotation.assertion.keys: key {kid:?} needs a kid and a 32-byte base64url public_key")]
    AssertionKey {
        /// The entry's `kid` as configured.
        kid: String,
    },
}

/// `Ok` when `value` is within `allowed`, else [`ConfigError::OutOfRange`]
/// naming `key` and the range.
fn check_range(
    key: &'static str,
    value: u64,
    allowed: RangeInclusive<u64>,
) -> Result<(), ConfigError> {
    if allowed.contains(&value) {
        Ok(())
    } else {
        Err(ConfigError::OutOfRange {
            key,
            allowed: format!("{}..={}", allowed.start(), allowed.end()).into(),
        })
    }
}

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// SPIFFE trust domain of every issued identity. Defaults to
    /// `oneprotect.local`.
    pub trust_domain: TrustDomain,
    /// Directory for generated state (dev CA, pepper, SQLite file, dev TLS
    /// certificate). Defaults to `./data/enroll-api`.
    pub data_dir: PathBuf,
    /// Listeners.
    pub listen: ListenConfig,
    /// The HTTPS listener's certificate.
    pub tls: TlsConfig,
    /// The CA.
    pub ca: CaConfig,
    /// Storage.
    pub database: DatabaseConfig,
    /// Secret hashing.
    pub secrets: SecretsConfig,
    /// Request limits.
    pub limits: LimitsConfig,
    /// The Redis revocation projection and event stream. Optional: without
    /// `redis.url` the service runs with no projection (gateways then fail
    /// closed for every agent) and says so at startup.
    pub redis: RedisConfig,
    /// Certificate rotation through the gateway.
    pub rotation: RotationConfig,
    /// Which peers may name the client's address (`X-Forwarded-For`).
    pub forwarded: ForwardedConfig,
}

/// The client address behind a gateway (see [`crate::forwarded`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ForwardedConfig {
    /// Addresses or CIDR ranges of the gateways in front of this service.
    /// Only a request whose TCP peer is in this list has its client address
    /// (the exchange's per-address rate limit, the request log, `/metrics`'
    /// loopback check) taken from the right-most `X-Forwarded-For` entry;
    /// from any other peer the header is ignored. Defaults to empty: nobody
    /// is trusted and the TCP peer is always the client.
    pub trusted_proxies: Vec<String>,
}

impl ForwardedConfig {
    /// The parsed list (after [`Config::validate`]).
    pub fn trusted(&self) -> crate::forwarded::TrustedProxies {
        crate::forwarded::TrustedProxies::new(
            self.trusted_proxies
                .iter()
                .filter_map(|s| s.trim().parse().ok())
                .collect(),
        )
    }
}

/// Certificate rotation: who may call the agent endpoints and how long a
/// rotated-away-from certificate stays accepted.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RotationConfig {
    /// Seconds the certificate an agent rotated away from stays accepted
    /// when the new one is not seen (confirmed) earlier. Defaults to 3600;
    /// 10 ..= 604800. Never beyond that certificate's NotAfter.
    pub grace_secs: u64,
    /// How often the grace sweep looks for ended grace periods,
    /// milliseconds. Defaults to 5000; 100 ..= 600000.
    pub sweep_interval_ms: u64,
    /// The attempt window of `agent.certificate.reuse_detected`, seconds:
    /// uses of one superseded certificate (reported by gateways or seen by
    /// the rotation endpoints) give one event per window. Defaults to 3600;
    /// 60 ..= 604800.
    pub reuse_window_secs: u64,
    /// The gateway identity assertion the agent endpoints trust.
    pub assertion: AssertionTrustConfig,
}

impl Default for RotationConfig {
    fn default() -> Self {
        Self {
            grace_secs: 3600,
            sweep_interval_ms: 5000,
            reuse_window_secs: 3600,
            assertion: AssertionTrustConfig::default(),
        }
    }
}

/// Which gateway assertions the agent endpoints accept. With no key, every
/// agent-endpoint call is refused with 401 `identity_required` (fail closed).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AssertionTrustConfig {
    /// Required `aud`: the `audience` of the gateway route that forwards the
    /// agent endpoints (a route's audience defaults to its name). Defaults
    /// to `enroll-api`.
    pub audience: String,
    /// Required `iss`. Defaults to `oneprotect-gateway`.
    pub issuer: String,
    /// The gateways' public keys, by key id.
    pub keys: Vec<TrustedKey>,
}

impl Default for AssertionTrustConfig {
    fn default() -> Self {
        Self {
            audience: "enroll-api".into(),
            issuer: oneprotect_identity::assertion::DEFAULT_ISSUER.into(),
            keys: Vec::new(),
        }
    }
}

/// One gateway signing key (`oneprotect-gateway --print-assertion-key` prints it).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TrustedKey {
    /// The `kid` in the assertion header.
    pub kid: String,
    /// The Ed25519 public key, 32 bytes in unpadded base64url.
    pub public_key: String,
}

impl TrustedKey {
    /// The decoded key (after [`Config::validate`]).
    pub fn key_bytes(&self) -> Option<[u8; 32]> {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(self.public_key.trim())
            .ok()
            .and_then(|v| <[u8; 32]>::try_from(v).ok())
    }
}

/// Redis: the revocation projection gateways read, and the event stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// One node (`redis://[user:pass@]host:port[/db]`), a Sentinel-managed
    /// master (`redis+sentinel://[user:pass@]host:port[,host:port…]/master[/db]`,
    /// credentials and db for the master) or a Redis Cluster
    /// (`redis+cluster://[user:pass@]host:port[,host:port…]`, needs a hash
    /// tag in `key_prefix` unless `shards > 1`). Defaults to unset: no projection, no event
    /// relay (outbox rows stay pending until a replica with Redis publishes
    /// them).
    pub url: Option<String>,
    /// Prefix of every key and channel; must match the gateways'. Defaults
    /// to `oneprotect:`. With a Redis Cluster and `shards = 1` it must
    /// contain a hash tag, e.g. `{oneprotect}:`, so every key is in one
    /// slot; with `shards > 1` it must not.
    pub key_prefix: String,
    /// Shards of the revocation projection (ADR-0024): 1 (the default)
    /// keeps every key in one slot, one sequence, one `PUBLISH` channel;
    /// N > 1 (only with `redis+cluster://`) spreads tenants over N hash
    /// tags, each with its own sequence and `SPUBLISH` channel, evenly over
    /// the cluster's slots. Must match the gateways' `revocation.shards`
    /// (recorded in `{prefix}projection:shards`; a gateway configured
    /// otherwise fails closed). 1 ..= 1024.
    pub shards: u16,
    /// How often the outbox relay looks for pending rows besides the
    /// wake-up after each commit, milliseconds. Defaults to 1000; 10 ..= 60000.
    pub relay_poll_interval_ms: u64,
    /// Rebuild the projection when `{prefix}projection:built_at` is missing
    /// (new, flushed or restarted-empty Redis), checked on start and on every
    /// relay pass. Defaults to true.
    pub rebuild_if_missing: bool,
    /// After writing each outbox event to Redis, the relay waits until this
    /// many replicas have it (`WAIT`) before marking the event sent; fewer
    /// within `wait_timeout_ms` and the event stays pending and is retried.
    /// A master that fails over before replicating then cannot lose a
    /// revocation the relay has marked sent: the new master gets it again.
    /// Defaults to 0 (off). On a Redis Cluster the `WAIT` goes to every
    /// master and the fewest confirmations count (every master needs that
    /// many replicas; ADR-0024).
    pub wait_replicas: u32,
    /// How long one `WAIT` may take, milliseconds. Defaults to 1000;
    /// 1 ..= 60000.
    pub wait_timeout_ms: u64,
    /// How long a revocation (and a rotation's confirmation) waits, after
    /// its commit, for every live gateway to apply it before answering
    /// (ADR-0022), milliseconds. A gateway still lagging then is named in
    /// the answer. Defaults to 500; 1 ..= 10000. A caller can skip the wait
    /// with `?wait=false`.
    pub enforcement_deadline_ms: u64,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: None,
            key_prefix: oneprotect_identity::revocation::DEFAULT_PREFIX.into(),
            shards: 1,
            relay_poll_interval_ms: 1000,
            rebuild_if_missing: true,
            wait_replicas: 0,
            wait_timeout_ms: 1000,
            enforcement_deadline_ms: 500,
        }
    }
}

/// Where to listen.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    /// HTTPS address. Defaults to `127.0.0.1:8443`. Empty string: off.
    pub https: String,
    /// Plain HTTP address, for running behind the gateway on the same host.
    /// Must be a loopback address. Defaults to off (empty).
    pub http: String,
}

/// The HTTPS certificate.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain. With `key_path`; when both are unset a
    /// self-signed dev certificate for `localhost`/`127.0.0.1` is generated
    /// under `data_dir/tls/` (only if `dev_self_signed` is true).
    pub cert_path: Option<PathBuf>,
    /// PEM private key.
    pub key_path: Option<PathBuf>,
    /// Generate a dev certificate when none is configured. Defaults to true.
    pub dev_self_signed: Option<bool>,
}

/// The CA.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaConfig {
    /// Key directory. Defaults to `data_dir/ca`.
    pub dir: Option<PathBuf>,
    /// Create the root CA on first start if missing. Defaults to true (dev);
    /// set false in production and run `oneprotect-enroll-api ca init`.
    pub auto_init: bool,
    /// Lifetime of agent certificates for new tenants, seconds. Defaults to
    /// 2592000 (30 days); 60 ..= 34387200 (398 days).
    pub default_leaf_lifetime_secs: u64,
}

/// Storage.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite:<path>` or `postgres://…`. Defaults to
    /// `sqlite:<data_dir>/enroll.db`.
    pub url: Option<String>,
    /// Pool size. Defaults to 8.
    pub max_connections: u32,
    /// PostgreSQL: the role every connection switches to (`SET ROLE`); it
    /// must not bypass RLS. Defaults to `oneprotect_app`.
    pub app_role: String,
    /// PostgreSQL: schema (`search_path`). Defaults to the server's.
    pub schema: Option<String>,
}

/// Secret hashing.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecretsConfig {
    /// File holding the HMAC pepper (base64url, ≥ 32 bytes). Defaults to
    /// `data_dir/pepper`. Every replica must use the same pepper.
    pub pepper_file: Option<PathBuf>,
    /// Generate the pepper on first start if missing. Defaults to true.
    pub generate_pepper: bool,
}

/// Request limits.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request body, bytes. Defaults to 65536; 1024 ..= 1048576.
    pub max_body_bytes: usize,
    /// How long a request body may take to arrive in full, counted from the
    /// end of the request head, milliseconds; then 408
    /// `request_body_timeout` and the connection is closed. Defaults to
    /// 10000; 100 ..= 300000.
    pub body_read_timeout_ms: u64,
    /// Exchanges per minute per source address (per replica). Defaults to 60.
    pub exchange_per_address_per_minute: u32,
    /// Burst per source address. Defaults to 20.
    pub exchange_per_address_burst: u32,
    /// Exchanges per minute per token (per replica). Defaults to 30.
    pub exchange_per_token_per_minute: u32,
    /// Burst per token. Defaults to 10.
    pub exchange_per_token_burst: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            trust_domain: "oneprotect.local"
                .parse()
                .expect("the default trust domain is valid"),
            data_dir: PathBuf::from("./data/enroll-api"),
            listen: ListenConfig::default(),
            tls: TlsConfig::default(),
            ca: CaConfig::default(),
            database: DatabaseConfig::default(),
            secrets: SecretsConfig::default(),
            limits: LimitsConfig::default(),
            redis: RedisConfig::default(),
            rotation: RotationConfig::default(),
            forwarded: ForwardedConfig::default(),
        }
    }
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self {
            https: "127.0.0.1:8443".into(),
            http: String::new(),
        }
    }
}

impl Default for CaConfig {
    fn default() -> Self {
        Self {
            dir: None,
            auto_init: true,
            default_leaf_lifetime_secs: DEFAULT_LEAF_LIFETIME.as_secs(),
        }
    }
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: None,
            max_connections: 8,
            app_role: crate::store::postgres::DEFAULT_APP_ROLE.into(),
            schema: None,
        }
    }
}

impl Default for SecretsConfig {
    fn default() -> Self {
        Self {
            pepper_file: None,
            generate_pepper: true,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_body_bytes: 64 * 1024,
            body_read_timeout_ms: 10_000,
            exchange_per_address_per_minute: 60,
            exchange_per_address_burst: 20,
            exchange_per_token_per_minute: 30,
            exchange_per_token_burst: 10,
        }
    }
}

/// A parsed listen address, or none when the setting is empty.
fn parse_addr(key: &'static str, s: &str) -> Result<Option<SocketAddr>, ConfigError> {
    if s.is_empty() {
        return Ok(None);
    }
    s.parse().map(Some).map_err(|source| ConfigError::Address {
        key,
        value: s.to_owned(),
        source,
    })
}

impl Config {
    /// Reads `path` (if given), applies environment overrides and validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg = match path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|source| ConfigError::Read {
                    path: p.to_owned(),
                    source,
                })?;
                toml::from_str(&text).map_err(|e| ConfigError::Parse {
                    path: p.to_owned(),
                    source: Box::new(e),
                })?
            }
            None => Config::default(),
        };
        cfg.apply_env(|k| std::env::var(k).ok())?;
        cfg.validate()
    }

    /// Applies `ONEPROTECT_ENROLL_*` overrides read through `get`:
    /// `TRUST_DOMAIN`, `DATA_DIR`, `LISTEN_HTTPS`, `LISTEN_HTTP`,
    /// `DATABASE_URL`, `DATABASE_SCHEMA`, `PEPPER_FILE`, `CA_DIR`,
    /// `CA_AUTO_INIT`, `REDIS_URL`, `REDIS_KEY_PREFIX`, `ASSERTION_KEY`
    /// (`kid:base64url`, adds one trusted gateway key), `TRUSTED_PROXIES`
    /// (comma-separated addresses/CIDRs, replaces `forwarded.trusted_proxies`).
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("ONEPROTECT_ENROLL_TRUST_DOMAIN") {
            self.trust_domain = v
                .parse()
                .map_err(|_| ConfigError::Env("ONEPROTECT_ENROLL_TRUST_DOMAIN"))?;
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_DATA_DIR") {
            self.data_dir = v.into();
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_LISTEN_HTTPS") {
            self.listen.https = v;
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_LISTEN_HTTP") {
            self.listen.http = v;
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_DATABASE_URL") {
            self.database.url = Some(v);
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_DATABASE_SCHEMA") {
            self.database.schema = Some(v);
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_PEPPER_FILE") {
            self.secrets.pepper_file = Some(v.into());
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_CA_DIR") {
            self.ca.dir = Some(v.into());
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_REDIS_URL") {
            self.redis.url = Some(v).filter(|v| !v.is_empty());
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_REDIS_KEY_PREFIX") {
            self.redis.key_prefix = v;
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_REDIS_SHARDS") {
            self.redis.shards = v
                .parse()
                .map_err(|_| ConfigError::Env("ONEPROTECT_ENROLL_REDIS_SHARDS"))?;
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_ASSERTION_KEY") {
            // `kid:base64url`, one trusted gateway key.
            let (kid, key) = v
                .split_once(':')
                .ok_or(ConfigError::Env("ONEPROTECT_ENROLL_ASSERTION_KEY"))?;
            self.rotation.assertion.keys.push(TrustedKey {
                kid: kid.into(),
                public_key: key.into(),
            });
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_TRUSTED_PROXIES") {
            self.forwarded.trusted_proxies = v
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
        }
        if let Some(v) = get("ONEPROTECT_ENROLL_CA_AUTO_INIT") {
            self.ca.auto_init = v
                .parse()
                .map_err(|_| ConfigError::Env("ONEPROTECT_ENROLL_CA_AUTO_INIT"))?;
        }
        Ok(())
    }

    /// Checks ranges, addresses and combinations, and fills derived paths.
    pub fn validate(mut self) -> Result<Self, ConfigError> {
        let https = parse_addr("listen.https", &self.listen.https)?;
        let http = parse_addr("listen.http", &self.listen.http)?;
        if https.is_none() && http.is_none() {
            return Err(ConfigError::NoListener);
        }
        if http.is_some_and(|a| !a.ip().is_loopback()) {
            return Err(ConfigError::PlainHttpOffLoopback);
        }
        match (&self.tls.cert_path, &self.tls.key_path) {
            (Some(_), None) | (None, Some(_)) => return Err(ConfigError::TlsPathsApart),
            (Some(c), Some(k)) => {
                for p in [c, k] {
                    if !p.is_file() {
                        return Err(ConfigError::MissingFile { path: p.clone() });
                    }
                }
            }
            (None, None) => {
                if https.is_some() && self.tls.dev_self_signed == Some(false) {
                    return Err(ConfigError::NoTlsCertificate);
                }
            }
        }
        let (l, r) = (&self.limits, &self.redis);
        let lifetime = MIN_LEAF_LIFETIME.as_secs()..=MAX_LEAF_LIFETIME.as_secs();
        // One line per numeric key: the key operators see, its value, the range.
        #[rustfmt::skip]
        let ranges: [(&'static str, u64, RangeInclusive<u64>); 10] = [
            ("ca.default_leaf_lifetime_secs", self.ca.default_leaf_lifetime_secs, lifetime),
            ("limits.max_body_bytes", l.max_body_bytes as u64, 1024..=1024 * 1024),
            ("limits.body_read_timeout_ms", l.body_read_timeout_ms, 100..=300_000),
            ("database.max_connections", self.database.max_connections.into(), 1..=256),
            ("redis.wait_timeout_ms", r.wait_timeout_ms, 1..=60_000),
            ("redis.enforcement_deadline_ms", r.enforcement_deadline_ms, 1..=10_000),
            ("redis.relay_poll_interval_ms", r.relay_poll_interval_ms, 10..=60_000),
            ("rotation.grace_secs", self.rotation.grace_secs, 10..=604_800),
            ("rotation.sweep_interval_ms", self.rotation.sweep_interval_ms, 100..=600_000),
            ("rotation.reuse_window_secs", self.rotation.reuse_window_secs, 60..=604_800),
        ];
        for (key, value, allowed) in ranges {
            check_range(key, value, allowed)?;
        }
        #[rustfmt::skip]
        let rates = [
            ("limits.exchange_per_address_per_minute", l.exchange_per_address_per_minute),
            ("limits.exchange_per_address_burst", l.exchange_per_address_burst),
            ("limits.exchange_per_token_per_minute", l.exchange_per_token_per_minute),
            ("limits.exchange_per_token_burst", l.exchange_per_token_burst),
        ];
        if let Some((key, _)) = rates.into_iter().find(|&(_, v)| v == 0) {
            return Err(ConfigError::OutOfRange {
                key,
                allowed: "at least 1".into(),
            });
        }
        if !(1..=128).contains(&r.key_prefix.len()) {
            return Err(ConfigError::OutOfRange {
                key: "redis.key_prefix",
                allowed: "1..=128 bytes".into(),
            });
        }
        for p in &self.forwarded.trusted_proxies {
            p.trim()
                .parse::<crate::forwarded::Cidr>()
                .map_err(ConfigError::TrustedProxy)?;
        }
        let url = self
            .database
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("enroll.db").display()));
        if !(url.starts_with("sqlite:")
            || url.starts_with("postgres://")
            || url.starts_with("postgresql://"))
        {
            return Err(ConfigError::DatabaseScheme);
        }
        self.database.url = Some(url);
        if let Some(u) = &self.redis.url {
            // The error names what is wrong, never the URL (it may carry a
            // password).
            let target = oneprotect_redis::RedisTarget::parse(u).map_err(ConfigError::RedisUrl)?;
            target
                .check_shards(
                    self.redis.shards,
                    oneprotect_identity::revocation::MAX_SHARDS,
                )
                .map_err(ConfigError::RedisShards)?;
            target
                .check_layout(&self.redis.key_prefix, self.redis.shards)
                .map_err(ConfigError::RedisPrefix)?;
        }
        let r = &self.rotation;
        if r.assertion.audience.is_empty() || r.assertion.issuer.is_empty() {
            return Err(ConfigError::Empty {
                keys: "rotation.assertion.audience and issuer",
            });
        }
        for k in &r.assertion.keys {
            if k.kid.is_empty() || k.key_bytes().is_none() {
                return Err(ConfigError::AssertionKey { kid: k.kid.clone() });
            }
        }
        if self.ca.dir.is_none() {
            self.ca.dir = Some(self.data_dir.join("ca"));
        }
        if self.secrets.pepper_file.is_none() {
            self.secrets.pepper_file = Some(self.data_dir.join("pepper"));
        }
        Ok(self)
    }

    /// The HTTPS listen address, if any (after [`Config::validate`]).
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.listen.https.parse().ok()
    }

    /// The plain HTTP listen address, if any (after [`Config::validate`]).
    pub fn http_addr(&self) -> Option<SocketAddr> {
        self.listen.http.parse().ok()
    }

    /// The CA directory (after [`Config::validate`]).
    pub fn ca_dir(&self) -> PathBuf {
        self.ca
            .dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("ca"))
    }

    /// The pepper file (after [`Config::validate`]).
    pub fn pepper_file(&self) -> PathBuf {
        self.secrets
            .pepper_file
            .clone()
            .unwrap_or_else(|| self.data_dir.join("pepper"))
    }

    /// The database URL (after [`Config::validate`]).
    pub fn database_url(&self) -> String {
        self.database
            .url
            .clone()
            .unwrap_or_else(|| format!("sqlite:{}", self.data_dir.join("enroll.db").display()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_fill_paths() {
        let c = Config::default().validate().unwrap();
        assert_eq!(c.https_addr().unwrap().to_string(), "127.0.0.1:8443");
        assert!(c.http_addr().is_none());
        assert!(c.database_url().starts_with("sqlite:"));
        assert!(c.ca_dir().ends_with("ca"));
    }

    #[test]
    fn shipped_configs_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
        for f in ["enroll-api.toml", "enroll-api.full.toml"] {
            let text = std::fs::read_to_string(root.join(f)).unwrap();
            let c: Config = toml::from_str(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
            c.validate().unwrap();
        }
    }

    #[test]
    fn refuses_bad_values() {
        let mut c = Config::default();
        c.listen.http = "0.0.0.0:8080".into();
        assert!(c.validate().is_err(), "plain HTTP off loopback");
        let mut c = Config::default();
        c.ca.default_leaf_lifetime_secs = 1;
        assert!(c.validate().is_err());
        let e = toml::from_str::<Config>("trust_domain = \"Bad Domain\"").unwrap_err();
        assert!(e.to_string().contains("invalid trust domain"), "{e}");
        let mut c = Config::default();
        assert!(c
            .apply_env(|k| (k == "ONEPROTECT_ENROLL_TRUST_DOMAIN").then(|| "Bad Domain".into()))
            .is_err());
        let mut c = Config::default();
        c.database.url = Some("mysql://x".into());
        assert!(c.validate().is_err());
        let mut c = Config::default();
        c.listen.https = String::new();
        assert!(c.validate().is_err(), "no listener");
        let mut c = Config::default();
        c.limits.body_read_timeout_ms = 0;
        assert!(c.validate().is_err(), "body deadline");
        for bad in ["10.0.0.0/33", "gateway.local", ""] {
            let mut c = Config::default();
            c.forwarded.trusted_proxies = vec![bad.into()];
            let e = c.validate().unwrap_err().to_string();
            assert!(e.contains("forwarded.trusted_proxies"), "{bad:?}: {e}");
        }
        let mut c = Config::default();
        c.forwarded.trusted_proxies =
            vec!["127.0.0.1".into(), "10.0.0.0/8".into(), "fd00::/8".into()];
        let t = c.validate().unwrap().forwarded.trusted();
        assert!(t.trusts("10.1.2.3".parse().unwrap()) && !t.trusts("127.0.0.2".parse().unwrap()));
        assert!(toml::from_str::<Config>("nope = 1").is_err(), "unknown key");
    }

    #[test]
    fn range_errors_name_their_key() {
        type Set = fn(&mut Config);
        let cases: [(&str, Set); 15] = [
            ("ca.default_leaf_lifetime_secs", |c| {
                c.ca.default_leaf_lifetime_secs = 59
            }),
            ("limits.max_body_bytes", |c| c.limits.max_body_bytes = 1023),
            ("limits.body_read_timeout_ms", |c| {
                c.limits.body_read_timeout_ms = 300_001
            }),
            ("limits.exchange_per_address_per_minute", |c| {
                c.limits.exchange_per_address_per_minute = 0
            }),
            ("limits.exchange_per_address_burst", |c| {
                c.limits.exchange_per_address_burst = 0
            }),
            ("limits.exchange_per_token_per_minute", |c| {
                c.limits.exchange_per_token_per_minute = 0
            }),
            ("limits.exchange_per_token_burst", |c| {
                c.limits.exchange_per_token_burst = 0
            }),
            ("database.max_connections", |c| {
                c.database.max_connections = 257
            }),
            ("redis.key_prefix", |c| c.redis.key_prefix = String::new()),
            ("redis.wait_timeout_ms", |c| {
                c.redis.wait_timeout_ms = 60_001
            }),
            ("redis.relay_poll_interval_ms", |c| {
                c.redis.relay_poll_interval_ms = 9
            }),
            ("redis.enforcement_deadline_ms", |c| {
                c.redis.enforcement_deadline_ms = 10_001
            }),
            ("rotation.grace_secs", |c| c.rotation.grace_secs = 604_801),
            ("rotation.sweep_interval_ms", |c| {
                c.rotation.sweep_interval_ms = 99
            }),
            ("rotation.reuse_window_secs", |c| {
                c.rotation.reuse_window_secs = 59
            }),
        ];
        for (key, set) in cases {
            let mut c = Config::default();
            set(&mut c);
            let e = c.validate().unwrap_err();
            assert!(
                matches!(e, ConfigError::OutOfRange { key: k, .. } if k == key),
                "{key}: {e:?}"
            );
            assert!(e.to_string().starts_with(&format!("{key} must be ")), "{e}");
        }
        let mut c = Config::default();
        c.rotation.grace_secs = 9;
        let e = c.validate().unwrap_err().to_string();
        assert_eq!(e, "rotation.grace_secs must be 10..=604800");
        let mut c = Config::default();
        c.redis.key_prefix = "x".repeat(129);
        let e = c.validate().unwrap_err().to_string();
        assert_eq!(e, "redis.key_prefix must be 1..=128 bytes");
        // The ends of each range are allowed.
        let mut c = Config::default();
        c.ca.default_leaf_lifetime_secs = MAX_LEAF_LIFETIME.as_secs();
        c.limits.max_body_bytes = 1024;
        c.database.max_connections = 256;
        c.rotation.grace_secs = 10;
        c.rotation.reuse_window_secs = 604_800;
        c.validate().unwrap();
    }

    #[test]
    fn causes_are_reachable_through_source() {
        use std::error::Error as _;
        let mut c = Config::default();
        c.forwarded.trusted_proxies = vec!["10.0.0.0/33".into()];
        let e = c.validate().unwrap_err();
        let cause = e.source().expect("a cause");
        assert!(cause.is::<oneprotect_identity::net::CidrError>(), "{e:?}");

        let mut c = Config::default();
        c.listen.https = "localhost".into();
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("listen.https"), "{e}");
        assert!(e
            .source()
            .expect("a cause")
            .is::<std::net::AddrParseError>());

        let mut c = Config::default();
        c.redis.url = Some("redis+sentinel://:s3cret@10.0.0.1:26379/".into());
        let e = c.validate().unwrap_err();
        let cause = e.source().expect("a cause");
        assert_eq!(
            cause.downcast_ref::<oneprotect_redis::UrlError>(),
            Some(&oneprotect_redis::UrlError::NoMasterName)
        );
        assert!(!crate::error_chain(&e).contains("s3cret"), "{e}");

        let mut c = Config::default();
        c.redis.url = Some("redis+cluster://10.0.0.1:7000".into());
        c.redis.key_prefix = "op:".into();
        let e = c.validate().unwrap_err();
        assert!(e
            .source()
            .expect("a cause")
            .is::<oneprotect_redis::PrefixError>());
    }

    #[test]
    fn redis_topologies_are_validated() {
        let with = |url: &str, prefix: &str| {
            let mut c = Config::default();
            c.redis.url = Some(url.into());
            c.redis.key_prefix = prefix.into();
            c.validate().map(|_| ()).map_err(|e| e.to_string())
        };
        with("redis://127.0.0.1:6379/2", "op:").unwrap();
        with(
            "redis+sentinel://10.0.0.1:26379,10.0.0.2:26379/mymaster",
            "op:",
        )
        .unwrap();
        with("redis+cluster://10.0.0.1:7000,10.0.0.2:7000", "{op}:").unwrap();
        let e = with("redis+cluster://10.0.0.1:7000", "op:").unwrap_err();
        assert!(
            e.contains("redis.key_prefix") && e.contains("hash tag"),
            "{e}"
        );
        let e = with("redis+sentinel://:s3cret@10.0.0.1:26379/", "op:").unwrap_err();
        assert!(e.contains("master name") && !e.contains("s3cret"), "{e}");
        let e = with("redis+cluster://10.0.0.1", "{op}:").unwrap_err();
        assert!(e.contains("no port"), "{e}");
        let e = with("mysql://10.0.0.1", "op:").unwrap_err();
        assert!(e.contains("not a Redis URL"), "{e}");
    }

    #[test]
    fn shards_need_a_cluster_and_a_prefix_without_a_hash_tag() {
        let with = |url: &str, prefix: &str, shards: u16| {
            let mut c = Config::default();
            c.redis.url = Some(url.into());
            c.redis.key_prefix = prefix.into();
            c.redis.shards = shards;
            c.validate().map(|_| ()).map_err(|e| e.to_string())
        };
        with("redis+cluster://10.0.0.1:7000", "op:", 16).unwrap();
        let e = with("redis+cluster://10.0.0.1:7000", "{op}:", 16).unwrap_err();
        assert!(
            e.contains("redis.key_prefix") && e.contains("must not"),
            "{e}"
        );
        let e = with("redis://127.0.0.1:6379", "op:", 16).unwrap_err();
        assert!(e.contains("redis.shards") && e.contains("Cluster"), "{e}");
        let e = with("redis+cluster://10.0.0.1:7000", "op:", 0).unwrap_err();
        assert!(e.contains("redis.shards: must be 1..=1024"), "{e}");
        let e = with("redis+cluster://10.0.0.1:7000", "op:", 1025).unwrap_err();
        assert!(e.contains("redis.shards"), "{e}");
    }

    #[test]
    fn replica_wait_is_bounded() {
        let with = |url: &str, replicas: u32, timeout_ms: u64| {
            let mut c = Config::default();
            c.redis.url = Some(url.into());
            c.redis.key_prefix = "{op}:".into();
            c.redis.wait_replicas = replicas;
            c.redis.wait_timeout_ms = timeout_ms;
            c.validate().map(|_| ()).map_err(|e| e.to_string())
        };
        with("redis://127.0.0.1:6379", 1, 1000).unwrap();
        with("redis+sentinel://10.0.0.1:26379/m", 2, 500).unwrap();
        // A Cluster too (ADR-0024): WAIT goes to every master.
        with("redis+cluster://10.0.0.1:7000", 1, 1000).unwrap();
        with("redis+cluster://10.0.0.1:7000", 0, 1000).unwrap();
        let e = with("redis://127.0.0.1:6379", 1, 0).unwrap_err();
        assert!(e.contains("wait_timeout_ms"), "{e}");
    }

    #[test]
    fn env_overrides() {
        let mut c = Config::default();
        c.apply_env(|k| match k {
            "ONEPROTECT_ENROLL_LISTEN_HTTP" => Some("127.0.0.1:9000".into()),
            "ONEPROTECT_ENROLL_DATABASE_URL" => Some("postgres://db/x".into()),
            _ => None,
        })
        .unwrap();
        let c = c.validate().unwrap();
        assert_eq!(c.http_addr().unwrap().port(), 9000);
        assert_eq!(c.database_url(), "postgres://db/x");
        let mut c = Config::default();
        assert!(c
            .apply_env(|k| (k == "ONEPROTECT_ENROLL_CA_AUTO_INIT").then(|| "maybe".into()))
            .is_err());
    }
}
