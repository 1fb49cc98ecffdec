//! The gateways' assertion verification keys as a JWK Set (RFC 7517), for
//! upstreams that verify `x-oneprotect-identity-assertion` (public).
//!
//! The set is `rotation.assertion.keys`: the same keys the enroll-api's own
//! agent endpoints trust, so there is one list to edit when a gateway key is
//! added or retired (docs/architecture/agent-enrollment-mtls.md, "Assertion
//! keys").

use axum::http::header::{CACHE_CONTROL, CONTENT_TYPE, ETAG, IF_NONE_MATCH};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use bytes::Bytes;

use oneprotect_identity::{Jwk, JwkSet};

use super::AppState;
use crate::config::TrustedKey;

/// How long upstreams may cache the set. A key is published at least this
/// long before any gateway signs with it (the rotation procedure), and
/// verifiers refetch at once on an unknown `kid` anyway.
pub const JWKS_MAX_AGE_SECS: u64 = 60;

pub(crate) fn router() -> Router<AppState> {
    Router::new().route("/.well-known/jwks.json", get(jwks))
}

/// The rendered JWK Set and its entity tag, made once at start.
#[derive(Debug, Clone)]
pub struct PublishedKeys {
    body: Bytes,
    etag: String,
}

impl PublishedKeys {
    /// Renders the configured gateway keys (after `Config::validate`, which
    /// refused unusable ones).
    pub fn new(keys: &[TrustedKey]) -> Self {
        let set = JwkSet {
            keys: keys
                .iter()
                .filter_map(|k| k.key_bytes().map(|b| Jwk::ed25519(k.kid.clone(), &b)))
                .collect(),
        };
        // Strings only: serialisation cannot fail.
        let body = serde_json::to_vec(&set).expect("a JWK Set serialises");
        let digest = ring::digest::digest(&ring::digest::SHA256, &body);
        let etag = format!("\"{}\"", hex(&digest.as_ref()[..12]));
        Self {
            body: Bytes::from(body),
            etag,
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

async fn jwks(state: axum::extract::State<AppState>, headers: HeaderMap) -> Response {
    let keys = &state.jwks;
    let cache = format!("public, max-age={JWKS_MAX_AGE_SECS}");
    let fresh = headers
        .get_all(IF_NONE_MATCH)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| {
            let t = t.trim();
            t == "*" || t.trim_start_matches("W/") == keys.etag
        });
    if fresh {
        return (
            StatusCode::NOT_MODIFIED,
            [(ETAG, keys.etag.clone()), (CACHE_CONTROL, cache)],
        )
            .into_response();
    }
    (
        [
            (CONTENT_TYPE, "application/jwk-set+json".to_owned()),
            (ETAG, keys.etag.clone()),
            (CACHE_CONTROL, cache),
        ],
        keys.body.clone(),
    )
        .into_response()
}
