//! OneProtect's mTLS gateway: a pingora reverse proxy that terminates mTLS
//! for agents, turns the verified client certificate into an identity once
//! per connection, checks revocation on every request, strips client-sent
//! identity headers and injects the verified identity plus a short-lived
//! signed assertion for upstream worker APIs.
//!
//! - [`config`]: the TOML configuration and its `validate()`.
//! - [`tls`]: trust bundle, client certificate verifier, identity callback.
//! - [`conn`]: the per-connection identity (header values built once).
//! - [`assertion`]: the signed assertion, re-signed shortly before expiry.
//! - [`headers`]: strip and inject (pure functions).
//! - [`revocation`]: the cached, pub/sub-invalidated revocation check.
//! - [`routes`]: path-prefix routing to round-robin upstream pools.
//! - [`proxy`]: the `ProxyHttp` implementation.
//! - [`handshake`]: the TLS handshake: deadline, failure reasons, log budget.
//! - [`proxy_protocol`]: trusted L4 balancers and PROXY protocol v2.
//! - [`serve`]: the HTTP/1.1 connection loop (idle wait, whole-head deadline).
//! - [`admin`]: `/metrics`, `/healthz`, `/readyz`.
//! - [`server`]: assembling and running it.
//!
//! Run: `oneprotect-gateway --config configs/gateway.toml`.

pub mod admin;
pub mod assertion;
pub mod config;
pub mod conn;
pub mod handshake;
pub mod headers;
pub mod metrics;
pub mod proxy;
pub mod proxy_protocol;
pub mod reports;
pub mod revocation;
pub mod routes;
pub mod serve;
pub mod server;
pub mod tls;

pub use config::Config;
pub use server::{build, build_with_memory_bus, App, RunningGateway};
