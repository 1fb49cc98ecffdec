//! A gateway configuration file, typed: what a test's gateway differs in is
//! a field or a route, and [`GatewayToml::render`] writes the TOML that
//! `oneprotect_gateway::Config::from_toml` (in process) or the
//! `oneprotect-gateway --config` binary reads.
//!
//! Only the keys the suite sets are here; the gateway's defaults apply to
//! the rest. Strings are written between quotes as they are (test paths and
//! URLs hold no quote or backslash).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;

use super::gateway::TD;

/// A gateway configuration: listener, admin listener, optional assertion
/// key, revocation source, runtime and routes.
#[derive(Clone, Debug)]
pub(crate) struct GatewayToml {
    /// `[listener] listen`.
    pub(crate) listen: SocketAddr,
    /// `[admin] listen`.
    pub(crate) admin: SocketAddr,
    /// `[listener] cert`: the server certificate chain.
    pub(crate) cert: PathBuf,
    /// `[listener] key`: the server key.
    pub(crate) key: PathBuf,
    /// `[listener] trust_bundle`: the client CAs.
    pub(crate) bundle: PathBuf,
    /// `[listener] trust_domain`; [`TD`] by default.
    pub(crate) trust_domain: String,
    /// `[listener] require_client_cert`; unset by default.
    pub(crate) require_client_cert: Option<bool>,
    /// More `[listener]` keys, as TOML lines.
    pub(crate) listener_extra: String,
    /// `[assertion]`: the signing key file and its kid (empty: unset, the
    /// key's thumbprint); unset by default.
    pub(crate) assertion: Option<(PathBuf, String)>,
    /// More `[assertion]` keys (with `assertion`).
    pub(crate) assertion_extra: String,
    /// `listener.trust_bundle_poll_secs` (also the assertion key file's
    /// poll); 0 (never: tests reload explicitly) by default.
    pub(crate) bundle_poll_secs: u64,
    /// `[revocation] redis_url`.
    pub(crate) redis_url: String,
    /// `[revocation] key_prefix`.
    pub(crate) key_prefix: String,
    /// `[revocation] max_staleness_ms`; unset by default.
    pub(crate) max_staleness_ms: Option<u64>,
    /// `[revocation] heartbeat_ms`; unset by default.
    pub(crate) heartbeat_ms: Option<u64>,
    /// `[revocation] shards`; unset (1) by default.
    pub(crate) shards: Option<u16>,
    /// `[runtime] threads`; unset by default.
    pub(crate) threads: Option<usize>,
    /// The `[[routes]]`, in order (the gateway matches the longest prefix).
    pub(crate) routes: Vec<RouteToml>,
    /// More TOML appended after the routes (more `[[routes]]` tables or
    /// other sections).
    pub(crate) extra: String,
}

/// One `[[routes]]` table.
#[derive(Clone, Debug)]
pub(crate) struct RouteToml {
    pub(crate) prefix: String,
    /// `name` (and so the assertion audience); unset: the prefix.
    pub(crate) name: Option<String>,
    pub(crate) upstreams: Vec<String>,
    /// `require_identity`; unset (the gateway's default: required).
    pub(crate) require_identity: Option<bool>,
    pub(crate) health_check_secs: Option<u64>,
    pub(crate) connect_timeout_ms: Option<u64>,
    /// `max_body_bytes`; unset: the gateway's default.
    pub(crate) max_body_bytes: Option<u64>,
    /// `upgrade_protocols`; empty (unset: no upgrades) by default.
    pub(crate) upgrade_protocols: Vec<String>,
}

impl RouteToml {
    /// `prefix` to `upstream`, identity required, the gateway's timeouts.
    pub(crate) fn new(prefix: &str, upstream: impl ToString) -> Self {
        Self {
            prefix: prefix.to_owned(),
            name: None,
            upstreams: vec![upstream.to_string()],
            require_identity: None,
            health_check_secs: None,
            connect_timeout_ms: None,
            max_body_bytes: None,
            upgrade_protocols: Vec::new(),
        }
    }

    /// Named `name`: its assertions' audience.
    pub(crate) fn named(mut self, name: &str) -> Self {
        self.name = Some(name.to_owned());
        self
    }

    /// Served without a client identity (`require_identity = false`).
    pub(crate) fn without_identity(mut self) -> Self {
        self.require_identity = Some(false);
        self
    }

    /// No active health checks (`health_check_secs = 0`).
    pub(crate) fn without_health_check(mut self) -> Self {
        self.health_check_secs = Some(0);
        self
    }

    pub(crate) fn connect_timeout_ms(mut self, ms: u64) -> Self {
        self.connect_timeout_ms = Some(ms);
        self
    }

    /// Upgrades to `protocols` allowed (`upgrade_protocols`).
    pub(crate) fn upgrades(mut self, protocols: &[&str]) -> Self {
        self.upgrade_protocols = protocols.iter().map(|p| (*p).to_owned()).collect();
        self
    }

    fn render(&self, out: &mut String) {
        let upstreams: Vec<String> = self.upstreams.iter().map(|u| format!("\"{u}\"")).collect();
        let _ = writeln!(out, "[[routes]]");
        if let Some(name) = &self.name {
            let _ = writeln!(out, "name = \"{name}\"");
        }
        let _ = writeln!(out, "prefix = \"{}\"", self.prefix);
        let _ = writeln!(out, "upstreams = [{}]", upstreams.join(", "));
        if let Some(b) = self.require_identity {
            let _ = writeln!(out, "require_identity = {b}");
        }
        if let Some(s) = self.health_check_secs {
            let _ = writeln!(out, "health_check_secs = {s}");
        }
        if let Some(n) = self.max_body_bytes {
            let _ = writeln!(out, "max_body_bytes = {n}");
        }
        if let Some(ms) = self.connect_timeout_ms {
            let _ = writeln!(out, "connect_timeout_ms = {ms}");
        }
        if !self.upgrade_protocols.is_empty() {
            let protocols: Vec<String> = self
                .upgrade_protocols
                .iter()
                .map(|p| format!("\"{p}\""))
                .collect();
            let _ = writeln!(out, "upgrade_protocols = [{}]", protocols.join(", "));
        }
        out.push('\n');
    }
}

impl GatewayToml {
    /// A gateway on `listen` and `admin` with the server certificate `cert`
    /// and `key`, trusting `bundle`, reading revocations from `redis_url`
    /// under `key_prefix`; trust domain [`TD`], no routes.
    pub(crate) fn new(
        listen: SocketAddr,
        admin: SocketAddr,
        (cert, key, bundle): (PathBuf, PathBuf, PathBuf),
        redis_url: &str,
        key_prefix: &str,
    ) -> Self {
        Self {
            listen,
            admin,
            cert,
            key,
            bundle,
            trust_domain: TD.to_owned(),
            require_client_cert: None,
            listener_extra: String::new(),
            assertion: None,
            assertion_extra: String::new(),
            bundle_poll_secs: 0,
            redis_url: redis_url.to_owned(),
            key_prefix: key_prefix.to_owned(),
            max_staleness_ms: None,
            heartbeat_ms: None,
            shards: None,
            threads: None,
            routes: Vec::new(),
            extra: String::new(),
        }
    }

    /// Appends a route.
    pub(crate) fn route(mut self, route: RouteToml) -> Self {
        self.routes.push(route);
        self
    }

    /// The configuration file's text. The trust bundle is not polled
    /// unless `bundle_poll_secs` says so (tests reload it explicitly) and
    /// shutdown does not wait (`graceful_shutdown_secs = 0`).
    pub(crate) fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "[listener]");
        let _ = writeln!(out, "listen = \"{}\"", self.listen);
        let _ = writeln!(out, "cert = \"{}\"", self.cert.display());
        let _ = writeln!(out, "key = \"{}\"", self.key.display());
        let _ = writeln!(out, "trust_bundle = \"{}\"", self.bundle.display());
        let _ = writeln!(out, "trust_domain = \"{}\"", self.trust_domain);
        let _ = writeln!(out, "trust_bundle_poll_secs = {}", self.bundle_poll_secs);
        if let Some(b) = self.require_client_cert {
            let _ = writeln!(out, "require_client_cert = {b}");
        }
        let _ = writeln!(out, "{}\n", self.listener_extra);
        let _ = writeln!(out, "[admin]\nlisten = \"{}\"\n", self.admin);
        if let Some((key_file, kid)) = &self.assertion {
            let _ = writeln!(out, "[assertion]\nkey_file = \"{}\"", key_file.display());
            if !kid.is_empty() {
                let _ = writeln!(out, "kid = \"{kid}\"");
            }
            let _ = writeln!(out, "{}\n", self.assertion_extra);
        }
        let _ = writeln!(out, "[revocation]");
        let _ = writeln!(out, "redis_url = \"{}\"", self.redis_url);
        let _ = writeln!(out, "key_prefix = \"{}\"", self.key_prefix);
        if let Some(ms) = self.max_staleness_ms {
            let _ = writeln!(out, "max_staleness_ms = {ms}");
        }
        if let Some(n) = self.shards {
            let _ = writeln!(out, "shards = {n}");
        }
        if let Some(ms) = self.heartbeat_ms {
            let _ = writeln!(out, "heartbeat_ms = {ms}");
        }
        let _ = writeln!(out, "\n[runtime]\ngraceful_shutdown_secs = 0");
        if let Some(n) = self.threads {
            let _ = writeln!(out, "threads = {n}");
        }
        out.push('\n');
        for r in &self.routes {
            r.render(&mut out);
        }
        out.push_str(&self.extra);
        out
    }
}
