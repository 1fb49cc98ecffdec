//! The demo upstream: a worker API stand-in behind the gateway that answers
//! every request with what it learned about the caller.
//!
//! It echoes, as JSON, every identity-bearing header it received (the
//! gateway's `x-oneprotect-*` set and the other conventions the gateway
//! strips from clients) the way a CGI, WSGI, PHP or Rack application would
//! see it: a name counts when, lower-cased with `_` read as `-`, it is one
//! of those, so `x_oneprotect_tenant_id` shows (under its received name) if
//! a gateway ever let it through. The rule is written out here on purpose,
//! not borrowed from the gateway, so the echo can reveal a gateway miss. It
//! also verifies the signed identity assertion
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
    /// Every identity-bearing header received (see the module
    /// documentation), lower-case received name → value (the assertion's
    /// value replaced by its length; several copies joined with `, `).
    pub identity_headers: BTreeMap<String, String>,
    /// The assertion check.
    pub assertion: AssertionReport,
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Whether a header of this name carries an identity to an application
/// that reads header names CGI-style (`HTTP_X_ONEPROTECT_TENANT_ID`):
/// lower-cased, `_` as `-`.
pub fn identity_bearing(name: &str) -> bool {
    let cgi = name.to_ascii_lowercase().replace('_', "-");
    cgi.starts_with("x-oneprotect-")
        || [
            "x-forwarded-client-cert",
            "client-cert",
            "client-cert-chain",
        ]
        .contains(&cgi.as_str())
}

/// Builds the answer for one request.
pub fn echo(verifier: &AssertionVerifier, method: &Method, uri: &Uri, headers: &HeaderMap) -> Echo {
    let mut identity_headers: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers {
        let n = name.as_str();
        if !identity_bearing(n) {
            continue;
        }
        let v = if n == h::IDENTITY_ASSERTION {
            format!("<signed assertion, {} bytes>", value.len())
        } else {
            String::from_utf8_lossy(value.as_bytes()).into_owned()
        };
        identity_headers
            .entry(n.to_owned())
            .and_modify(|e| {
                e.push_str(", ");
                e.push_str(&v);
            })
            .or_insert(v);
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
        headers.insert("x_other", "o".parse().unwrap());
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

    #[test]
    fn shows_identity_headers_in_every_spelling_an_application_folds() {
        let verifier = AssertionVerifier::new("aud");
        let mut headers = HeaderMap::new();
        for n in [
            "x_oneprotect_tenant_id",
            "x-oneprotect_spiffe_id",
            "x_forwarded_client_cert",
            "client_cert",
            "client-cert-chain",
        ] {
            headers.append(
                http::HeaderName::from_bytes(n.as_bytes()).unwrap(),
                "spoof".parse().unwrap(),
            );
        }
        headers.append("client_cert", "again".parse().unwrap());
        headers.insert("x_other", "o".parse().unwrap());
        let e = echo(&verifier, &Method::GET, &"/".parse().unwrap(), &headers);
        assert_eq!(e.identity_headers.len(), 5, "{:?}", e.identity_headers);
        assert_eq!(e.identity_headers["client_cert"], "spoof, again");
        assert!(!e.identity_headers.contains_key("x_other"));
    }
}
