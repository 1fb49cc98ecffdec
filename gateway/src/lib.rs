//! OneProtect's mTLS gateway: a pingora reverse proxy that terminates mTLS
//! for agents, turns the verified client certificate into an identity once
//! per connection, checks revocation on every request, strips client-sent
//! identity headers and injects the verified identity plus a short-lived
//! signed assertion for upstream worker APIs.
//!
//! - [`config`]: the TOML configuration and its pure `validate()`.
//! - [`files`]: the file loaders (PEM chains, keys, the assertion key) and
//!   their [`files::FileError`].
//! - [`prepare`]: validates a [`Config`] and loads each file it names once;
//!   [`build`] and `--check` start from the result.
//! - [`tls`]: mTLS termination: [`tls::trust`] (the reloadable trust
//!   bundle), [`tls::chain`] (path and identity validation),
//!   [`tls::verifier`] (the rustls client certificate verifier),
//!   [`tls::accept`] (the post-handshake identity callback).
//! - [`conn`]: the per-connection identity (header values built once).
//! - [`assertion`]: the signed assertion, re-signed shortly before expiry.
//! - [`headers`]: strip and inject (pure functions).
//! - [`revocation`]: the cached, pub/sub-invalidated revocation check.
//! - [`routes`]: path-prefix routing to round-robin upstream pools, and
//!   each route's upstream TLS ([`routes::upstream_tls`]).
//! - [`proxy`]: the `ProxyHttp` implementation.
//! - [`handshake`]: the TLS handshake: deadline, failure reasons, log budget.
//! - [`proxy_protocol`]: trusted L4 balancers and PROXY protocol v2.
//! - [`serve`]: the HTTP/1.1 connection loop (idle wait, whole-head deadline).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`reports`]: superseded-certificate use, reported to the enroll-api.
//! - [`server`]: assembling and running it.
//!
//! Start-up runs `Config` → [`Prepared::load`] → [`build`]. Imports run
//! one way: `config` is plain data (it uses only `proxy_protocol::Cidr`);
//! `files` reads files for `prepare` and `tls::trust`; `tls` uses `conn`,
//! which uses `assertion`, which uses `config`; `server` uses them all.
//!
//! Run: `oneprotect-gateway --config configs/gateway.toml`.

pub mod admin;
pub mod assertion;
pub mod config;
pub mod conn;
pub mod fast;
pub mod files;
pub mod handshake;
pub mod headers;
pub mod metrics;
pub mod prepare;
pub mod proxy;
pub mod proxy_protocol;
pub mod reports;
pub mod revocation;
pub mod routes;
pub mod serve;
pub mod server;
pub mod tls;

pub use config::Config;
pub use prepare::{PrepareError, Prepared};
pub use server::{build, build_with_memory_bus, App, RunningGateway};
