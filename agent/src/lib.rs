//! The reference OneProtect agent.
//!
//! A device's agent uses this library (and the `oneprotect-agent` binary built
//! on it) to:
//!
//! 1. **enroll**: generate an ECDSA P-256 key locally (it never leaves the
//!    device), build a CSR, trade it plus an enrollment token for a
//!    certificate at `POST /api/v1/agent-enrollment/exchange`, and store key,
//!    certificate, chain and trust bundle atomically ([`state`]);
//! 2. **call** worker APIs through the gateway with mutual TLS ([`client`]);
//! 3. **rotate** at ⅔ of the certificate's lifetime, authenticated by the
//!    current certificate ([`rotate`], [`run`]), and stop — never loop hot —
//!    when the agent has been revoked.
//!
//! The bench harness and the end-to-end tests use this library to act as
//! agents. It depends on neither pingora nor sqlx.
//!
//! ```no_run
//! # async fn demo() -> Result<(), oneprotect_agent::AgentError> {
//! use oneprotect_agent::{client::Endpoint, enroll, state::StateDir, tls};
//! let roots = tls::roots_from_pem(&std::fs::read("server-ca.pem").unwrap())?;
//! let server = Endpoint::new("https://127.0.0.1:8443", tls::server_only(roots)?)?;
//! let token = oneprotect_identity::TokenSecret::new("opet_...");
//! let enrolled = enroll::enroll(&server, &token, &enroll::AgentMetadata::this_host()).await?;
//! StateDir::open("/var/lib/oneprotect-agent")?.store(&enrolled)?;
//! # Ok(()) }
//! ```

pub mod client;
pub mod enroll;
pub mod error;
pub mod rotate;
pub mod run;
pub mod state;
pub mod tls;

pub use error::{AgentError, ApiProblem};
