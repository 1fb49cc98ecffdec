//! mTLS termination: the swappable trust bundle ([`trust`]), client chain
//! validation ([`chain`]), the rustls client certificate verifier
//! ([`verifier`]) and the post-handshake identity callback ([`accept`]).
//! The files are read by [`crate::files`]; upstream TLS is a route's
//! ([`crate::routes::upstream_tls`]).
//!
//! # How a client certificate becomes an identity
//!
//! 1. [`AgentCertVerifier`] (a rustls `ClientCertVerifier`) validates the
//!    presented chain with rustls-webpki against the current
//!    [`TrustBundle`], with the clientAuth EKU, and — inside webpki's path
//!    hook, so on the *verified* path only — runs
//!    [`AgentIdentity::from_chain`] on the leaf and the CA that actually
//!    issued it. The tenant boundary is therefore enforced against the
//!    issuer whose signature was checked, never against an unverified
//!    intermediate the client added. (rustls' `WebPkiClientVerifier` does
//!    the same path validation but does not expose the verified path, which
//!    is why the gateway calls webpki itself; the TLS signature checks are
//!    rustls' own helpers.)
//! 2. The verified identity is parked in a short-lived map keyed by the
//!    leaf's SHA-256 fingerprint.
//! 3. [`IdentityCallback::handshake_complete_callback`] (pingora's
//!    `TlsAccept`) picks it up, builds the per-connection [`ConnIdentity`]
//!    (header values, Redis keys) once, and stores it in the connection's
//!    `SslDigest` extension; every request (every h2 stream) reads it from
//!    there. A resumed TLS 1.3 session skips the verifier: the callback then
//!    re-validates the chain restored from the ticket against the current
//!    bundle, so a reload also applies to resumptions.
//!
//! # Certificate-less clients
//!
//! The verifier allows unauthenticated clients by default
//! (`client_auth_mandatory() == false`) because the gateway fronts the
//! enrollment exchange, which new agents call without a certificate. Every
//! route except those configured with `require_identity = false` refuses a
//! request without a verified identity (401 `identity_required`). A client
//! that *does* present a certificate that fails verification is refused at
//! the handshake. `listener.require_client_cert = true` makes a certificate
//! mandatory at the handshake.

pub mod accept;
pub mod chain;
pub mod trust;
pub mod verifier;

pub use accept::IdentityCallback;
pub use chain::{ChainValidator, VerifyError};
pub use trust::{TrustBundle, TrustStore};
pub use verifier::AgentCertVerifier;
