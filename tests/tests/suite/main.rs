//! OneProtect's cross-component test suite: one binary, one module per area,
//! so the workspace links one test executable instead of one per file.
//!
//! Run everything with `cargo test --workspace`; one area with e.g.
//! `cargo test -p oneprotect-tests --test suite contracts::`.

mod acked_revocation;
mod badinput;
mod bench;
mod cli;
mod contracts;
mod devstack;
mod enroll;
mod fastpath;
mod faults;
mod gateway;
mod hardening_api;
mod hardening_gateway;
mod kit_metrics;
mod kit_upstream;
mod lifecycle;
mod redis_ha;
mod rotation;
mod scaleout;
mod secrets;
mod soak;
mod support;
