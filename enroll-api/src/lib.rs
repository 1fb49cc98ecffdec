//! OneProtect's enrollment service.
//!
//! Tenant admins create enrollment tokens; a newly installed agent sends a
//! token and a CSR and receives a per-device certificate whose URI SAN names
//! its tenant and agent. The crate is a library with a thin binary
//! (`oneprotect-enroll-api`) so tests drive it in-process:
//!
//! - [`ca`]: the platform root and per-tenant issuing CAs (no HTTP).
//! - [`clock`]: the injected clock.

pub mod ca;
pub mod clock;
pub mod store;
