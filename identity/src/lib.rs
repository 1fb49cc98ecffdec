//! Shared identity types for OneProtect's agent identity layer.
//!
//! This crate holds types and parsing only — no I/O — so that every other
//! crate (gateway, enroll-api, agent, bench, tests) agrees on one definition
//! of each identity concept:
//!
//! - [`ids`]: the `TenantId`, `AgentId`, `TokenId`, [`SerialNumber`] and
//!   [`CertFingerprint`] newtypes, and secret newtypes whose `Debug` and
//!   `Display` print `[redacted]`.
//! - [`uri`]: the SPIFFE identity URIs
//!   `spiffe://<td>/tenant/<tenant_id>/agent/<agent_id>` (agent leaf) and
//!   `spiffe://<td>/tenant/<tenant_id>` (tenant issuing CA), with a strict
//!   parser.
//! - [`chain`]: [`AgentIdentity::from_chain`], which extracts and checks the
//!   identity of an already-verified agent certificate and its issuing CA.
//! - [`profile`]: the certificate profile (key algorithms, lifetimes, cushion).
//! - [`headers`]: the identity header names the gateway strips and injects.
//! - [`revocation`]: certificate and agent status records, the change
//!   announcement, and the Redis key/channel schema (the only place that names
//!   a Redis key).
//! - [`assertion`]: the short-lived signed identity assertion (an EdDSA JWT)
//!   that the gateway injects and upstreams verify.
//! - [`jwk`]: the assertion verification keys as a JWK Set (RFC 7517/8037)
//!   and their RFC 7638 thumbprints.
//! - [`events`]: the lifecycle event types and their envelope.
//! - [`problem`]: the RFC 9457 problem document shared by every HTTP edge.
//!
//! With the `sqlx` feature (the enroll-api's store turns it on), the ids, the
//! serial number and the statuses also get sqlx `Type`/`Encode`/`Decode`
//! impls for PostgreSQL and SQLite: encoding only, still no I/O.
//!
//! ```
//! use oneprotect_identity::{AgentUri, TrustDomain};
//! let uri: AgentUri = "spiffe://oneprotect.local/tenant/6f1e0c9a-3a51-4c1b-9a57-0c7f2f6d8e10/agent/0b7e4b2e-52f4-4d0e-8a4c-1c2d3e4f5a6b"
//!     .parse()
//!     .unwrap();
//! assert_eq!(uri.trust_domain(), &"oneprotect.local".parse::<TrustDomain>().unwrap());
//! ```

pub mod assertion;
pub mod chain;
pub mod events;
pub mod headers;
pub mod ids;
pub mod jwk;
pub mod net;
pub mod problem;
pub mod profile;
pub mod revocation;
#[cfg(feature = "sqlx")]
mod sql;
pub mod uri;

pub use assertion::{
    AssertionClaims, AssertionError, AssertionSigner, AssertionVerifier, VerifiedAssertion,
};
pub use chain::{AgentIdentity, ChainError};
pub use ids::{
    AdminKeySecret, AgentId, CertFingerprint, IdError, SerialNumber, TenantId, TokenId, TokenSecret,
};
pub use jwk::{Jwk, JwkError, JwkSet};
pub use revocation::{
    AgentStatus, Announcement, CertStatus, GatewayPresence, KeySchema, SupersededUse,
};
pub use uri::{AgentUri, TenantCaUri, TrustDomain, UriError};
