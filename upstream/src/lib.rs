//! Verify the OneProtect gateway's identity assertion in an upstream service.
//!
//! The gateway terminates the agents' mTLS and forwards each request with
//! identity headers (`x-oneprotect-tenant-id`, `-agent-id`, `-cert-serial`,
//! `-cert-not-after`, `-spiffe-id`) and `x-oneprotect-identity-assertion`, a
//! short-lived EdDSA JWT binding them. An upstream must not believe the
//! headers because of the network path; it checks the assertion:
//!
//! - signed by a key of the published set (the enroll-api's
//!   `/.well-known/jwks.json`), fetched at start and refreshed, and fetched
//!   again at once for a key id not seen yet (a rotated gateway key);
//! - `iss` the gateway fleet's, `aud` this upstream's (each gateway route
//!   signs for its own audience, by default the route's name), a lifetime of
//!   at most 60 s, `exp`/`iat` within 5 s of skew;
//! - and every identity header equal to the claim the assertion makes.
//!
//! ```no_run
//! use axum::{routing::get, Router};
//! use oneprotect_upstream::{Options, VerifiedAgent, Verifier, VerifyLayer};
//!
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! let verifier = Verifier::from_jwks_url(
//!     "http://127.0.0.1:8080/.well-known/jwks.json",
//!     None,
//!     "workers",
//!     Options::default(),
//! )
//! .await?;
//! verifier.spawn_refresh(std::time::Duration::from_secs(60));
//! let app: Router = Router::new()
//!     .route("/hello", get(|agent: VerifiedAgent| async move { agent.agent_id.to_string() }))
//!     .layer(VerifyLayer::new(verifier));
//! # let _ = app; Ok(()) }
//! ```

mod jwks;
mod layer;
mod verify;

pub use jwks::{JwksError, JwksSource};
pub use layer::{VerifyLayer, VerifyService};
pub use verify::{Options, Refusal, VerifiedAgent, Verifier};
