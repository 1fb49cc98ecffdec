//! What the suite's areas share: the stacks they start and the clients they
//! drive them with. Test files import from here (and from
//! `oneprotect_tests`), never from each other; a helper one file uses stays
//! in that file.
//!
//! - [`enroll`]: the in-process enroll-api, its admin client, `openssl` CSRs.
//! - [`enroll_proc`]: the enroll-api binary as a child process.
//! - [`gateway`]: the in-process gateway, its echo upstream and clients.
//! - [`gateway_toml`]: a gateway configuration file, typed.
//! - [`metrics`]: sample values from a Prometheus text page.
//! - [`fleet`]: gateway processes, enrolled agents and load.
//! - [`redis`]: `redis-server` children.
//! - [`stack`]: the in-process enroll-api on PostgreSQL and Redis, and the
//!   in-process gateway in front of it, built to a test's needs.

// Helpers run only inside tests, where a panic with its message is the
// failure report (clippy's allow-unwrap-in-tests covers `#[test]` functions
// but not their helpers).
#![allow(clippy::unwrap_used)]

pub(crate) mod enroll;
pub(crate) mod enroll_proc;
pub(crate) mod fleet;
pub(crate) mod gateway;
pub(crate) mod gateway_toml;
pub(crate) mod metrics;
pub(crate) mod redis;
pub(crate) mod stack;
