//! OneProtect's enrollment service.
//!
//! Tenant admins create enrollment tokens; a newly installed agent sends a
//! token and a CSR and receives a per-device certificate whose URI SAN names
//! its tenant and agent. The crate is a library with a thin binary
//! (`oneprotect-enroll-api`) so tests drive it in-process:
//!
//! - [`ca`]: the platform root and per-tenant issuing CAs (no HTTP).
//! - [`store`]: the storage trait and its one implementation, every query
//!   written once over SQLite or PostgreSQL (RLS).
//! - [`http`]: the API, one module per resource.
//! - [`projection`], [`relay`]: the Redis revocation projection gateways
//!   read, and the outbox relay that feeds it and the event stream.
//! - [`secrets`]: token and admin-key generation and keyed hashing.
//! - [`text`]: the one check of client free text; [`forwarded`]: the client
//!   address behind a trusted gateway.
//! - [`config`], [`service`], [`cli`]: configuration, listeners, commands.
//!
//! Run it: `cargo run -p oneprotect-enroll-api` (dev defaults: SQLite file,
//! generated CA and TLS certificate under `./data/enroll-api`, HTTPS on
//! `127.0.0.1:8443`).

pub mod ca;
pub mod cli;
pub mod clock;
pub mod config;
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
