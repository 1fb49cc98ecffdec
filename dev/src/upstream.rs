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
//! (`x-oneprotect-identity-assertion`) the way a real upstream should, with
//! the `oneprotect-upstream` crate: keys from the enroll-api's published JWK
//! Set, signature, issuer, this route's audience, expiry, and that every
//! identity header is the one the assertion binds. It reports the outcome
//! instead of refusing, so the demo can show it. The assertion itself is
//! not echoed (it is a bearer credential for its lifetime); its length is.
//!
//! ```text
//! {"method":"GET","path":"/hello",
//!  "identity_headers":{"x-oneprotect-tenant-id":"…","x-oneprotect-agent-id":"…",…},
//!  "assertion":{"present":true,"verified":true,"matches_headers":true,"agent":{…}}}
//! ```

use std::collections::BTreeMap;

use axum::extract::State;
use axum::Json;
use http::{HeaderMap, Method, Uri};
use oneprotect_identity::headers as h;
use oneprotect_identity::{AgentId, AgentUri, SerialNumber, TenantId};
use oneprotect_upstream::{Refusal, Verifier};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What the upstream found out about the assertion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertionReport {
    /// The header was there.
    pub present: bool,
    /// It verified (signature by a published gateway key, issuer,
    /// audience, expiry, claim consistency) and binds the identity headers.
    pub verified: bool,
    /// Why it did not verify.
    pub error: Option<String>,
    /// Every identity header is the one the assertion binds.
    pub matches_headers: bool,
    /// The verified identity.
    pub agent: Option<AssertedAgent>,
}

/// The identity a verified assertion vouches for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AssertedAgent {
    /// The tenant.
    pub tenant_id: TenantId,
    /// The agent.
    pub agent_id: AgentId,
    /// The SPIFFE ID.
    pub spiffe_id: AgentUri,
    /// The certificate serial.
    pub serial: SerialNumber,
    /// The key id that signed it.
    pub kid: String,
    /// Seconds the assertion has left.
    pub expires_in: i64,
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
pub async fn echo(verifier: &Verifier, method: &Method, uri: &Uri, headers: &HeaderMap) -> Echo {
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
    let assertion = if headers.contains_key(h::IDENTITY_ASSERTION) {
        match verifier.verify(headers).await {
            Ok(a) => AssertionReport {
                present: true,
                verified: true,
                error: None,
                matches_headers: true,
                agent: Some(AssertedAgent {
                    expires_in: a.assertion_expires_at
                        - time::OffsetDateTime::now_utc().unix_timestamp(),
                    tenant_id: a.tenant_id,
                    agent_id: a.agent_id,
                    spiffe_id: a.spiffe_id,
                    serial: a.serial,
                    kid: a.kid,
                }),
            },
            Err(e) => AssertionReport {
                present: true,
                verified: false,
                matches_headers: !matches!(e, Refusal::HeaderMismatch(_)),
                error: Some(e.to_string()),
                agent: None,
            },
        }
    } else {
        AssertionReport {
            present: false,
            verified: false,
            error: None,
            matches_headers: false,
            agent: None,
        }
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
    State(verifier): State<Verifier>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Json<Echo> {
    Json(echo(&verifier, &method, &uri, &headers).await)
}

/// Serves the upstream on `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    verifier: Verifier,
    mut stop: watch::Receiver<bool>,
) -> std::io::Result<()> {
    let app = axum::Router::new().fallback(handle).with_state(verifier);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move {
            let _ = stop.wait_for(|s| *s).await;
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use oneprotect_identity::{AssertionSigner, Jwk, JwkSet};

    fn verifier(keys: Vec<Jwk>) -> Verifier {
        Verifier::with_keys(&JwkSet { keys }, "aud", Default::default()).unwrap()
    }

    #[tokio::test]
    async fn reports_a_missing_or_forged_assertion_as_not_verified() {
        let (signer, _) = AssertionSigner::generate("k").unwrap();
        let verifier = verifier(vec![Jwk::ed25519("k", &signer.public_key())]);
        let mut headers = HeaderMap::new();
        headers.insert(h::TENANT_ID, "t".parse().unwrap());
        headers.insert("x-other", "o".parse().unwrap());
        headers.insert("x_other", "o".parse().unwrap());
        let e = echo(
            &verifier,
            &Method::GET,
            &"/x?y=1".parse().unwrap(),
            &headers,
        )
        .await;
        assert_eq!(e.path, "/x?y=1");
        assert_eq!(e.identity_headers.len(), 1);
        assert!(!e.assertion.present && !e.assertion.verified);
        headers.insert(h::IDENTITY_ASSERTION, "a.b.c".parse().unwrap());
        let e = echo(&verifier, &Method::GET, &"/".parse().unwrap(), &headers).await;
        assert!(e.assertion.present && !e.assertion.verified);
        assert!(e.assertion.error.is_some());
        assert_eq!(
            e.identity_headers[h::IDENTITY_ASSERTION],
            "<signed assertion, 5 bytes>"
        );
    }

    #[tokio::test]
    async fn shows_identity_headers_in_every_spelling_an_application_folds() {
        let verifier = verifier(Vec::new());
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
        let e = echo(&verifier, &Method::GET, &"/".parse().unwrap(), &headers).await;
        assert_eq!(e.identity_headers.len(), 5, "{:?}", e.identity_headers);
        assert_eq!(e.identity_headers["client_cert"], "spoof, again");
        assert!(!e.identity_headers.contains_key("x_other"));
    }
}
