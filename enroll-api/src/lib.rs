//! OneProtect's enrollment service.
//!
//! Tenant admins create enrollment tokens; a newly installed agent sends a
//! token and a CSR and receives a per-device certificate whose URI SAN names
//! its tenant and agent. The crate is a library with a thin binary
//! (`oneprotect-enroll-api`) so tests drive it in-process:
//!
//! - [`ca`]: the platform root and per-tenant issuing CAs (no HTTP).
//! - [`authority`]: the exchange and rotation workflows, each a function
//!   with a typed error (no HTTP); [`token`]: the token's shape, status and
//!   refusal reasons.
//! - [`store`]: the storage trait and its one implementation, every query
//!   written once over SQLite or PostgreSQL (RLS); a commit that wrote an
//!   outbox row wakes the relay.
//! - [`http`]: the API, one module per resource, thin over [`authority`];
//!   `ApiError` maps each failure to a problem document and keeps its cause.
//! - [`projection`], [`relay`]: the Redis revocation projection gateways
//!   read, and the outbox relay that feeds it and the event stream.
//! - [`secrets`]: secret generation, admin keys and keyed hashing.
//! - [`text`]: the one check of client free text; [`forwarded`]: the client
//!   address behind a trusted gateway.
//! - [`config`], [`service`], [`cli`]: configuration, listeners, commands.
//!
//! Run it: `cargo run -p oneprotect-enroll-api` (dev defaults: SQLite file,
//! generated CA and TLS certificate under `./data/enroll-api`, HTTPS on
//! `127.0.0.1:8443`).

pub mod authority;
pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
pub mod enforce;
pub mod forwarded;
pub mod http;
pub mod metrics;
pub mod projection;
pub mod ratelimit;
pub mod relay;
pub mod reports;
pub mod secrets;
pub mod service;
pub mod store;
pub mod sweep;
pub mod text;
pub mod token;

/// `e` and its causes on one line, `: `-separated (for a log field or the
/// command line's last word). A cause whose message already ends the line
/// (an error that shows its source in its own message, such as
/// `"redis.url: {0}"`) is not repeated.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.ends_with(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_chain_shows_each_cause_once() {
        let mut c = config::Config::default();
        c.forwarded.trusted_proxies = vec!["10.0.0.0/33".into()];
        let e = c.validate().unwrap_err();
        assert_eq!(
            error_chain(&e),
            "forwarded.trusted_proxies: \"10.0.0.0/33\" is not an IP address or network \
             (a.b.c.d/n, x:y::/n)"
        );
        let mut c = config::Config::default();
        c.listen.https = "localhost".into();
        let e = c.validate().unwrap_err();
        assert_eq!(
            error_chain(&e),
            "listen.https: \"localhost\" is not an ip:port address: \
             invalid socket address syntax"
        );
    }
}
