//! The demo upstream: a worker API stand-in behind the gateway that answers
//! every request with what it learned about the caller.
//!
//! It echoes, as JSON, every identity-bearing header it received (the
//! gateway's `x-oneprotect-*` set and the other conventions the gateway
//! strips from clients), and verifies the signed identity assertion
//! (`x-oneprotect-identity-assertion`) with the gateway's public key the way
//! a real upstream should: signature, issuer, audience, expiry, and that its
//! claims match the plain headers. The assertion itself is not echoed (it is
//! a bearer credential for its lifetime); its length is.
//!
//! ```text
//! {"method":"GET","path":"/hello",
//!  "identity_headers":{"x-oneprotect-tenant-id":"…","x-oneprotect-agent-id":"…",…},
//!  "assertion":{"present":true,"verified":true,"matches_headers":true,"claims":{…}}}
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use axum::extract::State;
use axum::Json;
use http::{HeaderMap, Method, Uri};
use oneprotect_identity::headers as h;
use oneprotect_identity::{AssertionClaims, AssertionVerifier};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the upstream found out about the assertion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionReport {
    /// The header was there.
    pub present: bool,
    /// It verified (signature by the gateway's key, issuer, audience,
    /// expiry, claim consistency).
    pub verified: bool,
    /// Why it did not verify.
    pub error: Option<String>,
    /// Its claims agree with the tenant, agent and serial headers.
    pub matches_headers: bool,
    /// The verified claims.
    pub claims: Option<AssertionClaims>,
}

/// The upstream's answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Echo {
    /// The request method.
    pub method: String,
    /// The request path and query.
    pub path: String,
    /// Every identity-bearing header received, lower-case name → value
    /// (the assertion's value replaced by its length).
    pub identity_headers: BTreeMap<String, String>,
    /// The assertion check.
    pub assertion: AssertionReport,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Builds the answer for one request.
pub fn echo(verifier: &AssertionVerifier, method: &Method, uri: &Uri, headers: &HeaderMap) -> Echo {
    let mut identity_headers = BTreeMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if !h::is_client_identity_header(n) {
            continue;
        }
        let v = if n == h::IDENTITY_ASSERTION {
            format!("<signed assertion, {} bytes>", value.len())
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        identity_headers.insert(n.to_owned(), v);
    }
    let header = |n: &str| headers.get(n).and_then(|v| v.to_str().ok());
    let assertion = match header(h::IDENTITY_ASSERTION) {
        None => AssertionReport {
            present: false,
            verified: false,
            error: None,
            matches_headers: false,
            claims: None,
        },
        Some(token) => match verifier.verify(token, now()) {
            Ok(v) => {
                let c = v.claims;
                let matches_headers = header(h::TENANT_ID) == Some(&c.tenant_id.to_string())
                    && header(h::AGENT_ID) == Some(&c.agent_id.to_string())
                    && header(h::CERT_SERIAL) == Some(&c.serial.to_string());
                AssertionReport {
                    present: true,
                    verified: true,
                    error: None,
                    matches_headers,
                    claims: Some(c),
                }
            }
            Err(e) => AssertionReport {
                present: true,
                verified: false,
                error: Some(e.to_string()),
                matches_headers: false,
                claims: None,
            },
        },
    };
    Echo {
        method: method.to_string(),
        path: uri
            .path_and_query()
            .map_or_else(|| uri.path().to_owned(), |p| p.as_str().to_owned()),
        identity_headers,
        assertion,
    }
}

async fn handle(
    State(verifier): State<Arc<AssertionVerifier>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Json<Echo> {
    Json(echo(&verifier, &method, &uri, &headers))
}

/// Serves the upstream on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    verifier: AssertionVerifier,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = axum::Router::new()
        .fallback(handle)
        .with_state(Arc::new(verifier));
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_identity::AssertionSigner;

    #[test]
    fn reports_a_missing_or_forged_assertion_as_not_verified() {
        let (signer, _) = AssertionSigner::generate("k").unwrap();
        let verifier = AssertionVerifier::new("aud").add_key("k", signer.public_key());
        let mut headers = HeaderMap::new();
        headers.insert(h::TENANT_ID, "t".parse().unwrap());
        headers.insert("x-other", "o".parse().unwrap());
        let e = echo(
            &verifier,
            &Method::GET,
            &"/x?y=1".parse().unwrap(),
            &headers,
        );
        assert_eq!(e.path, "/x?y=1");
        assert_eq!(e.identity_headers.len(), 1);
        assert!(!e.assertion.present && !e.assertion.verified);
        headers.insert(h::IDENTITY_ASSERTION, "a.b.c".parse().unwrap());
        let e = echo(&verifier, &Method::GET, &"/".parse().unwrap(), &headers);
        assert!(e.assertion.present && !e.assertion.verified);
        assert!(e.assertion.error.is_some());
        assert_eq!(
            e.identity_headers[h::IDENTITY_ASSERTION],
            "<signed assertion, 5 bytes>"
        );
    }
}
